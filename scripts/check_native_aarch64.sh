#!/usr/bin/env bash
# Cross-compile native/*.c for aarch64 so the NEON path is known to build, with
# the flags build_native.py uses plus -Wall -Wextra -Werror. If qemu-aarch64 is
# present, also run a small NEON-vs-scalar parity harness under emulation.
# Needs gcc-aarch64-linux-gnu (Debian/Ubuntu); skips with a message without it.
set -euo pipefail

CC="${CC_AARCH64:-aarch64-linux-gnu-gcc}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

# a GNU cross compiler, else zig's clang (`pip install ziglang`: it bundles aarch64 libc headers)
if command -v "$CC" >/dev/null 2>&1; then
    CCMD=("$CC")
elif "$PYTHON" -m ziglang version >/dev/null 2>&1; then
    CCMD=("$PYTHON" -m ziglang cc -target aarch64-linux-gnu)
    CC="zig cc $("$PYTHON" -m ziglang version)"
else
    echo "skip: neither $CC nor ziglang found (apt-get install gcc-aarch64-linux-gnu, or pip install ziglang)"
    exit 0
fi

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
CFLAGS=(-O3 -std=c99 -Wall -Wextra -Werror -I"$ROOT/native")
for src in "$ROOT"/native/*.c; do
    "${CCMD[@]}" "${CFLAGS[@]}" -c "$src" -o "$OUT/$(basename "$src" .c).o"
done
# a wrong #if would compile the NEON table out and still build
grep -q kernels_neon "$OUT/confidence.o" || { echo "FAIL: no NEON table"; exit 1; }
echo "ok: native/*.c compiles for aarch64 ($CC)"

if ! command -v qemu-aarch64 >/dev/null 2>&1; then
    echo "skip: qemu-aarch64 not found, NEON path not run (apt-get install qemu-user)"
    exit 0
fi
# NEON vs scalar on lengths around the 4-lane loop, with ties and -inf entries
cat > "$OUT/parity.c" <<'C'
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "edgelm_native.h"
static uint32_t seed = 1;
static float rnd(void) { seed = seed * 1664525u + 1013904223u; return (float)(seed >> 8) / 16777216.0f; }
static int close_to(float a, float b, float atol) {
    return (isnan(a) && isnan(b)) || fabsf(a - b) <= atol + 1e-5f * fabsf(b);
}
int main(void) {
    const int64_t lens[] = {1, 3, 4, 5, 7, 8, 9, 31, 32, 33, 1000, 32000, 151936};
    float *x = malloc(sizeof(float) * 151936);
    int bad = 0;
    for (int c = 0; c < 13 * 4; c++) {
        int64_t n = lens[c / 4];
        int kind = c % 4;  /* 0 normal, 1 ties, 2 mostly -inf, 3 all -inf */
        for (int64_t i = 0; i < n; i++) x[i] = kind == 3 ? -INFINITY : 8.0f * (rnd() - 0.5f);
        if (kind == 1) x[n / 3] = x[n - 1] = 9.0f;
        if (kind == 2) for (int64_t i = 0; i < n; i++) if (rnd() < 0.9f && i != n / 2) x[i] = -INFINITY;
        edgelm_confidence_t v, s;
        edgelm_set_simd(1); edgelm_confidence(x, n, &v);
        edgelm_set_simd(0); edgelm_confidence(x, n, &s);
        if (v.argmax != s.argmax || !close_to(v.max_prob, s.max_prob, 0) ||
            !close_to(v.entropy, s.entropy, 1e-6f) || !close_to(v.margin, s.margin, 1e-7f)) {
            printf("mismatch n=%lld kind=%d\n", (long long)n, kind); bad = 1;
        }
    }
    edgelm_set_simd(1);
    printf("%s path: %s\n", edgelm_simd_path(), bad ? "FAIL" : "matches scalar");
    return bad || strcmp(edgelm_simd_path(), "neon") != 0;
}
C
"${CCMD[@]}" "${CFLAGS[@]}" -static "$OUT/parity.c" "$OUT"/confidence.o "$OUT"/accept.o -lm -o "$OUT/parity"
qemu-aarch64 "$OUT/parity"
