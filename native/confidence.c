/* Kernel family 1: how confident is a logits row?
 *
 * For one row x of n_vocab logits: max softmax probability p1, entropy H,
 * top-2 margin p1 - p2 and argmax, the signals an early-exit decoder reads
 * after every layer. Two passes over the row, both streaming:
 *   pass 1 (top2):   m1 = max x, m2 = runner-up, first index of m1
 *   pass 2 (expsum): s = sum e^z, t = sum e^z z, with z = x - m1 <= 0
 * then p1 = 1/s, H = log s - t/s, p2 = e^(m2 - m1)/s. Subtracting m1 keeps
 * every exponent <= 0, so nothing overflows. Two passes rather than an online
 * softmax: a rescale per max change would cost an extra exp per vector, and a
 * 150k-vocab row (600 KB) stays in L2 between the passes.
 *
 * Only the two passes have SIMD variants; they sit in one dispatch table
 * chosen at runtime, so the file builds without -mavx2 and the binary runs
 * on any CPU of its architecture.
 */
#include "edgelm_native.h"

#include <math.h>
#include <stdint.h>

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define EDGELM_AVX2 1
#include <immintrin.h>
#elif defined(__aarch64__)
#define EDGELM_NEON 1
#include <arm_neon.h>
#endif

/* ----------------------------------------------------------------------------
 * The dispatch table: a path is a name plus its two passes. */

typedef struct {
    const char *name;
    /* x (n,), n >= 1 -> top-2 values and the first index of the top-1 */
    void (*top2)(const float *x, int64_t n, float *m1, float *m2, int32_t *arg);
    /* x (n,) -> s = sum exp(x - m), t = sum exp(x - m) * (x - m) */
    void (*expsum)(const float *x, int64_t n, float m, double *s, double *t);
} ConfidenceKernels;

/* Below this z, e^z < 2e-38: no term that small moves a sum that is >= 1.
 * SIMD paths clamp z here so -inf logits give a finite z (no 0 * inf = NaN in t)
 * and the exp polynomial never leaves the normal float range. */
#define Z_MIN (-87.0f)

/* Vectors summed in float before widening to double. A 150k row summed in
 * float alone drifts ~1e-4 relative; short float runs keep the exp loop fast
 * and the total within 1e-6 of a double sum. */
#define FLOAT_RUN 16

/* ----------------------------------------------------------------------------
 * Scalar path: the reference the SIMD paths are tested against. Its loops
 * also finish the tails the SIMD loops leave. */

/* continue a top-2 scan over x[from:n] */
static void top2_tail(const float *x, int64_t from, int64_t n,
                      float *m1, float *m2, int32_t *arg) {
    float a = *m1, b = *m2;
    int32_t k = *arg;
    for (int64_t i = from; i < n; i++) {
        float v = x[i];
        if (v > a) { b = a; a = v; k = (int32_t)i; }  /* strict: ties keep the first index */
        else if (v > b) { b = v; }
    }
    *m1 = a; *m2 = b; *arg = k;
}

static void top2_scalar(const float *x, int64_t n, float *m1, float *m2, int32_t *arg) {
    *m1 = x[0]; *m2 = -INFINITY; *arg = 0;
    top2_tail(x, 1, n, m1, m2, arg);
}

/* add x[from:n]'s terms to s and t */
static void expsum_tail(const float *x, int64_t from, int64_t n, float m,
                        double *s, double *t) {
    double ss = 0.0, tt = 0.0;
    for (int64_t i = from; i < n; i++) {
        float z = x[i] - m;
        float e = expf(z);
        if (e > 0.0f) { ss += e; tt += (double)e * z; }  /* skip -inf: 0 * -inf is NaN */
    }
    *s += ss; *t += tt;
}

static void expsum_scalar(const float *x, int64_t n, float m, double *s, double *t) {
    *s = 0.0; *t = 0.0;
    expsum_tail(x, 0, n, m, s, t);
}

