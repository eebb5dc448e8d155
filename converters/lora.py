"""PEFT LoRA adapters -> GGUF LoRA adapters, the file llama.cpp's `--lora` loads beside an unchanged base model.

A PEFT adapter folder holds `adapter_config.json` and `adapter_model.safetensors` with, per adapted linear
layer, `lora_A` (r, in) and `lora_B` (out, r). The adapted layer computes W x + s * B (A x), where s is
lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA, per-module values from rank_pattern / alpha_pattern).

The GGUF keeps A and B as they are, named `<base tensor>.lora_a` / `.lora_b`: ggml's shapes (ne0 first) are then
[in, r] and [r, out], what llama.cpp's loader checks against the base tensor. llama.cpp scales by
user_scale * adapter.lora.alpha / r, with r read from each B. So a uniform alpha is written as the key, and
any other scaling (rsLoRA, alpha_pattern) is folded into B with the key left out (llama.cpp then uses
user_scale alone). Rows that the base conversion permutes (the llama graph's q/k RoPE layout) are permuted
in B the same way; A's columns are inputs and stay.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgelm._version import __version__
from edgelm.errors import ConversionError

from .arch import Arch, HParams, arch_for
from .checkpoint import TensorRef, _read_safetensors_header, read_array, sha256_files
from .convert import ConvertResult
from .export import PlannedTensor, tensor_type, write_gguf

ADAPTER_CONFIG = "adapter_config.json"
# base_model.model.<module>.lora_A.weight; older PEFT versions kept the adapter's name (lora_A.default.weight)
_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight")
_LORA_OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def is_adapter(path: str | Path) -> bool:
    """A PEFT adapter folder (rather than a full checkpoint)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class LoraPair:
    module: str  # HF module path: model.layers.0.self_attn.q_proj
    a: TensorRef  # (r, in)
    b: TensorRef  # (out, r)
    scale: float  # PEFT's scaling of B A for this module

    @property
    def rank(self) -> int:
        return self.a.shape[0]


class PeftAdapter:
    """A PEFT LoRA adapter folder, checked for what a GGUF LoRA can hold."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        config_path = self.path / ADAPTER_CONFIG
        if not config_path.is_file():
            raise ConversionError(f"{self.path}: no {ADAPTER_CONFIG}: not a PEFT adapter folder")
        try:
            self.config = json.loads(config_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{config_path}: invalid JSON: {e}") from None
        if not isinstance(self.config, dict):
            raise ConversionError(f"{config_path}: not a JSON object")
        self._check_config()
        weights = self.path / "adapter_model.safetensors"
        if not weights.is_file():
            found = "adapter_model.bin, which is pickled" if (self.path / "adapter_model.bin").is_file() else "nothing"
            raise ConversionError(f"{self.path}: no adapter_model.safetensors (found {found}); "
                                  "save the adapter with safe_serialization=True")
        self.pairs = self._pair_up(_read_safetensors_header(weights))
        self._map: np.memmap | None = None

    def _check_config(self) -> None:
        c = self.config
        kind = str(c.get("peft_type", "LORA")).upper()
        if kind != "LORA":
            raise ConversionError(f"{self.path}: peft_type {kind}: only LoRA adapters convert to GGUF")
        for key, what in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out (Conv1D) layers")):
            if c.get(key):
                raise ConversionError(f"{self.path}: {what} adapters are not supported by llama.cpp's LoRA")
        if c.get("modules_to_save"):
            raise ConversionError(f"{self.path}: modules_to_save ({', '.join(c['modules_to_save'])}) replaces whole "
                                  "weights, which a GGUF LoRA cannot hold; merge the adapter instead")
        if c.get("lora_bias"):
            raise ConversionError(f"{self.path}: lora_bias adapters are not supported by llama.cpp's LoRA")
        for key in ("layer_replication", "target_parameters", "trainable_token_indices", "alora_invocation_tokens"):
            if c.get(key):
                raise ConversionError(f"{self.path}: {key} adapters are not supported by llama.cpp's LoRA")
        for key in ("r", "lora_alpha"):
            value = c.get(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ConversionError(f"{self.path}: {ADAPTER_CONFIG}: {key} must be a positive number, not {value!r}")

    @property
    def uniform_alpha(self) -> float | None:
        """lora_alpha when llama.cpp's own alpha / r reproduces every module's scaling; else None."""
        c = self.config
        return None if c.get("use_rslora") or c.get("alpha_pattern") else float(c["lora_alpha"])

    def _alpha(self, module: str) -> float:
        # PEFT matches a pattern key against the module path's tail: "(.*\.)?" + key
        for pattern, value in (self.config.get("alpha_pattern") or {}).items():
            if re.fullmatch(rf"(.*\.)?{pattern}", module):
                return float(value)
        return float(self.config["lora_alpha"])

    def _pair_up(self, refs: list[TensorRef]) -> list[LoraPair]:
        parts: dict[str, dict[str, TensorRef]] = {}
        for ref in refs:
            m = _KEY.fullmatch(ref.name)
            if m is None:
                what = "embedding LoRA" if "lora_embedding" in ref.name else "a tensor that is not lora_A/lora_B"
                raise ConversionError(f"{self.path}: {ref.name}: {what} is not supported")
            if len(ref.shape) != 2:
                raise ConversionError(f"{self.path}: {ref.name}: shape {list(ref.shape)}, expected a matrix")
            parts.setdefault(m["module"], {})[m["which"]] = ref
        if not parts:
            raise ConversionError(f"{self.path}: the adapter holds no LoRA tensors")
        pairs = []
        for module, ab in parts.items():
            if set(ab) != {"A", "B"}:
                raise ConversionError(f"{self.path}: {module} has lora_{''.join(ab)} without its pair")
            a, b = ab["A"], ab["B"]
            if a.shape[0] != b.shape[1]:
                raise ConversionError(f"{self.path}: {module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} "
                                      "disagree on the rank")
            r = a.shape[0]
            alpha = self._alpha(module)
            scale = alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r
            pairs.append(LoraPair(module, a, b, scale))
        return pairs

    def array(self, ref: TensorRef) -> np.ndarray:
        if self._map is None:  # one file: adapter_model.safetensors
            self._map = np.memmap(ref.file, dtype=np.uint8, mode="r")
        return read_array(self._map, ref)

    def delta(self, pair: LoraPair) -> np.ndarray:
        """s * B @ A, the change to the module's weight (out, in): what merging adds."""
        return pair.scale * (self.array(pair.b) @ self.array(pair.a))

    def fingerprint(self) -> str:
        return sha256_files([self.path / ADAPTER_CONFIG, self.path / "adapter_model.safetensors"])


