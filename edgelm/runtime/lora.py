"""LoRA adapters applied at run time to an unchanged base model, as llama.cpp's `--lora` / `--lora-scaled`.

An adapter GGUF (`edgelm convert ADAPTER_DIR --base BASE_DIR`, or llama.cpp's convert_lora_to_gguf.py) holds
`<base tensor>.lora_a` [in, r] and `.lora_b` [r, out]; every context of the model then computes
W x + scale * alpha / r * B (A x) for each adapted weight. llama.cpp throws on most bad adapters but reads the
file with its own parser first, so the file and its fit to the base model are checked here before it does.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import llama_cpp as lib

from edgelm.errors import GGUFError, ModelLoadError, ModelNotFoundError, UsageError
from edgelm.gguf_reader import GGUFFile, TensorInfo, read_gguf

if TYPE_CHECKING:
    from .model import LlamaModel

_FLOAT_TYPES = ("f32", "f16", "bf16", "q8_0")  # what llama.cpp's and edgelm's converters write


@dataclass(frozen=True)
class LoraSpec:
    path: Path | str  # a file, or an hf://owner/repo/file.gguf reference fetched into the Hub cache
    scale: float = 1.0


def lora_specs(value, what: str = "lora") -> tuple[LoraSpec, ...]:
    """`lora=` (or `control=`, named by `what`) as the API takes it: a path, a (path, scale) pair, or a list."""
    if value is None:
        return ()
    if isinstance(value, (str, os.PathLike, LoraSpec)) or (  # one adapter; a tuple of two may be two adapters
            isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], (str, os.PathLike))
            and not isinstance(value[1], (str, os.PathLike, tuple, list, LoraSpec))):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise UsageError(f"{what} must be a path, a (path, scale) pair or a list of them, not {type(value).__name__}")
    specs = []
    for item in value:
        if isinstance(item, LoraSpec):
            specs.append(item)
            continue
        path, scale = (item, 1.0) if isinstance(item, (str, os.PathLike)) else _pair(item, what)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise UsageError(f"{what} scale must be a finite number, not {scale!r}")
        ref = path if isinstance(path, str) and path.startswith("hf://") else Path(path).expanduser()
        specs.append(LoraSpec(ref, float(scale)))
    if len({s.path if isinstance(s.path, str) else s.path.resolve() for s in specs}) != len(specs):
        raise UsageError(f"{what}: the same file is given twice")
    return tuple(specs)


def _pair(item, what: str):
    if not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[0], (str, os.PathLike)):
        raise UsageError(f"{what} entries are paths or (path, scale) pairs, not {item!r}")
    return item


def resolve_spec(spec: LoraSpec, what: str) -> Path:
    """The spec's file: a local one must exist; an hf:// reference downloads here."""
    from .model import resolve_model

    if isinstance(spec.path, Path) and not spec.path.is_file():
        raise ModelNotFoundError(f"{spec.path}: no such {what} file")
    return resolve_model(spec.path)


