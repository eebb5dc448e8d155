"""A read-only view of ggml's tensor struct, for eval callbacks (importance matrix, early exit).

The layout mirrors `struct ggml_tensor` in ggml.h of the pinned llama.cpp; `check_layout()`
compares its size with ggml's own figure so a version bump that changes it fails loudly.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

import llama_cpp

GGML_MAX_DIMS, GGML_MAX_OP_PARAMS, GGML_MAX_SRC, GGML_MAX_NAME = 4, 64, 10, 64
GGML_TYPE_F32 = 0
_GGML_OBJECT_SIZE = 32  # struct ggml_object: offs, size, next, type, padding[4]


class GGMLTensor(ctypes.Structure):
    pass


GGMLTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * GGML_MAX_DIMS),  # elements per dim, ne[0] innermost
    ("nb", ctypes.c_size_t * GGML_MAX_DIMS),  # stride in bytes per dim
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GGMLTensor) * GGML_MAX_SRC),
    ("view_src", ctypes.POINTER(GGMLTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * GGML_MAX_NAME),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]


@lru_cache(maxsize=1)
def libggml() -> ctypes.CDLL:
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    lib = ctypes.CDLL(str(next(lib_dir.glob("libggml-base.so*"))))
    lib.ggml_op_name.restype, lib.ggml_op_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
    lib.ggml_tensor_overhead.restype, lib.ggml_tensor_overhead.argtypes = ctypes.c_size_t, []
    lib.ggml_nbytes.restype, lib.ggml_nbytes.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
    lib.ggml_backend_buffer_is_host.restype = ctypes.c_bool
    lib.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return lib


def check_layout() -> None:
    expected = libggml().ggml_tensor_overhead() - _GGML_OBJECT_SIZE
    if ctypes.sizeof(GGMLTensor) != expected:
        raise RuntimeError(f"ggml_tensor layout changed: {ctypes.sizeof(GGMLTensor)} bytes here, {expected} in ggml")


@lru_cache(maxsize=None)
def op_id(name: str) -> int:
    """The enum ggml_op value of an op name such as "MUL_MAT", looked up in the library itself."""
    lib = libggml()
    for i in range(256):
        op = lib.ggml_op_name(i)
        if op is None:
            break
        if op.decode() == name:
            return i
    raise RuntimeError(f"ggml has no op named {name}")


def read_rows(t: GGMLTensor, address: int) -> "object":
    """The tensor's data as a float32 array (ne[1]*ne[2]*ne[3], ne[0]), copied off device memory if needed."""
    import numpy as np

    lib = libggml()
    n = lib.ggml_nbytes(address)
    if lib.ggml_backend_buffer_is_host(t.buffer):
        buf = (ctypes.c_char * n).from_address(t.data)
        raw = np.frombuffer(buf, dtype=np.uint8)
    else:
        raw = np.empty(n, dtype=np.uint8)
        lib.ggml_backend_tensor_get(address, raw.ctypes.data, 0, n)
    rows = int(t.ne[1]) * int(t.ne[2]) * int(t.ne[3])
    if t.nb[1] == t.ne[0] * 4:  # contiguous rows
        return raw.view(np.float32).reshape(rows, int(t.ne[0]))
    # strided rows (views): gather row by row
    out = np.empty((rows, int(t.ne[0])), dtype=np.float32)
    r = 0
    for i3 in range(int(t.ne[3])):
        for i2 in range(int(t.ne[2])):
            for i1 in range(int(t.ne[1])):
                off = i1 * t.nb[1] + i2 * t.nb[2] + i3 * t.nb[3]
                out[r] = raw[off:off + 4 * int(t.ne[0])].view(np.float32)
                r += 1
    return out
