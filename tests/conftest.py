"""Shared fixtures: the reference models, converted once per test session."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
STORIES = ROOT.parent / "shared" / "models" / "stories260K.gguf"


def save_random_checkpoint(model_class: str, config, out: Path, tokenizer_src: Path):
    """A transformers model of `config` with random weights, biases and norms (so every tensor matters), saved
    with the reference tokenizer; returns the model."""
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


def write_peft_adapter(out: Path) -> Path:
    """A PEFT-layout LoRA adapter of rank 4 for the tiny model (q_proj and down_proj of its 4 layers), written
    with numpy."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {}
    for i in range(4):
        for module, (n_out, n_in) in {"self_attn.q_proj": (128, 128), "mlp.down_proj": (128, 384)}.items():
            key = f"base_model.model.model.layers.{i}.{module}"
            tensors[f"{key}.lora_A.weight"] = rng.standard_normal((4, n_in)).astype(np.float32) * 0.1
            tensors[f"{key}.lora_B.weight"] = rng.standard_normal((n_out, 4)).astype(np.float32) * 0.1
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    return out


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


# ---------------------------------------------------------------------------- a 16-token random model

RAND_VOCAB = 16  # BOS, EOS, PAD, "a".."l", "ab"


FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")


def fim_checkpoint(out: Path) -> Path:
    """The tiny reference model with Qwen2.5-Coder's six fill-in-the-middle tokens added after its vocabulary (new
    embedding rows, ids 8192-8197): llama.cpp finds them by their texts, so /infill works on its GGUF."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(MODELS / "tiny")
    model.resize_token_embeddings(model.config.vocab_size + len(FIM_TOKENS))
    model.save_pretrained(out, safe_serialization=True)
    tj = json.loads((MODELS / "tiny" / "tokenizer.json").read_text())
    first = len(tj["model"]["vocab"])
    tj["added_tokens"] += [{"id": first + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": True} for i, t in enumerate(FIM_TOKENS)]
    (out / "tokenizer.json").write_text(json.dumps(tj))
    shutil.copy(MODELS / "tiny" / "tokenizer_config.json", out / "tokenizer_config.json")
    return out


def random_byte_checkpoint(out: Path, n_layer: int, seed: int, arch: str = "llama") -> Path:
    """A random Llama (Llama 3 RoPE scaling with arch "llama3", or Qwen2) over a 16-token byte-level vocabulary,
    tied embeddings; initializer_range 0.5 makes next-token distributions peaked but not one-hot, and its early
    exits disagree."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config_class, model_class = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                                 "llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                                 "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
    scaling = {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 32}} if arch == "llama3" else {}
    config = config_class(vocab_size=RAND_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layer,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                          bos_token_id=0, eos_token_id=1, pad_token_id=2, initializer_range=0.5,
                          tie_word_embeddings=True, **scaling)
    model_class(config).save_pretrained(out, safe_serialization=True)
    tj = json.loads((ROOT / "models" / "tiny" / "tokenizer.json").read_text())
    specials = tj["added_tokens"][:3]  # BOS, EOS, PAD
    vocab = {t["content"]: t["id"] for t in specials} | {chr(ord("a") + i): 3 + i for i in range(RAND_VOCAB - 4)}
    tj["added_tokens"] = specials
    tj["model"] = {**tj["model"], "vocab": vocab | {"ab": RAND_VOCAB - 1}, "merges": ["a b"]}  # llama.cpp needs a merge
    (out / "tokenizer.json").write_text(json.dumps(tj))
    shutil.copy(ROOT / "models" / "tiny" / "tokenizer_config.json", out / "tokenizer_config.json")
    return out


@pytest.fixture(scope="session")
def rand(tmp_path_factory) -> dict[str, Path]:
    """The 4-layer random model split at layers 2 and 3, and a 1-layer random draft model."""
    from edgelm.converters import convert
    from edgelm.converters.early_exit import split_model

    d = tmp_path_factory.mktemp("rand")
    model = convert(random_byte_checkpoint(d / "ckpt", 4, seed=0), d / "rand.gguf", outtype="f32").path
    draft = convert(random_byte_checkpoint(d / "ckpt-draft", 1, seed=1), d / "rand-draft.gguf", outtype="f32").path
    for k in (2, 3):
        split_model(model, k)
    return {"model": model, "draft": draft}


# ---------------------------------------------------------------------------- speculative decoding


def check_stats(c) -> None:
    """SpecStats of one greedy completion add up: each token is the first one, an accepted draft or a
    round's own token, of which the last may go unused; an EOS is not output, nor what was accepted after it."""
    s = c.timings.speculative
    assert 0 <= s.accepted <= s.drafted
    if c.finish_reason == "length":
        assert s.rounds + s.accepted <= len(c.tokens) <= s.rounds + s.accepted + 1
    else:
        assert len(c.tokens) <= s.rounds + s.accepted
