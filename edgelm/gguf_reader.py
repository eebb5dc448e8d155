"""Strict GGUF v2/v3 reader: validates a file before llama.cpp ever opens it.

llama.cpp aborts the whole process (GGML_ASSERT) on some malformed files, so every
GGUF passes through `read_gguf` first. It reads only the header, the metadata and
the tensor infos (never the tensor data), mirrors the checks of llama.cpp's
gguf.cpp (0.3.36) and adds the bounds checks it lacks: every count and length is
bounded by what is left of the file before anything is allocated.

Layout (little-endian): magic "GGUF", u32 version, i64 n_tensors, i64 n_kv,
n_kv x (string key, i32 type, value), n_tensors x (string name, u32 n_dims,
n_dims x i64 ne, i32 ggml type, u64 offset), padding to `alignment`, data.
A string is a u64 byte length followed by UTF-8 bytes.
"""
from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from functools import cached_property
from typing import Any, BinaryIO, Callable

from edgelm.errors import GGUFError, ModelNotFoundError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v2 and v3 share one layout; v3 only added big-endian files
DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64  # ggml's name buffer, NUL included: names of 64+ bytes are rejected
GGUF_MAX_STRING_LENGTH = 1 << 30  # gguf.cpp's own caps
GGUF_MAX_ARRAY_ELEMENTS = 1 << 30
INT64_MAX = (1 << 63) - 1
DEFAULT_MAX_METADATA_BYTES = 64 << 20  # the largest real tokenizers (256K vocab) take ~10 MB

# Smallest possible encodings, used to bound counts by the bytes left in the file.
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, 1-byte key, value type, 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset


@dataclass(frozen=True)
class GGMLType:
    name: str
    block_size: int  # elements per block
    type_size: int  # bytes per block


# ggml's type traits as of llama.cpp in llama-cpp-python 0.3.36 (ggml.c, ggml-common.h).
GGML_TYPES: dict[int, GGMLType] = {
    0: GGMLType("f32", 1, 4),
    1: GGMLType("f16", 1, 2),
    2: GGMLType("q4_0", 32, 18),
    3: GGMLType("q4_1", 32, 20),
    6: GGMLType("q5_0", 32, 22),
    7: GGMLType("q5_1", 32, 24),
    8: GGMLType("q8_0", 32, 34),
    9: GGMLType("q8_1", 32, 36),
    10: GGMLType("q2_K", 256, 84),
    11: GGMLType("q3_K", 256, 110),
    12: GGMLType("q4_K", 256, 144),
    13: GGMLType("q5_K", 256, 176),
    14: GGMLType("q6_K", 256, 210),
    15: GGMLType("q8_K", 256, 292),
    16: GGMLType("iq2_xxs", 256, 66),
    17: GGMLType("iq2_xs", 256, 74),
    18: GGMLType("iq3_xxs", 256, 98),
    19: GGMLType("iq1_s", 256, 50),
    20: GGMLType("iq4_nl", 32, 18),
    21: GGMLType("iq3_s", 256, 110),
    22: GGMLType("iq2_s", 256, 82),
    23: GGMLType("iq4_xs", 256, 136),
    24: GGMLType("i8", 1, 1),
    25: GGMLType("i16", 1, 2),
    26: GGMLType("i32", 1, 4),
    27: GGMLType("i64", 1, 8),
    28: GGMLType("f64", 1, 8),
    29: GGMLType("iq1_m", 256, 56),
    30: GGMLType("bf16", 1, 2),
    34: GGMLType("tq1_0", 256, 54),
    35: GGMLType("tq2_0", 256, 66),
    39: GGMLType("mxfp4", 32, 17),
    40: GGMLType("nvfp4", 64, 36),
    41: GGMLType("q1_0", 128, 18),
    42: GGMLType("q2_0", 64, 18),
}
# Ids ggml still reserves but can no longer load (block size 0 in its traits).
REMOVED_GGML_TYPES: dict[int, str] = {
    4: "q4_2", 5: "q4_3", 31: "q4_0_4_4", 32: "q4_0_4_8", 33: "q4_0_8_8",
    36: "iq4_nl_4_4", 37: "iq4_nl_4_8", 38: "iq4_nl_8_8",
}

