"""cffi builder for edgelm._native (out-of-line API mode).

`pip install -e .` runs it through setup.py's `cffi_modules`. Run directly,
`python native/build_native.py` builds in place, so `edgelm/_native*.so` lands
next to the package sources for tests.

No -march=native: the wheel must run on any CPU of its architecture, and
confidence.c picks its SIMD path at runtime.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import cffi

NATIVE = Path(__file__).resolve().parent
ROOT = NATIVE.parent
SOURCES = ["confidence.c", "accept.c"]

# The cdef mirrors edgelm_native.h; the compiler checks the two agree because
# API mode compiles calls against the real header.
CDEF = """
const char *edgelm_simd_path(void);
void edgelm_set_simd(int enable);
int edgelm_get_simd(void);

typedef struct {
    float max_prob;
    float entropy;
    float margin;
    int32_t argmax;
} edgelm_confidence_t;

void edgelm_confidence(const float *logits, int64_t n_vocab, edgelm_confidence_t *out);
void edgelm_confidence_batch(const float *logits, int64_t n_rows, int64_t n_vocab,
                             float *max_prob, float *entropy, float *margin,
                             int32_t *argmax);

int64_t edgelm_greedy_accept(const int32_t *draft, const int32_t *target, int64_t n);
int64_t edgelm_speculative_accept(const float *p, const float *q, const int32_t *draft,
                                  const double *u, int64_t n, int64_t n_vocab);
int32_t edgelm_residual_sample(const float *p, const float *q, int64_t n_vocab, double u);
"""

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "edgelm._native",
    '#include "edgelm_native.h"',
    # absolute: cffi's compile() chdirs into its tmpdir, pip builds from the root
    sources=[str(NATIVE / name) for name in SOURCES],
    include_dirs=[str(NATIVE)],
    depends=[str(NATIVE / "edgelm_native.h")],
    extra_compile_args=["-O3", "-std=c99"],
)


def build_in_place(tmpdir: Path = ROOT / "build" / "native") -> Path:
    """Compile into tmpdir and copy the extension into edgelm/; returns its path."""
    tmpdir.mkdir(parents=True, exist_ok=True)
    built = Path(ffibuilder.compile(tmpdir=str(tmpdir), verbose=False))
    target = ROOT / "edgelm" / built.name
    shutil.copy2(built, target)
    return target


if __name__ == "__main__":
    print(build_in_place())
