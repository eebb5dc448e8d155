"""Architectures: how a transformers config and its tensor names map onto GGUF.

Each architecture is one `Arch` entry: the GGUF architecture name, the
hyperparameters it writes, and the tensor-name table with per-tensor
transforms. Later architectures add entries, not branches.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from edgelm.errors import ConversionError


@dataclass(frozen=True)
class HParams:
    n_vocab: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx_train: int
    rms_eps: float
    rope_theta: float
    tied_embeddings: bool

    @classmethod
    def from_config(cls, cfg: dict) -> "HParams":
        def need(key: str):
            if key not in cfg:
                raise ConversionError(f"config.json: missing {key}")
            return cfg[key]

        n_head = need("num_attention_heads")
        n_embd = need("hidden_size")
        rope = cfg.get("rope_parameters") or {}
        return cls(
            n_vocab=need("vocab_size"),
            n_embd=n_embd,
            n_ff=need("intermediate_size"),
            n_layer=need("num_hidden_layers"),
            n_head=n_head,
            n_head_kv=cfg.get("num_key_value_heads") or n_head,
            head_dim=cfg.get("head_dim") or n_embd // n_head,
            n_ctx_train=cfg.get("max_position_embeddings", 2048),
            rms_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores q/k rows for rotate-half RoPE; llama.cpp's llama graph rotates adjacent pairs."""
    # (n_head * head_dim, n_in) -> (n_head, 2, head_dim/2, n_in) -> swap the middle axes
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


Transform = Callable[[np.ndarray, HParams], np.ndarray]


@dataclass(frozen=True)
class Arch:
    gguf_name: str
    # (HF name regex with one (\d+) for the layer, or none) -> (GGUF name template, transform or None)
    tensor_map: dict[str, tuple[str, Transform | None]]

    def gguf_tensor(self, hf_name: str) -> tuple[str, Transform | None] | None:
        for pattern, (template, fn) in self.tensor_map.items():
            m = re.fullmatch(pattern, hf_name)
            if m:
                return template.format(*m.groups()), fn
        return None

    def metadata(self, hp: HParams) -> dict[str, object]:
        a = self.gguf_name
        kv: dict[str, object] = {
            f"{a}.vocab_size": hp.n_vocab,
            f"{a}.context_length": hp.n_ctx_train,
            f"{a}.embedding_length": hp.n_embd,
            f"{a}.block_count": hp.n_layer,
            f"{a}.feed_forward_length": hp.n_ff,
            f"{a}.attention.head_count": hp.n_head,
            f"{a}.attention.head_count_kv": hp.n_head_kv,
            f"{a}.attention.layer_norm_rms_epsilon": float(hp.rms_eps),
            f"{a}.rope.freq_base": float(hp.rope_theta),
            f"{a}.rope.dimension_count": hp.head_dim,
        }
        if hp.head_dim != hp.n_embd // hp.n_head:
            kv[f"{a}.attention.key_length"] = hp.head_dim
            kv[f"{a}.attention.value_length"] = hp.head_dim
        return kv

    def expected_tensors(self, hp: HParams) -> list[str]:
        """GGUF tensor names a complete checkpoint must provide."""
        names = ["token_embd.weight", "output_norm.weight"]
        if not hp.tied_embeddings:
            names.append("output.weight")
        per_layer = [t for p, (t, _) in self.tensor_map.items() if r"(\d+)" in p]
        names += [t.format(i) for i in range(hp.n_layer) for t in per_layer]
        return names


_LAYER = r"model\.layers\.(\d+)\."
_permute_q = lambda w, hp: permute_rope(w, hp.n_head)  # noqa: E731
_permute_k = lambda w, hp: permute_rope(w, hp.n_head_kv)  # noqa: E731


def _decoder_map(rope_permute: bool) -> dict[str, tuple[str, Transform | None]]:
    """The tensor table every Llama-family decoder shares."""
    return {
        r"model\.embed_tokens\.weight": ("token_embd.weight", None),
        r"model\.norm\.weight": ("output_norm.weight", None),
        r"lm_head\.weight": ("output.weight", None),
        _LAYER + r"input_layernorm\.weight": ("blk.{}.attn_norm.weight", None),
        _LAYER + r"self_attn\.q_proj\.weight": ("blk.{}.attn_q.weight", _permute_q if rope_permute else None),
        _LAYER + r"self_attn\.k_proj\.weight": ("blk.{}.attn_k.weight", _permute_k if rope_permute else None),
        _LAYER + r"self_attn\.v_proj\.weight": ("blk.{}.attn_v.weight", None),
        _LAYER + r"self_attn\.o_proj\.weight": ("blk.{}.attn_output.weight", None),
        _LAYER + r"post_attention_layernorm\.weight": ("blk.{}.ffn_norm.weight", None),
        _LAYER + r"mlp\.gate_proj\.weight": ("blk.{}.ffn_gate.weight", None),
        _LAYER + r"mlp\.up_proj\.weight": ("blk.{}.ffn_up.weight", None),
        _LAYER + r"mlp\.down_proj\.weight": ("blk.{}.ffn_down.weight", None),
    }


# llama.cpp's llama graph rotates adjacent pairs, so HF's q/k rows are permuted;
# qwen2/qwen3 use NeoX-style rotation like HF and take them as they are.
LLAMA = Arch("llama", _decoder_map(rope_permute=True))
QWEN2 = Arch("qwen2", _decoder_map(rope_permute=False) | {
    _LAYER + r"self_attn\.q_proj\.bias": ("blk.{}.attn_q.bias", None),
    _LAYER + r"self_attn\.k_proj\.bias": ("blk.{}.attn_k.bias", None),
    _LAYER + r"self_attn\.v_proj\.bias": ("blk.{}.attn_v.bias", None),
})
QWEN3 = Arch("qwen3", _decoder_map(rope_permute=False) | {
    _LAYER + r"self_attn\.q_norm\.weight": ("blk.{}.attn_q_norm.weight", None),
    _LAYER + r"self_attn\.k_norm\.weight": ("blk.{}.attn_k_norm.weight", None),
})

ARCHITECTURES = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,  # same graph in llama.cpp; sliding window unused by Mistral 7B v0.2+
    "Qwen2ForCausalLM": QWEN2,
    "Qwen3ForCausalLM": QWEN3,
}


def arch_for(config: dict) -> Arch:
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise ConversionError(
        f"unsupported architecture {', '.join(names) or '(none in config.json)'}; "
        f"supported: {', '.join(sorted(ARCHITECTURES))}"
    )
