"""What Ollama's /api/create makes of uploaded blobs (blobs.py), as `ollama create` sends them for a Modelfile whose
FROM and ADAPTER name local files:

- a model from one GGUF file, or from a safetensors checkpoint's files (config.json, *.safetensors, tokenizer.json),
  which edgelm's own converter turns into a GGUF (F16, as Ollama converts);
- quantized if asked (`quantize`: Ollama's q4_K_M, q8_0, ...; any type llama.cpp quantizes to without an
  importance matrix), from an F32, F16 or BF16 model only, as in Ollama;
- with LoRA adapters: GGUF adapter files, or a PEFT adapter's files (adapter_config.json,
  adapter_model.safetensors) converted against the checkpoint's files.

Each result is a blob of its own; `status(text)` hears each step as Ollama's create streams them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from . import blobs
from .errors import ModelNotFoundError, UsageError
from .gguf_reader import read_gguf

FLOAT_TYPES = {0: "F32", 1: "F16", 32: "BF16"}  # general.file_type values a quantization may start from
Status = Callable[[str], None]


def check(files) -> dict[str, str]:
    """`files` (or `adapters`) as name -> digest, each digest a blob that was uploaded."""
    if not isinstance(files, dict) or not files or not all(isinstance(v, str) for v in files.values()):
        raise UsageError("files and adapters must map file names to blob digests (sha256:...)")
    for name, digest in files.items():
        blobs.check_file_name(name)
        blobs.existing(digest)  # never uploaded: a 404 before any work starts
    return files


def is_checkpoint(files: dict) -> bool:
    return "config.json" in files and any(name.endswith(".safetensors") for name in files)


def quant_type(name) -> str:
    from edgelm.converters.quantize import NEEDS_IMATRIX, QUANT_TYPES

    known = [q for q in QUANT_TYPES if q not in NEEDS_IMATRIX and q not in ("f32", "f16", "bf16")]
    if not isinstance(name, str) or name.lower() not in known:
        raise UsageError(f"quantize {name!r}: one of {', '.join(known)} (in any case)")
    return name.lower()


def model(files: dict, quantize: str | None, status: Status, name: str | None = None) -> Path:
    """The model blob that `files` (checked) make, quantized to `quantize` if given; `name`: a converted
    checkpoint's general.name."""
    ggufs = [name for name in files if name.lower().endswith(".gguf")]
    if ggufs:
        if len(files) != 1:
            raise UsageError("files: one GGUF file, or the files of a safetensors checkpoint")
        status("parsing GGUF")
        blob = blobs.existing(files[ggufs[0]])
        if read_gguf(blob, keep_arrays=False).get("general.type") == "adapter":
            raise UsageError(f"{ggufs[0]} is a LoRA adapter: give it in adapters, and the model in files or from")
        return quantized(blob, quantize, status) if quantize else blob
    if not is_checkpoint(files):
        raise UsageError("files: a GGUF file, or a safetensors checkpoint's files (config.json, *.safetensors, "
                         "tokenizer.json)")
    with blobs.staged(files) as folder:
        return converted(folder, quantize, status, name)


def converted(folder: Path, quantize: str | None, status: Status, name: str | None = None) -> Path:
    """A blob of the safetensors checkpoint in `folder` converted to F16 GGUF, and quantized if asked."""
    from edgelm.converters import convert

    with blobs.making() as out:
        status("converting model")
        if quantize:  # converted to F16 and quantized in one call: the bytes `edgelm convert --quant` writes
            status(f"quantizing F16 model to {quantize.upper()}")
        convert(folder, out, outtype="f16", quant=quant_type(quantize) if quantize else None, name=name,
                progress=False)
        return blobs.add(out)


def quantized(src: Path, quantize: str, status: Status) -> Path:
    """A blob of GGUF `src` quantized to `quantize` by llama.cpp's own quantizer."""
    from edgelm.converters.quantize import quantize as run_quantize

    qtype = quant_type(quantize)
    status(f"quantizing {quantizable(src)} model to {quantize.upper()}")
    with blobs.making() as out:
        run_quantize(src, out, qtype)
        return blobs.add(out)


