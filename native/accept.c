/* Kernel family 2: which draft tokens does the target model accept?
 *
 * Speculative decoding drafts n tokens cheaply (a smaller model, or the
 * target's own early-exit layers), scores them with the target in one pass,
 * then keeps the longest prefix the target agrees with:
 *   greedy:   keep draft[i] while it equals the target's argmax
 *   sampling: keep draft[i] with probability min(1, p[x] / q[x]); on the first
 *             rejection draw the replacement from normalize(max(0, p - q)).
 * The sampling rule makes the output distributed exactly as p (Leviathan et
 * al. 2023, Chen et al. 2023). Uniform numbers come from the caller, so a
 * fixed seed gives a fixed result and tests can check exact indices.
 *
 * Scalar only, so no dispatch table: each call reads n + 2 rows at most
 * against a whole forward pass. A SIMD variant would go in a table shaped
 * like confidence.c's.
 */
#include "edgelm_native.h"

#include <stdint.h>

/* ----------------------------------------------------------------------------
 * Greedy acceptance */

int64_t edgelm_greedy_accept(const int32_t *draft, const int32_t *target, int64_t n) {
    int64_t i = 0;
    while (i < n && draft[i] == target[i]) i++;
    return i;
}

/* ----------------------------------------------------------------------------
 * Rejection-sampling acceptance */

int64_t edgelm_speculative_accept(const float *p, const float *q, const int32_t *draft,
                                  const double *u, int64_t n, int64_t n_vocab) {
    for (int64_t i = 0; i < n; i++) {
        int32_t x = draft[i];
        if (x < 0 || x >= n_vocab) return -1;
        double px = p[i * n_vocab + x], qx = q[i * n_vocab + x];
        /* u < min(1, px / qx) without dividing (u < 1 already caps the ratio);
         * one double multiply, as in the numpy reference, so both round alike */
        if (!(u[i] * qx < px)) return i;
    }
    return n;
}

/* ----------------------------------------------------------------------------
 * Residual sampling */

/* inverse CDF over w[j] = max(0, a[j] - b[j]) (b == NULL: w = a), total mass
 * given; returns the last token with mass if rounding leaves target >= sum */
static int32_t inverse_cdf(const float *a, const float *b, int64_t n, double total, double u) {
    double target = u * total, c = 0.0;
    int32_t last = -1;
    for (int64_t j = 0; j < n; j++) {
        double w = b ? (double)a[j] - (double)b[j] : (double)a[j];
        if (!(w > 0.0)) continue;  /* zero-mass tokens are never drawn */
        c += w;
        last = (int32_t)j;
        if (target < c) return last;
    }
    return last;
}

static double residual_mass(const float *a, const float *b, int64_t n) {
    double sum = 0.0;
    for (int64_t j = 0; j < n; j++) {
        double w = b ? (double)a[j] - (double)b[j] : (double)a[j];
        if (w > 0.0) sum += w;
    }
    return sum;
}

int32_t edgelm_residual_sample(const float *p, const float *q, int64_t n_vocab, double u) {
    double mass = residual_mass(p, q, n_vocab);
    if (mass > 0.0) return inverse_cdf(p, q, n_vocab, mass, u);
    /* p <= q everywhere only if p == q: then p itself is the right distribution */
    mass = residual_mass(p, 0, n_vocab);
    if (mass > 0.0) return inverse_cdf(p, 0, n_vocab, mass, u);
    return -1;
}
