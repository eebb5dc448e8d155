"""Every supported architecture: a random checkpoint built with transformers converts to a GGUF whose
llama.cpp logits match transformers' at every position, under llama.cpp's own key and tensor names."""
from __future__ import annotations

import inspect
import json
import shutil

import gguf
import numpy as np
import pytest

from conftest import save_random_checkpoint
from edgelm.converters import convert
from edgelm.errors import ConversionError
from edgelm.gguf_reader import read_gguf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# initializer_range 0.1, not 0.02: peaked attention, so a wrong RoPE shows (~8e-2 of the range, not ~1e-3)
COMMON = dict(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
              pad_token_id=2, initializer_range=0.1)
# 45 tokens: long enough for Gemma2's sliding window and Phi-3's long RoPE factors to matter
PROMPT = 'def add(a, b):\n    """Return the sum."""\n    return a + b\n\n\nclass Point:\n' \
         '    def __init__(self, x, y):\n        self.x, self.y = x, y\n'
N_CTX = 128
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # head_dim 16 hits all three bands
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "long_factor": [1.0, 1.5, 3.0, 7.0], "short_factor": [1.0, 1.1, 1.3, 2.0]}  # n_rot 8 -> 4 factors
CASES = {
    # case: (model class, config class, extra config, GGUF architecture)
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}, "llama"),
    "llama-rope-llama3": ("LlamaForCausalLM", "LlamaConfig", {"rope_parameters": LLAMA3_ROPE}, "llama"),
    "mistral": ("MistralForCausalLM", "MistralConfig", {"sliding_window": None}, "llama"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {"tie_word_embeddings": True}, "qwen2"),
    "qwen2-rope-linear": ("Qwen2ForCausalLM", "Qwen2Config", {"tie_word_embeddings": True, "rope_parameters": {
        "rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}}, "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {"head_dim": 32, "tie_word_embeddings": True}, "qwen3"),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {"partial_rotary_factor": 0.5}, "phi3"),
    # llama.cpp takes the long factors when the context (N_CTX rounded up to 256) exceeds the original length,
    # transformers when the prompt does
    "phi3-longrope-short": ("Phi3ForCausalLM", "Phi3Config", {"max_position_embeddings": 1024,
                                                              "original_max_position_embeddings": 512,
                                                              "rope_parameters": LONGROPE}, "phi3"),
    "phi3-longrope-long": ("Phi3ForCausalLM", "Phi3Config", {"original_max_position_embeddings": 16,
                                                             "rope_parameters": LONGROPE}, "phi3"),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", {"head_dim": 32}, "gemma"),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", {"head_dim": 32, "query_pre_attn_scalar": 32,
                                                     "sliding_window": 8}, "gemma2"),
}
PARITY = [(case, "f32", 1e-3) for case in CASES] + [("phi3", "f16", 1e-2), ("gemma2", "f16", 1e-2)]


def make_checkpoint(case: str, out, tokenizer_src) -> object:
    arch, config_cls, extra, _ = CASES[case]
    config = getattr(transformers, config_cls)(**(COMMON | extra))
    config._attn_implementation = "eager"  # Gemma2's attention soft-capping is eager-only
    return save_random_checkpoint(arch, config, out, tokenizer_src)


@pytest.fixture(scope="module")
def build(tmp_path_factory, tiny_dir):
    """(transformers model, checkpoint dir, GGUF path) per case and outtype, each built once."""
    models, ggufs = {}, {}

    def get(case: str, outtype: str = "f32"):
        if case not in models:
            ckpt = tmp_path_factory.mktemp(case) / "ckpt"
            models[case] = make_checkpoint(case, ckpt, tiny_dir), ckpt
        hf, ckpt = models[case]
        if (case, outtype) not in ggufs:
            ggufs[case, outtype] = convert(ckpt, ckpt.parent / f"{outtype}.gguf", outtype=outtype).path
        return hf, ckpt, ggufs[case, outtype]

    return get


def logit_errors(case: str, outtype: str, build) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """llama.cpp's and transformers' logits at every prompt position, and each row's max error / logit range."""
    import edgelm

    hf, _, path = build(case, outtype)
    # f32 end to end: llama.cpp's CPU flash attention and an f16 KV cache each round to ~4e-4 of the range
    exact = dict(type_k="f32", type_v="f32", flash_attn=False) if outtype == "f32" else {}
    with edgelm.load(path, n_ctx=N_CTX, n_threads=2, **exact) as m:
        ids = m.tokenize(PROMPT)
        m.ctx.clear()
        m.ctx.decode(ids, 0, logits_from=0)
        got = m.ctx.all_logits(len(ids))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float().numpy()
    return got, ref, np.abs(got - ref).max(axis=1) / (ref.max(axis=1) - ref.min(axis=1))


