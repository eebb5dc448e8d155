/* edgelm native kernels: the C API.
 *
 * Plain C99, no Python headers: build_native.py feeds the declarations below
 * to cffi, and the same header can be used from C, JNI or a test harness.
 * Every kernel has a numpy reference in edgelm/native_ref.py and a parity
 * test in tests/test_native.py.
 */
#ifndef EDGELM_NATIVE_H
#define EDGELM_NATIVE_H

#include <stddef.h>
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

/* ----------------------------------------------------------------------------
 * Kernel family 3: capture of one graph node during llama_decode (capture.c)
 * edgelm_capture_eval is a ggml_backend_sched_eval_callback: give it as the
 * context's cb_eval with a pointer to an edgelm_capture_t as cb_eval_user_data.
 * Each computed node named `target` appends its rows (ne[1] rows of n_embd
 * float32) to the ring buffer `rows` (capacity rows) at row head % capacity. */

enum {
    EDGELM_CAPTURE_BAD_TYPE = 1,   /* the node is not float32 */
    EDGELM_CAPTURE_BAD_WIDTH = 2,  /* ne[0] != n_embd */
    EDGELM_CAPTURE_OVERFLOW = 3,   /* more rows in one node than the ring holds */
    EDGELM_CAPTURE_BAD_SHAPE = 4   /* a 3-D or 4-D node */
};

typedef struct {
    /* byte offsets of struct ggml_tensor's type, buffer, ne, nb, data and name */
    int32_t off_type, off_buffer, off_ne, off_nb, off_data, off_name;
    /* ggml_backend_buffer_is_host and ggml_backend_tensor_get from the loaded libggml */
    _Bool (*buffer_is_host)(void *buffer);
    void (*tensor_get)(const void *tensor, void *data, size_t offset, size_t size);
    char target[64];  /* the node's name, NUL-terminated */
    float *rows;      /* capacity x n_embd floats, owned by the caller */
    int64_t n_embd, capacity;
    int64_t head;     /* rows written so far (the ring index is head % capacity) */
    int64_t calls;    /* nodes captured so far */
    int32_t error;    /* first EDGELM_CAPTURE_* error seen, 0 if none; the caller clears it */
} edgelm_capture_t;

_Bool edgelm_capture_eval(void *tensor, _Bool ask, void *user_data);

#endif /* EDGELM_NATIVE_H */