def quantizable(src: Path) -> str:
    """The float type ("F16", ...) of GGUF `src`; UsageError if it is quantized already."""
    file_type = read_gguf(src, keep_arrays=False).get("general.file_type")
    if file_type not in FLOAT_TYPES:
        raise UsageError("quantize: only an F32, F16 or BF16 model can be quantized (as in Ollama); this one is "
                         "quantized already")
    return FLOAT_TYPES[file_type]


def adapters(files: dict, base_files: dict | None, status: Status) -> list[Path]:
    """The adapter blobs that `files` (checked) make: GGUF adapters as they are, or a PEFT adapter converted
    against the checkpoint `base_files` (None when the model is a GGUF, which a PEFT adapter cannot convert
    against)."""
    ggufs = [name for name in files if name.lower().endswith(".gguf")]
    if ggufs:
        if len(ggufs) != len(files):
            raise UsageError("adapters: GGUF adapter files, or the files of one PEFT adapter")
        out = []
        for name in ggufs:
            blob = blobs.existing(files[name])
            if read_gguf(blob, keep_arrays=False).get("general.type") != "adapter":
                raise UsageError(f"adapters: {name} is not a LoRA adapter GGUF")
            out.append(blob)
        return out
    if "adapter_config.json" not in files:
        raise UsageError("adapters: GGUF adapter files, or a PEFT adapter's adapter_config.json and "
                         "adapter_model.safetensors")
    if base_files is None:
        raise UsageError("adapters: a PEFT adapter converts against its base checkpoint: create from the base "
                         "model's safetensors files, or upload a GGUF adapter (`edgelm convert ADAPTER_DIR --base "
                         "HF_DIR` writes one)")
    with blobs.staged(files) as peft, blobs.staged(base_files) as base:
        return [converted_adapter(peft, base, status)]


def converted_adapter(peft: Path, base: Path, status: Status) -> Path:
    """A blob of the PEFT adapter in folder `peft` converted to a GGUF LoRA against checkpoint folder `base`."""
    from edgelm.converters.lora import convert_lora

    status("converting adapter")
    with blobs.making() as out:
        convert_lora(peft, base, out, name="adapter")
        return blobs.add(out)


def local_file(ref: str) -> Path:
    """The file of a model reference (a GGUF path, or a Hub reference that must be cached)."""
    from . import hub

    if not hub.is_hub_ref(ref):
        return Path(ref)
    path = hub.cached(ref)
    if path is None:
        raise ModelNotFoundError(f"{ref} is not downloaded: pull it first")
    return path


def materialized(profile, quantize: str | None, status: Status):
    """`profile` (modelfile.Profile, as `edgelm create` builds it from a Modelfile) with a checkpoint folder in
    FROM converted, its model quantized if asked, and PEFT adapter folders in ADAPTER converted against the
    checkpoint, each into a blob."""
    from dataclasses import replace

    checkpoint = Path(profile.model) if Path(profile.model).is_dir() else None
    if checkpoint is not None:
        model = converted(checkpoint, quantize, status, profile.name.split(":")[0])
    elif quantize:
        model = quantized(local_file(profile.model), quantize, status)
    else:
        model = profile.model
    adapters = []
    for adapter in profile.adapters:
        if not Path(adapter).is_dir():
            adapters.append(adapter)
        elif checkpoint is None:
            raise UsageError(f"ADAPTER {adapter}: a PEFT adapter converts against its base checkpoint: give the "
                             "base model's folder in FROM, or a GGUF adapter (`edgelm convert ADAPTER_DIR --base "
                             "HF_DIR` writes one)")
        else:
            adapters.append(str(converted_adapter(Path(adapter), checkpoint, status)))
    return replace(profile, model=str(model), adapters=tuple(adapters))
