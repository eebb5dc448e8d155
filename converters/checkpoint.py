"""A Hugging Face checkpoint on disk: config, tokenizer files and lazily mapped weights.

Safetensors files are parsed here rather than through torch so conversion needs
no torch and touches one tensor at a time: each tensor is a read-only view of a
memory map, turned into float32 only when the exporter asks for it. Pickled
`.bin`/`.pt` weights load only on request (`allow_pickle`), through torch's
`weights_only` unpickler, which refuses anything but tensors and plain containers.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from edgelm.errors import ConversionError

# safetensors dtype -> (numpy dtype of the stored bits, bytes per element)
_DTYPES = {
    "F32": (np.float32, 4),
    "F16": (np.float16, 2),
    "BF16": (np.uint16, 2),  # widened to float32 by shifting into the high half
    "F64": (np.float64, 8),
}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors spec's own bound


@dataclass(frozen=True)
class TensorRef:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in file
    end: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


def _read_safetensors_header(path: Path) -> list[TensorRef]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConversionError(f"{path.name}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise ConversionError(f"{path.name}: truncated or corrupt safetensors header ({n} bytes declared, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{path.name}: corrupt safetensors header: {e}") from None
    base = 8 + n
    refs = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (lo, hi) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        if dtype not in _DTYPES:
            raise ConversionError(f"{path.name}: tensor {name} has unsupported dtype {dtype}")
        ref = TensorRef(name, dtype, shape, path, base + lo, base + hi)
        if ref.end - ref.start != ref.n_elements * _DTYPES[dtype][1]:
            raise ConversionError(f"{path.name}: tensor {name}: byte range does not match shape {list(shape)}")
        if ref.end > size:
            raise ConversionError(
                f"{path.name}: truncated safetensors file: tensor {name} ends at byte {ref.end}, file has {size}"
            )
        refs.append(ref)
    return refs


def read_array(buf, ref: TensorRef, rows: tuple[int, int] | None = None) -> np.ndarray:
    """A tensor, or rows [lo, hi) of it, from the mapped safetensors file `buf` as float32 (a copy)."""
    np_dtype, _ = _DTYPES[ref.dtype]
    raw = np.frombuffer(buf, dtype=np_dtype, count=ref.n_elements, offset=ref.start).reshape(ref.shape)
    if rows is not None:
        raw = raw[rows[0]:rows[1]]
    if ref.dtype == "BF16":  # widen into the high half in place: one 4-byte copy, not two
        wide = raw.astype(np.uint32)
        wide <<= 16
        return wide.view(np.float32)
    return raw.astype(np.float32)


def sha256_files(paths) -> str:
    """sha256 over the files' bytes, in order."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


