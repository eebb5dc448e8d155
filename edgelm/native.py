"""Python face of the native kernels (native/*.c, built as edgelm._native).

Arrays are handed to C without copies, so they must already have the
kernel's dtype (float32 rows, int32 ids, float64 uniforms) and be C-contiguous;
anything else is a ValueError naming the argument, never a silent copy on the
decode path. numpy references with the same signatures live in native_ref.
"""
from __future__ import annotations

import contextlib
import ctypes
from typing import Iterator

import numpy as np

from .errors import NativeError
from .native_ref import Confidence

try:
    from . import _native
except ImportError as exc:  # not built: fail at first use, not at import
    _native = None
    _IMPORT_ERROR = str(exc)

_INT32_MAX = 2**31 - 1  # argmax and token ids are int32 in C

__all__ = [
    "Confidence",
    "available",
    "Capture",
    "confidence",
    "force_scalar",
    "greedy_accept",
    "residual_sample",
    "set_simd",
    "simd_path",
    "speculative_accept",
]


def available() -> bool:
    """True if the compiled extension imports."""
    return _native is not None


def _lib():
    if _native is None:
        raise NativeError(
            f"edgelm native kernels are not built ({_IMPORT_ERROR}); "
            "run `pip install -e .` or `python native/build_native.py`"
        )
    return _native.ffi, _native.lib


def _check(name: str, arr, dtype, ndims: tuple[int, ...]) -> np.ndarray:
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(arr).__name__}")
    if arr.dtype != dtype:
        raise ValueError(f"{name} must have dtype {np.dtype(dtype).name}, got {arr.dtype}")
    if arr.ndim not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name} must be {want}, got shape {arr.shape}")
    if not (arr.flags.c_contiguous and arr.flags.aligned):
        raise ValueError(f"{name} must be C-contiguous and aligned (np.ascontiguousarray)")
    return arr


def _ptr(ffi, ctype: str, arr: np.ndarray):
    return ffi.from_buffer(ctype, arr)


# ----------------------------------------------------------------------------
# SIMD dispatch


def simd_path() -> str:
    """Active kernel path: "scalar", "avx2" or "neon"."""
    ffi, lib = _lib()
    return ffi.string(lib.edgelm_simd_path()).decode()


def set_simd(enable: bool) -> None:
    """enable=False forces the scalar path; True restores the best path the CPU has."""
    _lib()[1].edgelm_set_simd(1 if enable else 0)


@contextlib.contextmanager
def force_scalar() -> Iterator[None]:
    """Run the body on the scalar reference path (process-wide, not thread-local)."""
    lib = _lib()[1]
    previous = lib.edgelm_get_simd()
    lib.edgelm_set_simd(0)
    try:
        yield
    finally:
        lib.edgelm_set_simd(previous)


# ----------------------------------------------------------------------------
# Kernel family 1: confidence


def confidence(logits: np.ndarray) -> Confidence:
    """(max_prob, entropy, margin, argmax) of a float32 row (n_vocab,), as Python
    scalars, or of each row of (n_rows, n_vocab), as float32 / int32 arrays."""
    ffi, lib = _lib()
    x = _check("logits", logits, np.float32, (1, 2))
    n_vocab = x.shape[-1]
    if not 1 <= n_vocab <= _INT32_MAX:
        raise ValueError(f"logits must have 1 to {_INT32_MAX} columns, got {n_vocab}")
    if x.ndim == 1:
        out = ffi.new("edgelm_confidence_t *")
        lib.edgelm_confidence(_ptr(ffi, "float[]", x), n_vocab, out)
        return Confidence(float(out.max_prob), float(out.entropy), float(out.margin), int(out.argmax))
    n_rows = x.shape[0]
    max_prob, entropy, margin = (np.empty(n_rows, np.float32) for _ in range(3))
    argmax = np.empty(n_rows, np.int32)
    if n_rows:
        lib.edgelm_confidence_batch(
            _ptr(ffi, "float[]", x), n_rows, n_vocab,
            _ptr(ffi, "float[]", max_prob), _ptr(ffi, "float[]", entropy),
            _ptr(ffi, "float[]", margin), _ptr(ffi, "int32_t[]", argmax),
        )
    return Confidence(max_prob, entropy, margin, argmax)


# ----------------------------------------------------------------------------
# Kernel family 2: speculative decoding acceptance


def greedy_accept(draft: np.ndarray, target: np.ndarray) -> int:
    """Number of draft ids (n,) matching the target's argmax ids (n + 1,) from the start."""
    ffi, lib = _lib()
    d = _check("draft", draft, np.int32, (1,))
    t = _check("target", target, np.int32, (1,))
    if t.shape[0] != d.shape[0] + 1:
        raise ValueError(f"target must have len(draft) + 1 = {d.shape[0] + 1} ids, got {t.shape[0]}")
    return int(lib.edgelm_greedy_accept(_ptr(ffi, "int32_t[]", d), _ptr(ffi, "int32_t[]", t), d.shape[0]))