/* merge per-lane top-2 state into one: the global top-2 is among the lanes'
 * maxima and the winning lane's runner-up */
static void top2_reduce(const float *lm, const float *lm2, const int32_t *li, int lanes,
                        float *m1, float *m2, int32_t *arg) {
    int best = 0;
    for (int l = 1; l < lanes; l++)
        if (lm[l] > lm[best] || (lm[l] == lm[best] && li[l] < li[best])) best = l;
    float b = -INFINITY;
    for (int l = 0; l < lanes; l++) {
        if (l != best && lm[l] > b) b = lm[l];
        if (lm2[l] > b) b = lm2[l];
    }
    *m1 = lm[best]; *m2 = b; *arg = li[best];
}

/* Cephes expf: e^x = 2^n * e^r with |r| <= ln2/2 and e^r = 1 + r + r^2 P5(r);
 * a few ulp on [Z_MIN, 0], far inside the 1e-5 parity tolerance, and no
 * spill to memory for a libm expf call per lane. */
#define EXP_LOG2E 1.44269504088896341f
#define EXP_C1 0.693359375f
#define EXP_C2 (-2.12194440e-4f)
#define EXP_P0 1.9875691500e-4f
#define EXP_P1 1.3981999507e-3f
#define EXP_P2 8.3334519073e-3f
#define EXP_P3 4.1665795894e-2f
#define EXP_P4 1.6666665459e-1f
#define EXP_P5 5.0000001201e-1f

/* ----------------------------------------------------------------------------
 * AVX2 + FMA path (x86). Compiled per function with target attributes. */

#ifdef EDGELM_AVX2
#define AVX2_FN __attribute__((target("avx2,fma")))

/* x in [Z_MIN, 0] */
AVX2_FN static inline __m256 exp_avx2(__m256 x) {
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(EXP_LOG2E), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(EXP_C1), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(EXP_C2), x);
    __m256 y = _mm256_set1_ps(EXP_P0);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(EXP_P1));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(EXP_P2));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(EXP_P3));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(EXP_P4));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(EXP_P5));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

AVX2_FN static void top2_avx2(const float *x, int64_t n, float *m1, float *m2, int32_t *arg) {
    if (n < 8) { top2_scalar(x, n, m1, m2, arg); return; }
    /* lane l tracks x[l::8]: its max, runner-up and the max's first index */
    __m256 vm = _mm256_loadu_ps(x), vm2 = _mm256_set1_ps(-INFINITY);
    __m256i vi = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), cur = vi;
    const __m256i step = _mm256_set1_epi32(8);
    int64_t i = 8;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        cur = _mm256_add_epi32(cur, step);
        __m256 gt = _mm256_cmp_ps(v, vm, _CMP_GT_OQ);
        vm2 = _mm256_max_ps(vm2, _mm256_min_ps(vm, v));
        vm = _mm256_max_ps(vm, v);
        vi = _mm256_blendv_epi8(vi, cur, _mm256_castps_si256(gt));
    }
    float lm[8], lm2[8];
    int32_t li[8];
    _mm256_storeu_ps(lm, vm);
    _mm256_storeu_ps(lm2, vm2);
    _mm256_storeu_si256((__m256i *)li, vi);
    top2_reduce(lm, lm2, li, 8, m1, m2, arg);
    top2_tail(x, i, n, m1, m2, arg);
}

AVX2_FN static double hsum_avx2(__m256d v) {
    double d[4];
    _mm256_storeu_pd(d, v);
    return (d[0] + d[1]) + (d[2] + d[3]);
}

