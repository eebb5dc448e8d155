"""Quantization through llama.cpp's own quantizer (`llama_model_quantize`).

f32/f16/bf16/q8_0 are written directly by the exporter; every other type is
produced here from such a GGUF, so the bits are exactly what llama-quantize
would write.
"""
from __future__ import annotations

import ctypes
import os
import re
import time
from pathlib import Path

import llama_cpp as lib

from edgelm.errors import ConversionError
from edgelm.gguf_reader import read_gguf

from .export import atomic_path

# name -> llama_ftype
QUANT_TYPES = {
    "f32": 0, "f16": 1, "bf16": 32, "q8_0": 7,
    "q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9,
    "q2_k": 10, "q2_k_s": 21, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13,
    "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18,
    "iq1_s": 24, "iq1_m": 31, "iq2_xxs": 19, "iq2_xs": 20, "iq2_s": 28, "iq2_m": 29,
    "iq3_xxs": 23, "iq3_xs": 22, "iq3_s": 26, "iq3_m": 27, "iq4_nl": 25, "iq4_xs": 30,
    "tq1_0": 36, "tq2_0": 37,
}
# Types whose tensors llama.cpp refuses to quantize without an importance matrix.
NEEDS_IMATRIX = {"iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "q2_k_s"}
# ggml_type ids for per-tensor overrides (--tensor-type PATTERN=TYPE)
GGML_TYPE_IDS = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q2_k": 10, "q3_k": 11,
    "q4_k": 12, "q5_k": 13, "q6_k": 14, "iq2_xxs": 16, "iq2_xs": 17, "iq3_xxs": 18, "iq1_s": 19, "iq4_nl": 20,
    "iq3_s": 21, "iq2_s": 22, "iq4_xs": 23, "iq1_m": 29, "bf16": 30, "tq1_0": 34, "tq2_0": 35,
}


def parse_tensor_types(specs: list[str] | None) -> dict[str, str]:
    """["blk\\.0\\..*=q8_0", ...] -> {pattern: type}, validated."""
    out: dict[str, str] = {}
    for spec in specs or []:
        pattern, sep, qtype = spec.rpartition("=")
        if not sep or not pattern:
            raise ConversionError(f"--tensor-type {spec!r}: expected PATTERN=TYPE")
        qtype = qtype.lower()
        if qtype not in GGML_TYPE_IDS:
            raise ConversionError(f"--tensor-type {spec!r}: unknown type {qtype!r}; known: {', '.join(GGML_TYPE_IDS)}")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConversionError(f"--tensor-type {spec!r}: bad pattern: {e}") from None
        out[pattern] = qtype
    return out


def quantize(
    src: str | Path,
    out: str | Path,
    qtype: str,
    *,
    tensor_types: dict[str, str] | None = None,
    imatrix: dict[str, "object"] | None = None,  # tensor name -> float32 array of ne0 values
    nthread: int = 0,
) -> float:
    """Quantize GGUF `src` into `out` (atomically). Returns the seconds taken."""
    qtype = qtype.lower()
    if qtype not in QUANT_TYPES:
        raise ConversionError(f"unknown quantization type {qtype!r}; known: {', '.join(QUANT_TYPES)}")
    if qtype in NEEDS_IMATRIX and not imatrix:
        raise ConversionError(f"{qtype} needs an importance matrix (--imatrix auto or --imatrix FILE)")
    read_gguf(src)  # llama.cpp must never see a malformed file
    from edgelm.runtime.backend import ensure_backend

    ensure_backend()
    params = lib.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[qtype]
    params.nthread = nthread
    keep = []  # ctypes buffers referenced by params must outlive the call
    if tensor_types:
        arr = (lib.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (pattern, t) in enumerate(tensor_types.items()):
            name = pattern.encode()
            keep.append(name)
            arr[i].pattern, arr[i].type = name, GGML_TYPE_IDS[t]
        arr[len(tensor_types)].pattern = None
        params.tt_overrides = arr
        keep.append(arr)
    if imatrix:
        import numpy as np

        arr = (lib.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            data = np.ascontiguousarray(values, dtype=np.float32)
            keep += [data, name.encode()]
            arr[i].name = keep[-1]
            arr[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = data.size
        arr[len(imatrix)].name = None
        params.imatrix = arr
        keep.append(arr)
    t0 = time.perf_counter()
    with atomic_path(Path(out)) as tmp:
        rc = lib.llama_model_quantize(os.fsencode(src), os.fsencode(tmp), ctypes.byref(params))
        if rc != 0:
            raise ConversionError(f"llama.cpp could not quantize {src} to {qtype} (run with --verbose for its log)")
    return time.perf_counter() - t0