def speculative_accept(p: np.ndarray, q: np.ndarray, draft: np.ndarray, u: np.ndarray) -> int:
    """Index of the first rejected draft token, len(draft) if all are accepted.

    p, q: float32 (n, n_vocab) target and draft probabilities at each draft
    position; draft: int32 (n,) ids sampled from q; u: float64 (n,) uniforms.
    """
    ffi, lib = _lib()
    p = _check("p", p, np.float32, (2,))
    q = _check("q", q, np.float32, (2,))
    d = _check("draft", draft, np.int32, (1,))
    u = _check("u", u, np.float64, (1,))
    if q.shape != p.shape:
        raise ValueError(f"q must have the shape of p {p.shape}, got {q.shape}")
    if p.shape[0] != d.shape[0]:
        raise ValueError(f"p must have one row per draft token ({d.shape[0]}), got {p.shape[0]}")
    if u.shape != d.shape:
        raise ValueError(f"u must have one number per draft token ({d.shape[0]}), got {u.shape[0]}")
    k = lib.edgelm_speculative_accept(
        _ptr(ffi, "float[]", p), _ptr(ffi, "float[]", q), _ptr(ffi, "int32_t[]", d),
        _ptr(ffi, "double[]", u), d.shape[0], p.shape[1],
    )
    if k < 0:
        raise ValueError(f"draft ids must be in [0, {p.shape[1]}), got {d.min()}..{d.max()}")
    return int(k)


def residual_sample(p: np.ndarray, q: np.ndarray, u: float) -> int:
    """Token drawn from normalize(max(0, p - q)), or from p if that is all zero.

    p, q: float32 (n_vocab,); u: one uniform in [0, 1).
    """
    ffi, lib = _lib()
    p = _check("p", p, np.float32, (1,))
    q = _check("q", q, np.float32, (1,))
    if q.shape != p.shape:
        raise ValueError(f"q must have the shape of p {p.shape}, got {q.shape}")
    if not 0.0 <= u < 1.0:
        raise ValueError(f"u must be in [0, 1), got {u}")
    j = lib.edgelm_residual_sample(_ptr(ffi, "float[]", p), _ptr(ffi, "float[]", q), p.shape[0], float(u))
    if j < 0:
        raise ValueError("p has no probability mass")
    return int(j)


# ----------------------------------------------------------------------------
# Kernel family 3: capture of a graph node during llama_decode


class Capture:
    """A ring buffer that llama.cpp's eval callback fills with one node's rows (native/capture.c).

    Give `callback` and `user_data` to a context (Context(eval_callback=..., eval_user_data=...));
    after each decode, `take(n)` returns the n rows the node produced last, oldest first.
    """

    def __init__(self, target: str, n_embd: int, capacity: int):
        from edgelm.runtime import ggml

        ffi, lib = _lib()
        encoded = target.encode()
        if not 0 < len(encoded) < 64:
            raise ValueError(f"node name must be 1 to 63 bytes, got {target!r}")
        if n_embd < 1 or capacity < 1:
            raise ValueError(f"n_embd and capacity must be positive, got {n_embd}, {capacity}")
        ggml.check_layout()
        g = ggml.libggml()
        self.rows = np.zeros((capacity, n_embd), dtype=np.float32)
        self._state = c = ffi.new("edgelm_capture_t *")
        for name in ("type", "buffer", "ne", "nb", "data", "name"):
            setattr(c, f"off_{name}", getattr(ggml.GGMLTensor, name).offset)
        c.buffer_is_host = ffi.cast("_Bool(*)(void *)", ctypes.cast(g.ggml_backend_buffer_is_host, ctypes.c_void_p).value)
        c.tensor_get = ffi.cast("void(*)(const void *, void *, size_t, size_t)",
                                ctypes.cast(g.ggml_backend_tensor_get, ctypes.c_void_p).value)
        c.target = encoded
        c.rows = ffi.cast("float *", self.rows.ctypes.data)
        c.n_embd, c.capacity = n_embd, capacity
        self.target, self.n_embd, self.capacity = target, n_embd, capacity
        import llama_cpp

        address = int(ffi.cast("uintptr_t", ffi.addressof(lib, "edgelm_capture_eval")))
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(address)
        self.user_data = ctypes.c_void_p(int(ffi.cast("uintptr_t", c)))

    @property
    def head(self) -> int:
        """Rows captured so far."""
        return int(self._state.head)

    @property
    def calls(self) -> int:
        """Nodes captured so far."""
        return int(self._state.calls)

    def check(self) -> None:
        """Raise if the callback met a node it could not capture (then clear the error)."""
        code, self._state.error = int(self._state.error), 0
        if code:
            what = {1: "is not float32", 2: f"is not {self.n_embd} wide", 3: f"has more than {self.capacity} rows",
                    4: "is not 2-D"}.get(code, f"error {code}")
            raise NativeError(f"capture of graph node {self.target}: the node {what}")

    def take(self, n: int, end: int | None = None) -> np.ndarray:
        """A copy of the n rows ending at row `end` (default: the last captured), oldest first."""
        end = self.head if end is None else end
        if not 0 <= n <= min(self.capacity, end) or end > self.head or self.head - (end - n) > self.capacity:
            raise ValueError(f"rows [{end - n}, {end}) are not in the ring (head {self.head}, capacity {self.capacity})")
        idx = np.arange(end - n, end) % self.capacity
        return self.rows[idx]