AVX2_FN static void expsum_avx2(const float *x, int64_t n, float m, double *s, double *t) {
    const __m256 vm = _mm256_set1_ps(m), lo = _mm256_set1_ps(Z_MIN);
    __m256d sd = _mm256_setzero_pd(), td = _mm256_setzero_pd();
    int64_t i = 0;
    while (i + 8 <= n) {
        __m256 sf = _mm256_setzero_ps(), tf = _mm256_setzero_ps();
        for (int r = 0; r < FLOAT_RUN && i + 8 <= n; r++, i += 8) {
            __m256 z = _mm256_max_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm), lo);
            __m256 e = exp_avx2(z);
            sf = _mm256_add_ps(sf, e);
            tf = _mm256_fmadd_ps(e, z, tf);
        }
        sd = _mm256_add_pd(sd, _mm256_cvtps_pd(_mm256_castps256_ps128(sf)));
        sd = _mm256_add_pd(sd, _mm256_cvtps_pd(_mm256_extractf128_ps(sf, 1)));
        td = _mm256_add_pd(td, _mm256_cvtps_pd(_mm256_castps256_ps128(tf)));
        td = _mm256_add_pd(td, _mm256_cvtps_pd(_mm256_extractf128_ps(tf, 1)));
    }
    *s = hsum_avx2(sd); *t = hsum_avx2(td);
    expsum_tail(x, i, n, m, s, t);
}
#endif /* EDGELM_AVX2 */

/* ----------------------------------------------------------------------------
 * NEON path (aarch64, where NEON is part of the base ISA). */

#ifdef EDGELM_NEON
/* x in [Z_MIN, 0] */
static inline float32x4_t exp_neon(float32x4_t x) {
    float32x4_t fx = vrndmq_f32(vfmaq_f32(vdupq_n_f32(0.5f), x, vdupq_n_f32(EXP_LOG2E)));
    x = vfmsq_f32(x, fx, vdupq_n_f32(EXP_C1));
    x = vfmsq_f32(x, fx, vdupq_n_f32(EXP_C2));
    float32x4_t y = vdupq_n_f32(EXP_P0);
    y = vfmaq_f32(vdupq_n_f32(EXP_P1), y, x);
    y = vfmaq_f32(vdupq_n_f32(EXP_P2), y, x);
    y = vfmaq_f32(vdupq_n_f32(EXP_P3), y, x);
    y = vfmaq_f32(vdupq_n_f32(EXP_P4), y, x);
    y = vfmaq_f32(vdupq_n_f32(EXP_P5), y, x);
    y = vfmaq_f32(vaddq_f32(x, vdupq_n_f32(1.0f)), y, vmulq_f32(x, x));
    int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(fx), vdupq_n_s32(127)), 23);
    return vmulq_f32(y, vreinterpretq_f32_s32(e));
}

static void top2_neon(const float *x, int64_t n, float *m1, float *m2, int32_t *arg) {
    if (n < 4) { top2_scalar(x, n, m1, m2, arg); return; }
    /* lane l tracks x[l::4]: its max, runner-up and the max's first index */
    static const int32_t lane[4] = {0, 1, 2, 3};
    float32x4_t vm = vld1q_f32(x), vm2 = vdupq_n_f32(-INFINITY);
    int32x4_t vi = vld1q_s32(lane), cur = vi;
    const int32x4_t step = vdupq_n_s32(4);
    int64_t i = 4;
    for (; i + 4 <= n; i += 4) {
        float32x4_t v = vld1q_f32(x + i);
        cur = vaddq_s32(cur, step);
        uint32x4_t gt = vcgtq_f32(v, vm);
        vm2 = vmaxq_f32(vm2, vminq_f32(vm, v));
        vm = vmaxq_f32(vm, v);
        vi = vbslq_s32(gt, cur, vi);
    }
    float lm[4], lm2[4];
    int32_t li[4];
    vst1q_f32(lm, vm);
    vst1q_f32(lm2, vm2);
    vst1q_s32(li, vi);
    top2_reduce(lm, lm2, li, 4, m1, m2, arg);
    top2_tail(x, i, n, m1, m2, arg);
}

