"""Hugging Face checkpoint -> GGUF: the `edgelm convert` pipeline stage."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgelm._version import __version__
from edgelm.errors import ConversionError
from edgelm.gguf_reader import format_count

from .arch import Arch, HParams, arch_for
from .checkpoint import Checkpoint
from .export import FILE_TYPES, OUTTYPES, PlannedTensor, tensor_type, write_gguf
from .vocab import Vocab, load_vocab


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    n_parameters: int
    n_bytes: int
    seconds: float

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.n_bytes / self.n_parameters

    def summary(self) -> str:
        return (
            f"wrote {self.path}: {self.n_parameters / 1e6:.2f}M parameters, "
            f"{self.n_bytes / 1e6:.1f} MB, {self.bits_per_weight:.2f} bits/weight, {self.seconds:.1f} s"
        )


def _vocab_metadata(v: Vocab) -> dict[str, object]:
    kv: dict[str, object] = {
        "tokenizer.ggml.model": v.model,
        "tokenizer.ggml.tokens": v.tokens,
        "tokenizer.ggml.token_type": v.types,
        "tokenizer.ggml.add_bos_token": v.add_bos,
        "tokenizer.ggml.add_eos_token": v.add_eos,
    }
    if v.pre:
        kv["tokenizer.ggml.pre"] = v.pre
    if v.merges:
        kv["tokenizer.ggml.merges"] = v.merges
    if v.scores:
        kv["tokenizer.ggml.scores"] = v.scores
    if v.add_space_prefix is not None:
        kv["tokenizer.ggml.add_space_prefix"] = v.add_space_prefix
    names = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "padding_token_id", "unk": "unknown_token_id", "eot": "eot_token_id"}
    for key, token_id in v.special_ids.items():
        kv[f"tokenizer.ggml.{names[key]}"] = token_id
    if v.chat_template:
        kv["tokenizer.chat_template"] = v.chat_template
    return kv


def plan_tensors(ckpt: Checkpoint, arch: Arch, hp: HParams, outtype: str,
                 deltas: dict[str, tuple[tuple[int, int], Callable[[], np.ndarray]]] | None = None
                 ) -> list[PlannedTensor]:
    """`deltas`: HF tensor name -> (shape, what to add to it before its transform): a merged LoRA's s * B A."""
    deltas = deltas or {}
    for hf_name, (shape, _) in sorted(deltas.items()):
        ref = ckpt.tensors.get(hf_name)
        if ref is None:
            raise ConversionError(f"{ckpt.path}: the LoRA adapts {hf_name}, which this checkpoint does not have")
        if tuple(ref.shape) != shape:
            raise ConversionError(f"{ckpt.path}: the LoRA's update of {hf_name} is {list(shape)}, the weight is "
                                  f"{list(ref.shape)} (another base model?)")
    planned: dict[str, PlannedTensor] = {}
    for hf_name, ref in ckpt.tensors.items():
        mapped = arch.gguf_tensor(hf_name)
        if mapped is None:
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue  # recomputed by llama.cpp from rope.freq_base
            raise ConversionError(f"{ckpt.path}: unexpected tensor {hf_name} for {arch.gguf_name}")
        name, transform = mapped

        def load(hf_name=hf_name, transform=transform, delta=deltas.get(hf_name)):
            w = ckpt.array(hf_name)
            if delta is not None:
                w += delta[1]()
            return transform(w, hp) if transform else w

        planned[name] = PlannedTensor(
            name, ref.shape, tensor_type(name, ref.shape, outtype), load,
            # untransformed tensors (the large ones: embeddings, FFN) stream in row blocks
            load_rows=None if transform or hf_name in deltas else (lambda lo, hi, n=hf_name: ckpt.array(n, (lo, hi))),
            release=lambda n=hf_name: ckpt.release(n),
        )
    missing = [n for n in arch.expected_tensors(hp) if n not in planned]
    if missing:
        raise ConversionError(f"{ckpt.path}: missing tensor(s) {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    _check_shapes(planned, arch.expected_shapes(hp), hp)
    if hp.tied_embeddings:
        planned.pop("output.weight", None)
    for name, array in arch.generated_tensors(hp).items():  # RoPE frequency factors
        qtype = tensor_type(name, array.shape, outtype)
        planned[name] = PlannedTensor(name, array.shape, qtype, lambda a=array: a)
    return list(planned.values())


def _check_shapes(planned: dict[str, PlannedTensor], expected: dict[str, tuple[int, ...]], hp: HParams) -> None:
    for name, t in planned.items():
        want = expected.get(name)
        if want is not None and tuple(t.shape) != want:
            raise ConversionError(f"tensor {name}: shape {list(t.shape)}, config implies {list(want)}")
    if hp.n_head % hp.n_head_kv:
        raise ConversionError(f"config.json: {hp.n_head} heads do not split into {hp.n_head_kv} KV groups")


def convert(
    hf_dir: str | Path,
    out: str | Path,
    *,
    outtype: str = "f16",
    quant: str | None = None,
    tensor_types: dict[str, str] | None = None,
    imatrix: str | Path | None = None,
    calib: str | None = None,
    name: str | None = None,
    progress: bool | None = None,
    allow_pickle: bool = False,
    lora: str | Path | None = None,
    lora_scale: float = 1.0,
) -> ConvertResult:
    """Convert a transformers checkpoint directory into a GGUF file at `out`.

    `quant` (any llama.cpp type, e.g. "q4_k_m") quantizes the `outtype` GGUF with
    llama.cpp's own quantizer; `tensor_types` maps tensor-name patterns to types.
    `imatrix` is "auto" (computed from `calib` text, default the reference corpus)
    or the path of an imatrix GGUF. `allow_pickle` lets pickled .bin/.pt weights load
    through torch's `weights_only` unpickler; without it they are refused. `lora` (a PEFT adapter folder) is
    merged into the weights first, scaled by `lora_scale`, so the result can be quantized as one model.
    """
    if outtype not in OUTTYPES:
        raise ConversionError(f"unknown outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    if imatrix is not None and quant is None:
        raise ConversionError("--imatrix needs --quant")
    merge = _Merge(lora, lora_scale) if lora is not None else None  # a bad adapter fails before any work
    if quant is not None or tensor_types:
        return _convert_quantized(hf_dir, Path(out), outtype, quant or outtype, tensor_types, imatrix, calib,
                                  name, progress, allow_pickle, merge)
    return _convert(hf_dir, Path(out), outtype, name, progress, [f"convert:{outtype}"], allow_pickle, merge)


class _Merge:
    """A PEFT LoRA adapter to fold into the checkpoint's weights: W + lora_scale * s * B A."""

    def __init__(self, path: str | Path, scale: float):
        from .lora import PeftAdapter

        if not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ConversionError(f"lora_scale must be a finite number, not {scale!r}")
        self.adapter, self.scale = PeftAdapter(path), float(scale)

    def deltas(self) -> dict[str, tuple[tuple[int, int], Callable[[], np.ndarray]]]:
        return {f"{p.module}.weight": ((p.b.shape[0], p.a.shape[1]), lambda p=p: self.scale * self.adapter.delta(p))
                for p in self.adapter.pairs}


def _convert_quantized(hf_dir, out: Path, outtype: str, quant: str, tensor_types, imatrix, calib, name,
                       progress, allow_pickle: bool, merge: "_Merge | None" = None) -> ConvertResult:
    from .imatrix import compute_imatrix, load_imatrix
    from .quantize import NEEDS_IMATRIX, QUANT_TYPES, quantize

    if quant not in QUANT_TYPES:  # fail before the (long) conversion
        raise ConversionError(f"unknown quantization type {quant!r}; known: {', '.join(QUANT_TYPES)}")
    if quant in NEEDS_IMATRIX and imatrix is None:
        raise ConversionError(f"{quant} needs an importance matrix (--imatrix auto or --imatrix FILE)")
    loaded = load_imatrix(imatrix) if imatrix not in (None, "auto") else None  # bad files fail early
    t0 = time.perf_counter()
    mid = out.with_name(f".{out.name}.{outtype}.intermediate")
    steps = [f"convert:{outtype}"] + (["imatrix"] if imatrix is not None else []) + [f"quantize:{quant}"]
    try:
        first = _convert(hf_dir, mid, outtype, name, progress, steps, allow_pickle, merge)
        if imatrix == "auto":
            from edgelm import corpus

            text = calib if calib is not None else corpus.text("train", max_chars=400_000)
            loaded = compute_imatrix(mid, text, max_chunks=100, dataset="calib" if calib else "edgelm-corpus")
        quantize(mid, out, quant, tensor_types=tensor_types, imatrix=loaded.means() if loaded else None)
    finally:
        mid.unlink(missing_ok=True)
    return ConvertResult(out, first.n_parameters, out.stat().st_size, time.perf_counter() - t0)


def _convert(hf_dir, out: Path, outtype: str, name, progress, pipeline: list[str],
             allow_pickle: bool = False, merge: _Merge | None = None) -> ConvertResult:
    t0 = time.perf_counter()
    ckpt = Checkpoint.open(hf_dir, allow_pickle=allow_pickle)
    try:
        arch = arch_for(ckpt.config)
        hp = arch.hparams(ckpt.config)
        tensors = plan_tensors(ckpt, arch, hp, outtype, merge.deltas() if merge else None)
        if merge:
            pipeline = [f"merge-lora:{merge.adapter.fingerprint()[:12]}", *pipeline]
        vocab = load_vocab(ckpt, hp.n_vocab)
        n_params = sum(math.prod(t.shape) for t in tensors)
        metadata: dict[str, object] = {
            "general.type": "model",
            "general.name": name or ckpt.path.resolve().name,
            "general.size_label": format_count(n_params, label=True),
            "general.file_type": int(FILE_TYPES[outtype]),
            "general.quantization_version": 2,
            **arch.metadata(hp),
            **_vocab_metadata(vocab),
            "edgelm.version": __version__,
            "edgelm.source.sha256": ckpt.fingerprint(),
            "edgelm.pipeline": pipeline,
        }
        card = ckpt.card()
        for key in ("license", "license_name", "license_link"):
            if key in card:
                metadata[f"general.{key.replace('_', '.')}"] = card[key]
        bar = _progress_bar(len(tensors), progress)
        n_bytes = write_gguf(out, arch.gguf_name, metadata, tensors, progress=(lambda t: bar.update(1)) if bar else None)
        if bar:
            bar.close()
    finally:
        ckpt.close()
    return ConvertResult(out, n_params, n_bytes, time.perf_counter() - t0)


def _progress_bar(total: int, enabled: bool | None):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="tensor", desc="converting", leave=False)