@dataclass
class Checkpoint:
    """A transformers checkpoint directory."""

    path: Path
    config: dict
    tensors: dict[str, TensorRef]
    _maps: dict[Path, mmap.mmap] = field(default_factory=dict, repr=False)
    _pickled: dict[str, object] = field(default_factory=dict, repr=False)  # name -> torch.Tensor

    @classmethod
    def open(cls, path: str | Path, *, allow_pickle: bool = False) -> "Checkpoint":
        path = Path(path)
        if not path.is_dir():
            raise ConversionError(f"{path}: not a checkpoint directory")
        config_path = path / "config.json"
        if not config_path.is_file():
            raise ConversionError(f"{path}: missing config.json")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ConversionError(f"{config_path}: invalid JSON: {e}") from None
        files = _weight_files(path, allow_pickle)
        tensors: dict[str, TensorRef] = {}
        pickled: dict[str, object] = {}
        for f in files:
            if f.suffix == ".safetensors":
                refs = _read_safetensors_header(f)
            else:
                loaded = _load_pickled(f)
                pickled.update((ref.name, t) for ref, t in loaded)
                refs = [ref for ref, _ in loaded]
            for ref in refs:
                if ref.name in tensors:
                    raise ConversionError(f"{path}: tensor {ref.name} appears in two weight files")
                tensors[ref.name] = ref
        return cls(path, config, tensors, _pickled=pickled)

    def array(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor, or rows [lo, hi) of it, as float32 (a copy: the source stays mapped read-only)."""
        ref = self.tensors.get(name)
        if ref is None:
            raise ConversionError(f"{self.path}: missing tensor {name}")
        if name in self._pickled:
            t = self._pickled[name]
            return (t if rows is None else t[rows[0]:rows[1]]).float().numpy()  # type: ignore[attr-defined]
        return read_array(self._map(ref.file), ref, rows)

    def release(self, name: str) -> None:
        """Drop a tensor's mapped pages from this process's resident set (they stay in the page cache)."""
        ref = self.tensors.get(name)
        mm = self._maps.get(ref.file) if ref else None
        if mm is None or not hasattr(mm, "madvise"):
            return
        start = ref.start - ref.start % mmap.PAGESIZE
        mm.madvise(mmap.MADV_DONTNEED, start, ref.end - start)

    def _map(self, file: Path) -> mmap.mmap:
        mm = self._maps.get(file)
        if mm is None:
            with open(file, "rb") as f:
                mm = self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return mm

    def json_file(self, name: str) -> dict | None:
        p = self.path / name
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(f"{p}: invalid JSON: {e}") from None

    def card(self) -> dict[str, str]:
        """Top-level scalar fields of README.md's YAML front matter (the Hub's model card: license, …)."""
        readme = self.path / "README.md"
        if not readme.is_file():
            return {}
        lines = readme.read_text(encoding="utf-8", errors="replace").splitlines()
        if not lines or lines[0].strip() != "---":
            return {}
        fields = {}
        for line in lines[1:]:
            if line.strip() == "---":
                break
            key, sep, value = line.partition(":")
            if sep and key and not key[0].isspace() and value.strip():
                fields[key.strip()] = value.strip().strip("'\"")
        return fields

    def fingerprint(self) -> str:
        """sha256 of config.json and every weight file: the provenance written into the GGUF."""
        return sha256_files([self.path / "config.json", *sorted({ref.file for ref in self.tensors.values()})])

    def close(self) -> None:
        for mm in self._maps.values():
            mm.close()
        self._maps.clear()
        self._pickled.clear()

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)


def _weight_files(path: Path, allow_pickle: bool) -> list[Path]:
    from .early_exit import EXIT_BLOCKS, EXIT_HEADS

    # trained early-exit norms and blocks beside the model, read by the early-exit split, not here
    files = _indexed(path, "model.safetensors.index.json") or sorted(
        f for f in path.glob("*.safetensors") if f.name not in (EXIT_HEADS, EXIT_BLOCKS))
    if files:
        return files
    pickled = _indexed(path, "pytorch_model.bin.index.json") or sorted([*path.glob("*.bin"), *path.glob("*.pt")])
    if pickled and not allow_pickle:
        raise ConversionError(
            f"{path}: only pickled weights ({pickled[0].name}); pass --allow-pickle to load them (weights_only)"
        )
    if pickled:
        return pickled
    raise ConversionError(f"{path}: no weight files (*.safetensors)")


def _indexed(path: Path, index_name: str) -> list[Path]:
    """The shard files a sharded checkpoint's index names (empty when there is no index)."""
    index = path / index_name
    if not index.is_file():
        return []
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConversionError(f"{index}: invalid index: {e}") from None
    files = sorted({path / name for name in weight_map.values()})
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ConversionError(f"{path}: index names missing shard(s): {', '.join(missing)}")
    return files


def _load_pickled(f: Path) -> list[tuple[TensorRef, object]]:
    """A pickled state dict, through torch's restricted unpickler (tensors and containers only)."""
    try:
        import torch
    except ImportError:
        raise ConversionError(f"{f.name}: loading pickled weights needs torch (pip install 'edgelm[train]')") from None
    dtypes = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
    try:
        # mmap keeps one tensor at a time in memory for zip-format files; legacy files load whole
        state = torch.load(f, map_location="cpu", weights_only=True, mmap=_is_zip(f))
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad or hostile files
        raise ConversionError(f"{f.name}: cannot load pickled weights safely: {str(e).splitlines()[0]}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ConversionError(f"{f.name}: not a state dict of tensors")
    for name, t in state.items():
        if t.dtype not in dtypes:
            raise ConversionError(f"{f.name}: tensor {name} has unsupported dtype {t.dtype}")
    # file offsets stay 0: these tensors are read through torch, not the memory map
    return [(TensorRef(name, dtypes[t.dtype], tuple(t.shape), f, 0, 0), t) for name, t in state.items()]


def _is_zip(f: Path) -> bool:
    with open(f, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"