def base_hparams(base_dir: str | Path) -> tuple[Arch, HParams]:
    """The base checkpoint's architecture, from its config.json alone (its weights are not read)."""
    config_path = Path(base_dir) / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{base_dir}: no config.json; --base is the base model's checkpoint folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{config_path}: invalid JSON: {e}") from None
    arch = arch_for(config)
    return arch, arch.hparams(config)


def gguf_target(arch: Arch, hp: HParams, module: str):
    """(GGUF tensor name, row transform or None) of the base weight a LoRA module adapts."""
    mapped = arch.gguf_tensor(f"{module}.weight")
    if mapped is None or mapped[0].endswith("norm.weight"):
        raise ConversionError(f"LoRA on {module}: llama.cpp's {arch.gguf_name} graph has no such linear layer")
    name, transform = mapped
    if name == "token_embd.weight":
        raise ConversionError(f"LoRA on {module}: embedding adapters are not supported")
    if name == "output.weight" and hp.tied_embeddings:
        raise ConversionError(f"LoRA on {module}: this model ties its output to the embeddings, so llama.cpp "
                              "has no output tensor to adapt")
    return name, transform


def convert_lora(adapter_dir: str | Path, base_dir: str | Path, out: str | Path, *, outtype: str = "f16",
                 name: str | None = None) -> ConvertResult:
    """Write the PEFT adapter in `adapter_dir` as a GGUF LoRA for the base checkpoint in `base_dir`."""
    if outtype not in _LORA_OUTTYPES:
        raise ConversionError(f"unknown outtype {outtype!r} for a LoRA; choose one of {', '.join(_LORA_OUTTYPES)}")
    t0 = time.perf_counter()
    adapter = PeftAdapter(adapter_dir)
    arch, hp = base_hparams(base_dir)
    expected = arch.expected_shapes(hp)
    alpha = adapter.uniform_alpha
    tensors: list[PlannedTensor] = []
    for pair in sorted(adapter.pairs, key=lambda p: p.module):
        target, transform = gguf_target(arch, hp, pair.module)
        want = expected.get(target)
        if want is not None and (pair.b.shape[0], pair.a.shape[1]) != want:
            raise ConversionError(f"LoRA on {pair.module}: B A is {pair.b.shape[0]} x {pair.a.shape[1]}, the base "
                                  f"model's {target} is {want[0]} x {want[1]} (another base model?)")

        def load_b(pair=pair, transform=transform):
            b = adapter.array(pair.b) * (1.0 if alpha is not None else pair.scale)
            return transform(b, hp) if transform else b

        for suffix, ref, load in (("lora_a", pair.a, lambda ref=pair.a: adapter.array(ref)), ("lora_b", pair.b, load_b)):
            gguf_name = f"{target}.{suffix}"
            tensors.append(PlannedTensor(gguf_name, ref.shape, tensor_type(gguf_name, ref.shape, outtype), load))
    metadata: dict[str, object] = {
        "general.type": "adapter",
        "general.name": name or Path(adapter_dir).resolve().name,
        "adapter.type": "lora",
        "edgelm.version": __version__,
        "edgelm.source.sha256": adapter.fingerprint(),
        "edgelm.lora.rank": max(p.rank for p in adapter.pairs),
    }
    if alpha is not None:
        metadata["adapter.lora.alpha"] = alpha
    n_bytes = write_gguf(Path(out), arch.gguf_name, metadata, tensors)
    n_params = sum(math.prod(t.shape) for t in tensors)
    return ConvertResult(Path(out), n_params, n_bytes, time.perf_counter() - t0)