@pytest.mark.parametrize("case,outtype,tolerance", PARITY)
def test_logits_match_transformers_at_every_position(case, outtype, tolerance, build):
    got, ref, err = logit_errors(case, outtype, build)
    assert read_gguf(build(case, outtype)[2]).architecture == CASES[case][3]
    assert err.max() <= tolerance, f"position {err.argmax()}: {err.max():.2e} of the logit range"
    assert (got.argmax(axis=1) == ref.argmax(axis=1)).all()


def llama_cpp_keys(arch: str) -> set[str]:
    """Every `{arch}.*` key gguf-py's constants define, for one architecture."""
    groups = [g for g in vars(gguf.Keys).values() if inspect.isclass(g)]
    keys = {v.replace("{arch}", arch) for g in groups for v in vars(g).values() if isinstance(v, str) and "{arch}" in v}
    return {k for k in keys if "{" not in k}  # templates with a second placeholder name no key of ours


def llama_cpp_tensor_names(arch: str, n_layer: int) -> set[str]:
    """The tensor names (without .weight/.bias) gguf-py's MODEL_TENSORS lists for one architecture."""
    model_arch = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    return {gguf.TENSOR_NAMES[t].format(bid=i) for t in gguf.MODEL_TENSORS[model_arch] for i in range(n_layer)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_keys_and_tensor_names_are_llama_cpps(case, build):
    arch = CASES[case][3]
    g = read_gguf(build(case)[2])
    ours = {k for k in g.metadata if k.startswith(f"{arch}.")}
    assert ours - llama_cpp_keys(arch) == set()
    names = {t.name.rsplit(".", 1)[0] for t in g.tensors}
    assert names - llama_cpp_tensor_names(arch, COMMON["num_hidden_layers"]) == set()


def test_generated_rope_tensors(build):
    """llama3 and longrope scaling live in tensors computed at conversion, not in the checkpoint."""
    def names(case):
        return {t.name for t in read_gguf(build(case)[2]).tensors}

    assert "rope_freqs.weight" in names("llama-rope-llama3")
    assert {"rope_factors_long.weight", "rope_factors_short.weight"} <= names("phi3-longrope-long")
    g = read_gguf(build("phi3-longrope-long")[2])
    assert g.get("phi3.rope.scaling.type") == "longrope"
    assert g.get("phi3.rope.scaling.original_context_length") == 16
    assert g.get("phi3.rope.dimension_count") == 8  # partial rotary: half of head_dim 16


_LONG_FACTORS_SHORT = dict(LONGROPE, long_factor=[1.0, 2.0])
BAD_CONFIGS = [
    # (case, config.json changes, phrase expected in the error)
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     r"RoPE scaling 'yarn' is not supported for LlamaForCausalLM \(supported: default, linear, llama3\)"),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e4}}, "'dynamic'"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}}, "low_freq_factor"),
    ("llama", {"partial_rotary_factor": 0.5}, "partial rotary"),
    ("qwen2", {"rope_parameters": LLAMA3_ROPE}, "'llama3' is not supported for Qwen2ForCausalLM"),
    ("llama", {"hidden_act": "gelu"}, "activation gelu"),
    ("phi3-longrope-short", {"rope_parameters": _LONG_FACTORS_SHORT}, "4 long and short factors"),
    ("phi3", {"head_dim": 32}, "hidden_size 64"),
    ("gemma", {"tie_word_embeddings": False}, "untied"),
    ("gemma2", {"query_pre_attn_scalar": 256}, "query_pre_attn_scalar 256"),
    ("gemma2", {"final_logit_softcapping": None}, "final_logit_softcapping"),
    ("gemma2", {"layer_types": ["full_attention", "full_attention"]}, "layer_types"),
]


@pytest.mark.parametrize("case,changes,phrase", BAD_CONFIGS)
def test_configs_llama_cpp_cannot_reproduce_are_clear_errors(case, changes, phrase, build, tmp_path):
    ckpt = shutil.copytree(build(case)[1], tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(cfg | changes))
    with pytest.raises(ConversionError, match=phrase):
        convert(ckpt, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_unknown_architecture_lists_the_supported_ones(build, tmp_path):
    ckpt = shutil.copytree(build("llama")[1], tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(cfg | {"architectures": ["FalconForCausalLM"]}))
    with pytest.raises(ConversionError, match="supported: .*Gemma2ForCausalLM.*Phi3ForCausalLM"):
        convert(ckpt, tmp_path / "m.gguf")