def check_adapter(adapter: GGUFFile, base: Iterable[GGUFFile], path: Path) -> None:
    """What llama.cpp's loader requires of an adapter, checked before it reads the file."""
    kind = adapter.get("general.type")
    if kind != "adapter":
        raise GGUFError(f"{path}: general.type is {kind!r}, not 'adapter': this is not a LoRA adapter"
                        + (" but a model" if kind == "model" else ""))
    if adapter.get("adapter.type") != "lora":
        raise GGUFError(f"{path}: adapter.type is {adapter.get('adapter.type')!r}; only 'lora' adapters load")
    if adapter.get("adapter.alora.invocation_tokens") is not None:
        raise GGUFError(f"{path}: activated LoRA (aLoRA) adapters are not supported")
    base = list(base)
    arch = base[0].architecture
    if adapter.architecture != arch:
        raise GGUFError(f"{path}: an adapter for {adapter.architecture!r} models; this model is {arch!r}")
    weights: dict[str, TensorInfo] = {t.name: t for f in base for t in f.tensors}
    pairs: dict[str, dict[str, TensorInfo]] = {}
    for t in adapter.tensors:
        target, _, suffix = t.name.rpartition(".")
        if suffix not in ("lora_a", "lora_b"):
            if t.name.endswith("_norm.weight"):
                continue  # llama.cpp skips norm vectors in adapters
            raise GGUFError(f"{path}: tensor {t.name} is neither a .lora_a nor a .lora_b")
        if t.type_name not in _FLOAT_TYPES or len(t.shape) != 2:
            raise GGUFError(f"{path}: {t.name} must be a matrix of {'/'.join(_FLOAT_TYPES)}, "
                            f"not {t.type_name} {list(t.shape)}")
        pairs.setdefault(target, {})[suffix] = t
    if not pairs:
        raise GGUFError(f"{path}: the adapter holds no LoRA tensors")
    for target, ab in sorted(pairs.items()):
        if len(ab) != 2:
            raise GGUFError(f"{path}: {target} has {next(iter(ab))} without its pair")
        w = weights.get(target)
        if w is None:
            raise GGUFError(f"{path}: adapts {target}, which this model does not have (another base model?)")
        a, b = ab["lora_a"].shape, ab["lora_b"].shape
        fits = (w.shape[0], w.shape[1]) == (b[1], a[1]) if target == "token_embd.weight" else \
            (w.shape[0], w.shape[1]) == (a[0], b[1]) and a[1] == b[0]
        if not fits:
            raise GGUFError(f"{path}: {target} is {list(w.shape)} in the model, the adapter's pair is "
                            f"{list(a)} and {list(b)} (another base model?)")


class LoraAdapters:
    """Adapters loaded into one model, applied to each context created from it."""

    def __init__(self, model: "LlamaModel", specs: tuple[LoraSpec, ...], base: list[GGUFFile]):
        self.specs = specs
        fingerprints, paths = [], []
        for spec in specs:
            path = resolve_spec(spec, "LoRA adapter")
            info = read_gguf(path, keep_arrays=False)
            check_adapter(info, base, path)
            fingerprints.append(f"{info.fingerprint()}*{spec.scale!r}")
            paths.append(path)
        ptrs = []
        for spec, path in zip(specs, paths):
            ptr = lib.llama_adapter_lora_init(model.ptr, os.fsencode(path))
            if not ptr:
                raise ModelLoadError(f"{spec.path}: llama.cpp could not load this LoRA adapter "
                                     "(run with --verbose for its log)")
            ptrs.append(ptr)
        # freed with the model (llama_model_free frees its adapters)
        self._ptrs = (lib.llama_adapter_lora_p_ctypes * len(ptrs))(*ptrs)
        self._scales = (ctypes.c_float * len(specs))(*(s.scale for s in specs))
        self.fingerprint = hashlib.sha256("\n".join(fingerprints).encode()).hexdigest()

    def scales(self, given) -> tuple[float, ...] | None:
        """Per-request scales (one number per adapter, in --lora order) checked; None where they are the
        adapters' own."""
        if not isinstance(given, (list, tuple)) or len(given) != len(self.specs) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) <= 100
                for v in given):
            raise UsageError(f"LoRA scales must be {len(self.specs)} finite numbers in [-100, 100], not {given!r}")
        scales = tuple(float(v) for v in given)
        return None if scales == tuple(s.scale for s in self.specs) else scales

    def apply(self, ctx, scales: tuple[float, ...] | None = None) -> None:
        """Set the adapters on a llama_context at their scales, or at `scales` (one per adapter); llama.cpp then
        builds every graph with them."""
        given = self._scales if scales is None else (ctypes.c_float * len(self.specs))(*scales)
        if lib.llama_set_adapters_lora(ctx, self._ptrs, len(self.specs), given) != 0:
            raise ModelLoadError("llama.cpp could not set the LoRA adapters on a context")
