/* edgelm native kernels: the C API.
 *
 * Plain C99, no Python headers: build_native.py feeds the declarations below
 * to cffi, and the same header can be used from C, JNI or a test harness.
 * Every kernel has a numpy reference in edgelm/native_ref.py and a parity
 * test in tests/test_native.py.
 */
#ifndef EDGELM_NATIVE_H
#define EDGELM_NATIVE_H

#include <stdint.h>

/* ----------------------------------------------------------------------------
 * SIMD dispatch (confidence.c)
 * One table of kernels is chosen at first use from what the CPU supports:
 * "avx2" (x86-64 with AVX2 and FMA), "neon" (aarch64), else "scalar". */

/* name of the active path: "scalar", "avx2" or "neon" */
const char *edgelm_simd_path(void);
/* enable != 0: best path the CPU supports; 0: force scalar (parity tests) */
void edgelm_set_simd(int enable);
/* 1 if SIMD is allowed (the default), 0 if scalar is forced */
int edgelm_get_simd(void);

/* ----------------------------------------------------------------------------
 * Kernel family 1: confidence of a logits row (confidence.c)
 * Logits must be finite or -inf; +inf and NaN give unspecified results.
 * A row that is entirely -inf has no softmax: the three floats are NaN and
 * argmax is 0 (what numpy gives). Ties resolve to the lowest index. */

typedef struct {
    float max_prob;  /* p1 = max softmax probability */
    float entropy;   /* -sum p log p, natural log, >= 0 */
    float margin;    /* p1 - p2, the top-2 probability gap */
    int32_t argmax;  /* index of p1 */
} edgelm_confidence_t;

/* logits (n_vocab,), n_vocab >= 1 */
void edgelm_confidence(const float *logits, int64_t n_vocab, edgelm_confidence_t *out);

/* logits (n_rows, n_vocab) row-major; each output array has n_rows entries */
void edgelm_confidence_batch(const float *logits, int64_t n_rows, int64_t n_vocab,
                             float *max_prob, float *entropy, float *margin,
                             int32_t *argmax);

/* ----------------------------------------------------------------------------
 * Kernel family 2: speculative decoding acceptance (accept.c)
 * Uniform numbers come from the caller so every call is deterministic. */

/* draft (n,), target (n + 1,) argmax ids -> length of the agreeing prefix, 0..n */
int64_t edgelm_greedy_accept(const int32_t *draft, const int32_t *target, int64_t n);

/* p, q (n, n_vocab) target and draft probabilities, draft (n,), u (n,) in [0, 1).
 * Accepts draft[i] while u[i] < min(1, p[i][x] / q[i][x]) (Leviathan et al. 2023,
 * Chen et al. 2023). Returns the index of the first rejection, n if none,
 * -1 if a draft id is outside [0, n_vocab). */
int64_t edgelm_speculative_accept(const float *p, const float *q, const int32_t *draft,
                                  const double *u, int64_t n, int64_t n_vocab);

/* p, q (n_vocab,), u in [0, 1): a token drawn from normalize(max(0, p - q)) by
 * inverse CDF, or from p when the residual has no mass. -1 if p has no mass. */
int32_t edgelm_residual_sample(const float *p, const float *q, int64_t n_vocab, double u);

#endif /* EDGELM_NATIVE_H */
