"""Every supported architecture: a random checkpoint built with transformers converts to a GGUF whose
llama.cpp logits match transformers' on the same tokens."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from edgelm.converters import convert
from edgelm.errors import ConversionError
from edgelm.gguf_reader import read_gguf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1)
CASES = {
    # config class, extra config, GGUF architecture
    "LlamaForCausalLM": ("LlamaConfig", {}, "llama"),
    "MistralForCausalLM": ("MistralConfig", {"sliding_window": None}, "llama"),
    "Qwen2ForCausalLM": ("Qwen2Config", {"tie_word_embeddings": True}, "qwen2"),
    "Qwen3ForCausalLM": ("Qwen3Config", {"head_dim": 32, "tie_word_embeddings": True}, "qwen3"),
}


def make_checkpoint(arch: str, out, tokenizer_src) -> object:
    config_cls, extra, _ = CASES[arch]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**COMMON, **extra)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # random biases and norms so every tensor matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_src / name, out / name)
    return model


@pytest.mark.parametrize("arch", sorted(CASES))
def test_logits_parity(arch, tmp_path, tiny_dir):
    import edgelm

    hf = make_checkpoint(arch, tmp_path / "ckpt", tiny_dir)
    gguf_path = convert(tmp_path / "ckpt", tmp_path / "m.gguf", outtype="f32").path
    assert read_gguf(gguf_path).architecture == CASES[arch][2]
    with edgelm.load(gguf_path, n_ctx=64, n_threads=2) as m:
        ids = m.tokenize("def add(a, b):\n    return a + b\n")
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float().numpy()
        m.ctx.clear()
        m.ctx.decode(ids, 0)  # last position
        got = m.ctx.logits()
        spread = ref[-1].max() - ref[-1].min()
        assert np.abs(got - ref[-1]).max() <= 1e-3 * spread
        assert got.argmax() == ref[-1].argmax()


def test_unknown_architecture_lists_the_supported_ones(tmp_path, tiny_dir):
    import json

    make_checkpoint("LlamaForCausalLM", tmp_path / "ckpt", tiny_dir)
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="supported: .*Qwen2ForCausalLM"):
        convert(tmp_path / "ckpt", tmp_path / "m.gguf")
