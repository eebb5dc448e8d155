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
SOURCES = ["confidence.c", "accept.c", "capture.c"]

HEADER = NATIVE / "edgelm_native.h"
# The cdef is the header itself, less its preprocessor lines (cffi strips the comments).
CDEF = "\n".join(line for line in HEADER.read_text().splitlines() if not line.lstrip().startswith("#"))

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "edgelm._native",
    '#include "edgelm_native.h"',
    # absolute: cffi's compile() chdirs into its tmpdir, pip builds from the root
    sources=[str(NATIVE / name) for name in SOURCES],
    include_dirs=[str(NATIVE)],
    depends=[str(HEADER)],
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
