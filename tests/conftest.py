"""Shared fixtures: the reference models, converted once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
STORIES = ROOT.parent / "shared" / "models" / "stories260K.gguf"


def save_random_checkpoint(model_class: str, config, out: Path, tokenizer_src: Path):
    """A transformers model of `config` with random weights, biases and norms (so every tensor matters), saved
    with the reference tokenizer; returns the model."""
    import shutil

    import torch
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_src / name, out / name)
    return model


def reweight_gguf(path: Path) -> None:
    """Change the weights of a GGUF in place, keeping its header and tensor table byte for byte: flip the lowest
    bit of the middle byte of its largest tensor (what a retrained or requantized model of one layout looks like
    to anything that reads only the header)."""
    from edgelm.gguf_reader import read_gguf

    info = read_gguf(path)
    t = max(info.tensors, key=lambda t: t.n_bytes)
    with open(path, "r+b") as f:
        f.seek(info.data_offset + t.offset + t.n_bytes // 2)
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 0x01]))


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    return MODELS / "tiny"


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_dir) -> dict[str, Path]:
    """The tiny model converted at each direct outtype."""
    from edgelm.converters import convert

    out = tmp_path_factory.mktemp("tiny")
    return {t: convert(tiny_dir, out / f"tiny-{t}.gguf", outtype=t).path for t in ("f32", "f16", "q8_0")}


@pytest.fixture(scope="session")
def stories() -> Path:
    if not STORIES.is_file():
        pytest.skip(f"third-party test model missing: {STORIES}")
    return STORIES


@pytest.fixture(scope="session")
def tiny_model(tiny_gguf):
    import edgelm

    with edgelm.load(tiny_gguf["f32"], n_ctx=512, n_threads=2) as m:
        yield m