static void expsum_neon(const float *x, int64_t n, float m, double *s, double *t) {
    const float32x4_t vm = vdupq_n_f32(m), lo = vdupq_n_f32(Z_MIN);
    float64x2_t sd = vdupq_n_f64(0.0), td = vdupq_n_f64(0.0);
    int64_t i = 0;
    while (i + 4 <= n) {
        float32x4_t sf = vdupq_n_f32(0.0f), tf = vdupq_n_f32(0.0f);
        for (int r = 0; r < FLOAT_RUN && i + 4 <= n; r++, i += 4) {
            float32x4_t z = vmaxq_f32(vsubq_f32(vld1q_f32(x + i), vm), lo);
            float32x4_t e = exp_neon(z);
            sf = vaddq_f32(sf, e);
            tf = vfmaq_f32(tf, e, z);
        }
        sd = vaddq_f64(sd, vaddq_f64(vcvt_f64_f32(vget_low_f32(sf)), vcvt_high_f64_f32(sf)));
        td = vaddq_f64(td, vaddq_f64(vcvt_f64_f32(vget_low_f32(tf)), vcvt_high_f64_f32(tf)));
    }
    *s = vaddvq_f64(sd); *t = vaddvq_f64(td);
    expsum_tail(x, i, n, m, s, t);
}
#endif /* EDGELM_NEON */

/* ----------------------------------------------------------------------------
 * Dispatch */

static const ConfidenceKernels kernels_scalar = {"scalar", top2_scalar, expsum_scalar};
#ifdef EDGELM_AVX2
static const ConfidenceKernels kernels_avx2 = {"avx2", top2_avx2, expsum_avx2};
#endif
#ifdef EDGELM_NEON
static const ConfidenceKernels kernels_neon = {"neon", top2_neon, expsum_neon};
#endif

static const ConfidenceKernels *best_kernels(void) {
#if defined(EDGELM_AVX2)
    __builtin_cpu_init();  /* needed if we run before libgcc's constructors */
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &kernels_avx2;
#elif defined(EDGELM_NEON)
    return &kernels_neon;
#endif
    return &kernels_scalar;
}

static int simd_enabled = 1;
/* resolved on first use; concurrent first calls store the same pointer */
static const ConfidenceKernels *active = 0;

static const ConfidenceKernels *kernels(void) {
    if (!active) active = simd_enabled ? best_kernels() : &kernels_scalar;
    return active;
}

const char *edgelm_simd_path(void) { return kernels()->name; }

int edgelm_get_simd(void) { return simd_enabled; }

void edgelm_set_simd(int enable) {
    simd_enabled = enable != 0;
    active = 0;
}

/* ----------------------------------------------------------------------------
 * Public kernels */

static void confidence_row(const ConfidenceKernels *k, const float *x, int64_t n,
                           float *p1, float *h, float *margin, int32_t *arg) {
    float m1, m2;
    if (n < 1) { *p1 = *h = *margin = NAN; *arg = -1; return; }
    k->top2(x, n, &m1, &m2, arg);
    if (m1 == -INFINITY) { *p1 = *h = *margin = NAN; return; }  /* no softmax exists */
    double s, t;
    k->expsum(x, n, m1, &s, &t);
    double ent = log(s) - t / s;
    *p1 = (float)(1.0 / s);
    *h = (float)(ent > 0.0 ? ent : 0.0);  /* rounding can dip below 0 on a one-hot row */
    *margin = (float)((1.0 - exp((double)m2 - (double)m1)) / s);
}

void edgelm_confidence(const float *logits, int64_t n_vocab, edgelm_confidence_t *out) {
    confidence_row(kernels(), logits, n_vocab, &out->max_prob, &out->entropy,
                   &out->margin, &out->argmax);
}

void edgelm_confidence_batch(const float *logits, int64_t n_rows, int64_t n_vocab,
                             float *max_prob, float *entropy, float *margin,
                             int32_t *argmax) {
    const ConfidenceKernels *k = kernels();
    for (int64_t r = 0; r < n_rows; r++)
        confidence_row(k, logits + r * n_vocab, n_vocab, &max_prob[r], &entropy[r],
                       &margin[r], &argmax[r]);
}
