"""Writing GGUF files: tensor encodings and the atomic, streaming writer.

Tensors are encoded one at a time as the writer reaches them, and large ones a
block of rows at a time, so peak memory is about one source tensor as stored plus
a chunk's float32 copy and encoding, whatever the model's size.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import gguf
import numpy as np

from edgelm import fsutil
from edgelm.errors import ConversionError

Q = gguf.GGMLQuantizationType
OUTTYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}


def tensor_type(name: str, shape: tuple[int, ...], outtype: str) -> Q:
    """The stored type of one tensor: vectors stay f32, as llama.cpp expects of norms."""
    if len(shape) < 2 or outtype == "f32":
        return Q.F32
    qtype = OUTTYPES[outtype]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:  # rows that do not fill whole blocks fall back to f16
        return Q.F16
    return qtype


def encode(array: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(array, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)


def encoded_nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape, dtype=np.int64))
    return n // block * type_size


CHUNK_ELEMENTS = 1 << 24  # rows per chunk: 16M elements, a 64 MB float32 copy


@dataclass(frozen=True)
class PlannedTensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order (rows, cols)
    qtype: Q
    load: Callable[[], np.ndarray]  # float32 source, transformed
    load_rows: Callable[[int, int], np.ndarray] | None = None  # rows [lo, hi) as float32, for untransformed tensors
    release: Callable[[], None] | None = None  # drop the source's pages once written

    def chunks(self) -> Iterator[np.ndarray]:
        """The encoded tensor, in blocks of whole rows (alignment-safe: each block but the last is 32-row aligned)."""
        rows = self.shape[0] if self.shape else 1
        step = max(32, CHUNK_ELEMENTS // max(1, int(np.prod(self.shape[1:], dtype=np.int64))) // 32 * 32)
        if self.load_rows is None or len(self.shape) < 2 or rows <= step:
            data = self.load()
            if data.shape != self.shape:
                raise ConversionError(f"tensor {self.name}: shape {list(data.shape)}, expected {list(self.shape)}")
            yield encode(data, self.qtype)
            return
        for lo in range(0, rows, step):
            yield encode(self.load_rows(lo, min(rows, lo + step)), self.qtype)


def _add_metadata(writer: gguf.GGUFWriter, metadata: dict[str, object]) -> None:
    for key, value in metadata.items():
        if key == "general.architecture":
            continue  # GGUFWriter writes it from its arch argument
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value) if 0 <= value < 2**32 else writer.add_int64(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, (list, tuple)):
            writer.add_array(key, list(value))
        else:
            raise TypeError(f"metadata {key}: unsupported value type {type(value).__name__}")


@contextlib.contextmanager
def atomic_path(out: Path) -> Iterator[Path]:
    """Yield a temporary path beside `out`; rename it over `out` only on success."""
    out = Path(out)
    if not out.parent.is_dir():
        raise ConversionError(f"{out}: output folder does not exist")
    if not os.access(out.parent, os.W_OK):
        raise ConversionError(f"{out}: output folder is not writable")
    with fsutil.atomic_path(out) as tmp:
        yield tmp


def check_new_folder(out: Path, allowed: tuple[str, ...] = ()) -> None:
    """`out` must not exist, or be a folder holding nothing but `allowed` names (a run's own checkpoint)."""
    if out.exists() and (not out.is_dir() or any(p.name not in allowed for p in out.iterdir())):
        raise ConversionError(f"{out}: already exists and is not empty; choose a new folder")
    if not out.parent.is_dir():
        raise ConversionError(f"{out}: output folder {out.parent} does not exist")


@contextlib.contextmanager
def atomic_folder(out: Path, allowed: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; it becomes `out` (replacing what `allowed` let stay there) only
    if the block succeeds, so a checkpoint folder appears complete or not at all."""
    out = Path(out)
    check_new_folder(out, allowed)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=fsutil.TMP_SUFFIX))  # 0700
    try:
        yield tmp
        tmp.chmod(fsutil.public_mode(0o777))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        fsutil.fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_gguf(
    out: Path,
    arch: str,
    metadata: dict[str, object],
    tensors: list[PlannedTensor],
    progress: Callable[[PlannedTensor], None] | None = None,
) -> int:
    """Write a GGUF atomically, encoding tensors one by one. Returns the file size."""
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        _add_metadata(writer, metadata)
        for t in tensors:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), encoded_nbytes(t.shape, t.qtype), raw_dtype=t.qtype)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            f = writer.fout[0]
            for t in tensors:  # the data layout GGUFWriter planned: each tensor at the next aligned offset
                writer.write_padding(f, f.tell())
                n = 0
                for block in t.chunks():
                    block.tofile(f)
                    n += block.nbytes
                if n != encoded_nbytes(t.shape, t.qtype):
                    raise ConversionError(f"tensor {t.name}: encoded {n} bytes, planned {encoded_nbytes(t.shape, t.qtype)}")
                writer.write_padding(f, n)
                if t.release:
                    t.release()
                if progress:
                    progress(t)
        except OSError as e:
            raise ConversionError(f"{out}: write failed: {e.strerror or e}") from None
        finally:
            writer.close()
        return tmp.stat().st_size