# GGUF value types: id -> (name, struct code); strings and arrays have no fixed size.
VALUE_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("uint8", "B"), 1: ("int8", "b"), 2: ("uint16", "H"), 3: ("int16", "h"),
    4: ("uint32", "I"), 5: ("int32", "i"), 6: ("float32", "f"), 7: ("bool", "b"),
    8: ("string", None), 9: ("array", None), 10: ("uint64", "Q"), 11: ("int64", "q"),
    12: ("float64", "d"),
}
_STRING, _ARRAY, _BOOL = 8, 9, 7
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: ne0 (the contiguous row) first
    ggml_type: int
    type_name: str
    offset: int  # relative to GGUFFile.data_offset
    n_elements: int
    n_bytes: int


@dataclass
class GGUFFile:
    path: str
    version: int
    alignment: int
    metadata: dict[str, Any]
    metadata_types: dict[str, str]  # "uint32", "string", "array[float32]", ...
    tensors: list[TensorInfo]
    data_offset: int  # absolute start of the tensor data section
    file_size: int

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def n_parameters(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def n_tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    def bytes_by_type(self) -> dict[str, int]:
        """Tensor bytes per ggml type name, largest first."""
        totals: dict[str, int] = {}
        for t in self.tensors:
            totals[t.type_name] = totals.get(t.type_name, 0) + t.n_bytes
        return dict(sorted(totals.items(), key=lambda kv: (-kv[1], kv[0])))

    @cached_property
    def _by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def tensor_bytes(self, t: TensorInfo) -> bytes:
        """The tensor's stored bytes (any ggml type), read from the file."""
        with open(self.path, "rb") as f:
            f.seek(self.data_offset + t.offset)
            return f.read(t.n_bytes)

    def fingerprint(self) -> str:
        """What edgelm identifies a model by (caches key their entries by it, early-exit splits name their
        source with it): sha256 of the header, metadata and tensor table, and of samples of every tensor's
        data (its first, middle and last FINGERPRINT_SAMPLE bytes). The samples tell apart two files of one
        layout with different weights (retrained, or quantized with another importance matrix), which the
        header alone cannot; reading them costs milliseconds even for a large model."""
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            h.update(f.read(self.data_offset))
            for t in self.tensors:
                start = self.data_offset + t.offset
                for at in sorted({0, max(0, t.n_bytes // 2 - FINGERPRINT_SAMPLE // 2),
                                  max(0, t.n_bytes - FINGERPRINT_SAMPLE)}):
                    f.seek(start + at)
                    h.update(f.read(min(FINGERPRINT_SAMPLE, t.n_bytes - at)))
        return h.hexdigest()


FINGERPRINT_SAMPLE = 4096


class _Cursor:
    """Buffered, bounds-checked reads; `where` names the item being read for errors."""

    def __init__(self, f: BinaryIO, path: str, file_size: int, max_metadata_bytes: int):
        self.f, self.path, self.file_size = f, path, file_size
        self.budget = max_metadata_bytes
        self.pos = 0
        self.where = "header"

    def fail(self, message: str) -> GGUFError:
        return GGUFError(f"{self.path}: {message}")

    @property
    def remaining(self) -> int:
        return self.file_size - self.pos

    def need(self, n: int, what: str) -> None:
        """Refuse a read of n bytes before allocating anything for it."""
        if n > self.remaining:
            raise self.fail(f"truncated: {what} runs past end of file ({self.file_size} bytes)")
        if self.pos + n > self.budget:
            raise self.fail(
                f"{what} ends past max_metadata_bytes={self.budget}; "
                "the metadata section is too large (raise the limit if the file is trusted)"
            )

    def take(self, n: int) -> bytes:
        self.need(n, self.where)
        data = self.f.read(n)
        if len(data) != n:  # the file shrank under us
            raise self.fail(f"truncated: {self.where} runs past end of file")
        self.pos += n
        return data

    def unpack(self, code: str) -> Any:
        fmt = "<" + code
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self, what: str) -> str:
        return self.strings(1, lambda _: what)[0]

    def strings(self, n: int, label: Callable[[int], str], keep: bool = True) -> list[str] | None:
        """n strings in a row (None when not kept), each checked as llama.cpp reads it (length cap, inside the
        file and the metadata budget, UTF-8), in one tight loop: a tokenizer's vocabulary is 10^4 to 10^5 of
        them. label(j) names string j in errors."""
        read, limit, pos = self.f.read, min(self.file_size, self.budget), self.pos
        raws = []
        for j in range(n):
            if pos + 8 > limit:  # need() raises: past the end or the budget
                self.pos = pos
                self.need(8, self.where)
            head = read(8)
            if len(head) != 8:
                break  # the file shrank under us
            (size,) = _U64.unpack(head)
            if size > GGUF_MAX_STRING_LENGTH:
                raise self.fail(f"{label(j)}: string length {size} exceeds llama.cpp's limit of "
                                f"{GGUF_MAX_STRING_LENGTH}")
            pos += 8
            if pos + size > limit:
                self.pos = pos
                self.need(size, f"{label(j)} (string of {size} bytes)")
            raw = read(size)
            if len(raw) != size:
                break
            pos += size
            raws.append(raw)
        if len(raws) != n:
            raise self.fail(f"truncated: {label(len(raws))} runs past end of file")
        self.pos = pos
        try:
            if keep:
                return [raw.decode("utf-8") for raw in raws]
            b"\x00".join(raws).decode("utf-8")  # NUL between them: no two strings' bytes can pair up
            return None
        except UnicodeDecodeError:
            for j, raw in enumerate(raws):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise self.fail(f"{label(j)}: string is not valid UTF-8 ({e.reason} at byte {e.start})") from None
            raise


def read_gguf(
    path: str | os.PathLike[str],
    *,
    max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES,
    check_data: bool = True,
    keep_arrays: bool = True,
) -> GGUFFile:
    """Parse and validate a GGUF file's header, metadata and tensor infos.

    check_data=False skips the checks that need the data section to be present
    (useful on a partial download); the layout checks still run.
    keep_arrays=False validates array values as usual but keeps only a SkippedArray (type and length) in
    their place: a tokenizer's arrays are tens of thousands of Python objects, which a caller that only
    needs the scalars, tensor table or data offset need not hold.
    """
    path_s = os.fspath(path)
    try:
        file_size = os.stat(path_s).st_size
        f = open(path_s, "rb", buffering=1 << 16)
    except FileNotFoundError:
        raise ModelNotFoundError(f"{path_s}: no such file") from None
    except OSError as e:
        raise GGUFError(f"{path_s}: cannot read ({e.strerror or e})") from None
    with f:
        cur = _Cursor(f, path_s, file_size, max_metadata_bytes)
        version, n_tensors, n_kv = _read_header(cur)
        metadata, types = _read_metadata(cur, n_kv, keep_arrays)
        alignment = _alignment(cur, metadata, types)
        tensors = _read_tensor_infos(cur, n_tensors)
        # gguf.cpp pads to the alignment only when there is tensor data to align.
        data_offset = _pad(cur.pos, alignment) if n_tensors else cur.pos
    _check_layout(cur, tensors, alignment, data_offset, check_data)
    return GGUFFile(path_s, version, alignment, metadata, types, tensors, data_offset, file_size)


def _pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _read_header(cur: _Cursor) -> tuple[int, int, int]:
    if cur.file_size < 4:
        what = "empty file" if cur.file_size == 0 else f"only {cur.file_size} bytes"
        raise cur.fail(f"not a GGUF file ({what})")
    magic = cur.take(4)
    if magic != GGUF_MAGIC:
        raise cur.fail(f"not a GGUF file (magic {magic!r})")
    version = cur.unpack("I")
    if version == 0:
        raise cur.fail("bad GGUF version 0")
    if version & 0xFFFF == 0:  # a v2/v3 file written on a big-endian host reads as 0x0N000000
        raise cur.fail(f"GGUF version {version:#x} looks byte-swapped: big-endian GGUF files are not supported")
    if version == 1:
        raise cur.fail("GGUF v1 is no longer supported by llama.cpp; re-convert the model to v3")
    if version not in SUPPORTED_VERSIONS:
        raise cur.fail(f"unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors, n_kv = cur.unpack("q"), cur.unpack("q")
    counts = (("tensor count", n_tensors, _MIN_TENSOR_INFO_BYTES), ("key-value count", n_kv, _MIN_KV_BYTES))
    for what, n, min_size in counts:
        if n < 0:
            raise cur.fail(f"{what} {n} is negative")
        if n * min_size > cur.remaining:
            raise cur.fail(f"{what} {n} cannot fit in the {cur.remaining} bytes left in the file")
    if n_tensors * _MIN_TENSOR_INFO_BYTES + n_kv * _MIN_KV_BYTES > cur.remaining:
        raise cur.fail(f"{n_kv} key-values and {n_tensors} tensor infos cannot fit in the {cur.remaining} bytes left")
    return version, n_tensors, n_kv


def _read_metadata(cur: _Cursor, n_kv: int, keep_arrays: bool = True) -> tuple[dict[str, Any], dict[str, str]]:
    metadata: dict[str, Any] = {}
    types: dict[str, str] = {}
    for i in range(n_kv):
        cur.where = f"key-value {i} of {n_kv}"
        key = cur.string(cur.where)
        if not key:
            raise cur.fail(f"{cur.where}: empty key")
        if key in metadata:
            raise cur.fail(f"duplicate key {key!r} ({cur.where})")
        cur.where = f"key-value {i} of {n_kv} ({key!r})"
        metadata[key], types[key] = _read_value(cur, key, keep_arrays)
    return metadata, types


def _value_type(cur: _Cursor, key: str, code: int, *, element: bool = False) -> tuple[str, str | None]:
    if element and code == _ARRAY:
        raise cur.fail(f"key {key!r} is a nested array (array of arrays), which llama.cpp rejects")
    if code not in VALUE_TYPES:
        raise cur.fail(f"key {key!r} has unknown {'array element' if element else 'value'} type {code}")
    return VALUE_TYPES[code]


@dataclass(frozen=True)
class SkippedArray:
    """An array value read with keep_arrays=False: validated, not kept."""

    element_type: str
    length: int


def _read_value(cur: _Cursor, key: str, keep_arrays: bool = True) -> tuple[Any, str]:
    code = cur.unpack("i")
    name, fmt = _value_type(cur, key, code)
    if code == _STRING:
        return cur.string(cur.where), name
    if code != _ARRAY:
        value = cur.unpack(fmt)
        return (value != 0 if code == _BOOL else value), name  # gguf.cpp: any non-zero byte is true

    elem_code = cur.unpack("i")
    elem_name, elem_fmt = _value_type(cur, key, elem_code, element=True)
    n = cur.unpack("Q")
    elem_min = 8 if elem_code == _STRING else struct.calcsize("<" + elem_fmt)
    if n > GGUF_MAX_ARRAY_ELEMENTS:
        raise cur.fail(f"key {key!r}: array length {n} exceeds llama.cpp's limit of {GGUF_MAX_ARRAY_ELEMENTS}")
    if n * elem_min > cur.remaining:
        raise cur.fail(f"key {key!r}: array length {n} cannot fit in the {cur.remaining} bytes left in the file")
    element = lambda j: f"key {key!r} element {j} of {n}"  # noqa: E731 (made only for an error)
    if not keep_arrays:
        if elem_code == _STRING:
            cur.strings(n, element, keep=False)
        else:
            cur.take(n * elem_min)
        return SkippedArray(elem_name, n), f"array[{elem_name}]"
    if elem_code == _STRING:
        values = cur.strings(n, element)
    else:
        values = list(struct.unpack(f"<{n}{elem_fmt}", cur.take(n * elem_min)))
        if elem_code == _BOOL:
            values = [v != 0 for v in values]
    return values, f"array[{elem_name}]"


def _alignment(cur: _Cursor, metadata: dict[str, Any], types: dict[str, str]) -> int:
    key = "general.alignment"
    if key not in metadata:
        return DEFAULT_ALIGNMENT
    if types[key] != "uint32":
        raise cur.fail(f"{key} must be of type uint32 but is {types[key]}")
    alignment = metadata[key]
    if alignment == 0 or alignment & (alignment - 1):
        raise cur.fail(f"{key} is {alignment}, not a power of two")
    return alignment


def _read_tensor_infos(cur: _Cursor, n_tensors: int) -> list[TensorInfo]:
    tensors: list[TensorInfo] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        cur.where = f"tensor info {i} of {n_tensors}"
        name = cur.string(cur.where)
        if len(name.encode()) >= GGML_MAX_NAME:
            raise cur.fail(
                f"tensor name {name!r} is too long ({len(name.encode())} bytes, llama.cpp allows {GGML_MAX_NAME - 1})"
            )
        if name in seen:
            raise cur.fail(f"duplicate tensor name {name!r} ({cur.where})")
        seen.add(name)
        cur.where = f"tensor info {i} of {n_tensors} ({name!r})"
        tensors.append(_read_tensor_info(cur, name))
    return tensors


def _read_tensor_info(cur: _Cursor, name: str) -> TensorInfo:
    n_dims = cur.unpack("I")
    if not 1 <= n_dims <= GGML_MAX_DIMS:
        raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (must be 1..{GGML_MAX_DIMS})")
    shape = tuple(cur.unpack("q") for _ in range(n_dims))
    # gguf.cpp accepts empty (0) dims, but llama.cpp asserts every weight dim is >= 1.
    for j, ne in enumerate(shape):
        if ne < 1:
            raise cur.fail(f"tensor {name!r} dimension {j} is {ne} (must be >= 1)")
    n_elements = 1
    for ne in shape:
        n_elements *= ne
    if n_elements > INT64_MAX:
        raise cur.fail(f"tensor {name!r} shape {shape} overflows int64 ({n_elements} elements)")

    code = cur.unpack("i")
    if code in REMOVED_GGML_TYPES:
        removed = REMOVED_GGML_TYPES[code]
        raise cur.fail(f"tensor {name!r} uses removed ggml type {code} ({removed}); re-quantize the model")
    if code not in GGML_TYPES:
        raise cur.fail(f"tensor {name!r} has unknown ggml type {code}")
    gtype = GGML_TYPES[code]
    if shape[0] % gtype.block_size:
        raise cur.fail(
            f"tensor {name!r} of type {gtype.name} has {shape[0]} elements per row, "
            f"not a multiple of the block size {gtype.block_size}"
        )
    offset = cur.unpack("Q")
    n_bytes = n_elements // gtype.block_size * gtype.type_size
    return TensorInfo(name, shape, code, gtype.name, offset, n_elements, n_bytes)


def _check_layout(cur: _Cursor, tensors: list[TensorInfo], alignment: int, data_offset: int, check_data: bool) -> None:
    """gguf.cpp wants each tensor exactly where the previous one ends, padded to the alignment."""
    if check_data and tensors and data_offset > cur.file_size:
        raise cur.fail(f"truncated: data section starts at {data_offset}, past end of file ({cur.file_size} bytes)")
    expected = 0
    for i, t in enumerate(tensors):
        start, end = data_offset + t.offset, data_offset + t.offset + t.n_bytes
        if t.offset % alignment:
            raise cur.fail(f"tensor {t.name!r} offset {t.offset} is not a multiple of the alignment {alignment}")
        if check_data and end > cur.file_size:
            raise cur.fail(
                f"truncated: tensor {i} of {len(tensors)} ({t.name!r}) data [{start}, {end}) "
                f"runs past end of file ({cur.file_size} bytes)"
            )
        if t.offset < expected:
            t_end = t.offset + t.n_bytes
            other = next((o for o in tensors[:i] if o.offset < t_end and t.offset < o.offset + o.n_bytes), None)
            with_what = f"tensor {other.name!r}" if other else "an earlier tensor"
            raise cur.fail(f"tensor {t.name!r} data at offset {t.offset} overlaps {with_what}")
        if t.offset > expected:
            raise cur.fail(
                f"tensor {t.name!r} has offset {t.offset}, expected {expected}: "
                "llama.cpp requires tensor data packed in tensor-info order"
            )
        expected += _pad(t.n_bytes, alignment)


def format_count(n: int, *, label: bool = False) -> str:
    """Parameter counts the way model cards write them: 292.8K, 21.9M, 7.2B.

    label=True gives general.size_label's style: no decimal from 10 up (17M, 1.5B).
    """
    for scale, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if n >= scale:
            digits = 0 if label and n / scale >= 10 else 1
            return f"{n / scale:.{digits}f}{suffix}"
    return str(n)
