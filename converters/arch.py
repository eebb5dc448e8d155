"""Architectures: how a transformers config and its tensor names map onto GGUF.

Each architecture is one `Arch` entry: the GGUF architecture name, the tensor-name
table with per-tensor transforms, and what its llama.cpp graph can reproduce (RoPE
scaling, activation, extra keys). Later architectures add entries, not branches.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from edgelm.errors import ConversionError


def _rope_parameters(cfg: dict) -> dict:
    """transformers v5's `rope_parameters`, or v4's top-level keys plus `rope_scaling`, as one dict."""
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if "full_attention" in rope or "sliding_attention" in rope:
        raise ConversionError("config.json: per-layer-type rope_parameters are not supported")
    rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
    if rope["rope_type"] == "su":  # early Phi-3 128k configs' name for longrope
        rope["rope_type"] = "longrope"
    for key in ("rope_theta", "partial_rotary_factor", "original_max_position_embeddings"):
        if rope.get(key) is None and cfg.get(key) is not None:
            rope[key] = cfg[key]
    return rope


@dataclass(frozen=True)
class HParams:
    n_vocab: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int  # rotated dims per head: head_dim * partial_rotary_factor
    n_ctx_train: int
    rms_eps: float
    rope_theta: float
    tied_embeddings: bool
    act: str | None  # hidden activation, None when config.json does not say
    rope: dict = field(default_factory=dict, compare=False)  # rope_parameters, rope_type always set
    cfg: dict = field(default_factory=dict, compare=False, repr=False)  # config.json, for arch-only keys

    @classmethod
    def from_config(cls, cfg: dict) -> "HParams":
        def need(key: str):
            if cfg.get(key) is None:
                raise ConversionError(f"config.json: missing {key}")
            return cfg[key]

        n_head = need("num_attention_heads")
        n_embd = need("hidden_size")
        head_dim = cfg.get("head_dim") or n_embd // n_head
        rope = _rope_parameters(cfg)
        return cls(
            n_vocab=need("vocab_size"),
            n_embd=n_embd,
            n_ff=need("intermediate_size"),
            n_layer=need("num_hidden_layers"),
            n_head=n_head,
            n_head_kv=cfg.get("num_key_value_heads") or n_head,
            head_dim=head_dim,
            n_rot=int(head_dim * (rope.get("partial_rotary_factor") or 1.0)),
            n_ctx_train=cfg.get("max_position_embeddings") or 2048,
            rms_eps=cfg.get("rms_norm_eps") or 1e-6,
            rope_theta=rope.get("rope_theta") or 10000.0,
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            act=cfg.get("hidden_activation") or cfg.get("hidden_act"),
            rope=rope,
            cfg=cfg,
        )

    def rope_param(self, key: str):
        if self.rope.get(key) is None:
            raise ConversionError(f"config.json: {self.rope['rope_type']} RoPE scaling needs rope_parameters.{key}")
        return self.rope[key]


# ---------------------------------------------------------------- RoPE scaling
# transformers' rope_type -> (GGUF keys without the arch prefix, generated tensors).
# llama.cpp reads the scaling from keys, or from per-frequency divisors in a tensor.
RopeScaling = Callable[[HParams], tuple[dict[str, object], dict[str, np.ndarray]]]


def _rope_linear(hp: HParams):
    return {"rope.scaling.type": "linear", "rope.scaling.factor": float(hp.rope_param("factor"))}, {}


def _rope_llama3(hp: HParams):
    """Llama 3.1+: llama.cpp divides each frequency by rope_freqs[i], computed here as transformers does."""
    factor, lo, hi, n_ctx_orig = (hp.rope_param(k) for k in
                                  ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"))
    wavelen = 2 * math.pi * hp.rope_theta ** (np.arange(0, hp.n_rot, 2) / hp.n_rot)
    with np.errstate(divide="ignore", invalid="ignore"):  # hi == lo leaves no band to smooth
        smooth = (n_ctx_orig / wavelen - lo) / (hi - lo)
        divisor = np.where(wavelen < n_ctx_orig / hi, 1.0,
                           np.where(wavelen > n_ctx_orig / lo, factor, 1 / ((1 - smooth) / factor + smooth)))
    return {}, {"rope_freqs.weight": divisor.astype(np.float32)}  # (n_rot/2,)


def _rope_longrope(hp: HParams):
    """Phi-3: per-frequency divisors for short and long contexts, plus a cos/sin scale.

    llama.cpp picks the long set when the context exceeds the original length;
    transformers picks it when the sequence does.
    """
    n_ctx_orig = hp.rope_param("original_max_position_embeddings")
    long, short = hp.rope_param("long_factor"), hp.rope_param("short_factor")
    if len(long) != hp.n_rot // 2 or len(short) != hp.n_rot // 2:
        raise ConversionError(f"config.json: longrope needs {hp.n_rot // 2} long and short factors, "
                              f"got {len(long)} and {len(short)}")
    factor = hp.rope.get("factor") or hp.n_ctx_train / n_ctx_orig
    attn_factor = hp.rope.get("attention_factor")
    if attn_factor is None:  # transformers' default for longrope
        attn_factor = math.sqrt(1 + math.log(factor) / math.log(n_ctx_orig)) if factor > 1 else 1.0
    kv = {
        "rope.scaling.type": "longrope",
        "rope.scaling.attn_factor": float(attn_factor),
        "rope.scaling.original_context_length": int(n_ctx_orig),
    }
    return kv, {"rope_factors_long.weight": np.asarray(long, np.float32),
                "rope_factors_short.weight": np.asarray(short, np.float32)}


ROPE_SCALINGS: dict[str, RopeScaling] = {
    "default": lambda hp: ({}, {}),
    "linear": _rope_linear,
    "llama3": _rope_llama3,
    "longrope": _rope_longrope,
}


# ---------------------------------------------------------------- tensor shapes
def _shapes(hp: HParams) -> dict[str, tuple[int, ...]]:
    """Numpy-order shapes of the standard GGUF tensors; "{}" stands for the layer."""
    e, q, kv, ff = hp.n_embd, hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim, hp.n_ff
    return {
        "token_embd.weight": (hp.n_vocab, e),
        "output.weight": (hp.n_vocab, e),
        "output_norm.weight": (e,),
        "blk.{}.attn_norm.weight": (e,),
        "blk.{}.attn_q.weight": (q, e),
        "blk.{}.attn_k.weight": (kv, e),
        "blk.{}.attn_v.weight": (kv, e),
        "blk.{}.attn_qkv.weight": (q + 2 * kv, e),
        "blk.{}.attn_q.bias": (q,),
        "blk.{}.attn_k.bias": (kv,),
        "blk.{}.attn_v.bias": (kv,),
        "blk.{}.attn_q_norm.weight": (hp.head_dim,),
        "blk.{}.attn_k_norm.weight": (hp.head_dim,),
        "blk.{}.attn_output.weight": (e, q),
        "blk.{}.post_attention_norm.weight": (e,),
        "blk.{}.ffn_norm.weight": (e,),
        "blk.{}.ffn_gate.weight": (ff, e),
        "blk.{}.ffn_up.weight": (ff, e),
        "blk.{}.ffn_down.weight": (e, ff),
        "blk.{}.post_ffw_norm.weight": (e,),
    }


# ---------------------------------------------------------------- the Arch entry
Transform = Callable[[np.ndarray, HParams], np.ndarray]
_SILU = frozenset({"silu", "swish"})


@dataclass(frozen=True)
class Arch:
    gguf_name: str
    # (HF name regex with one (\d+) for the layer, or none) -> (GGUF name template, transform or None)
    tensor_map: dict[str, tuple[str, Transform | None]]
    # transformers rope_type values this llama.cpp graph reproduces (see ROPE_SCALINGS)
    rope_scalings: tuple[str, ...] = ("default", "linear")
    partial_rotary: bool = False  # the graph can rotate fewer dims than head_dim
    activations: frozenset[str] = _SILU
    always_tied: bool = False  # the graph reuses token_embd as output, so an untied checkpoint cannot load
    shapes: Callable[[HParams], dict[str, tuple[int, ...]]] | None = None  # overrides of _shapes
    # arch-only GGUF keys (without the prefix); raises for configs the graph cannot reproduce
    extra_kv: Callable[[HParams], dict[str, object]] | None = None

    def hparams(self, cfg: dict) -> HParams:
        """config.json's hyperparameters; refuses what this architecture's llama.cpp graph would compute differently."""
        hp = HParams.from_config(cfg)
        name = (cfg.get("architectures") or [self.gguf_name])[0]
        if hp.act is not None and hp.act not in self.activations:
            raise ConversionError(f"config.json: {name} with activation {hp.act} is not supported "
                                  f"(llama.cpp's {self.gguf_name} graph uses {'/'.join(sorted(self.activations))})")
        kind = hp.rope["rope_type"]
        if kind not in self.rope_scalings:
            raise ConversionError(f"config.json: RoPE scaling {kind!r} is not supported for {name} "
                                  f"(supported: {', '.join(self.rope_scalings)})")
        if hp.n_rot != hp.head_dim and not self.partial_rotary:
            raise ConversionError(f"config.json: partial rotary embeddings are not supported for {name}")
        if self.always_tied:
            if cfg.get("tie_word_embeddings") is False:
                raise ConversionError(f"config.json: {name} with untied embeddings is not supported "
                                      f"(llama.cpp's {self.gguf_name} graph always reuses token_embd as output)")
            hp = replace(hp, tied_embeddings=True)
        self.metadata(hp)  # extra_kv validates too; fail before any tensor is read
        return hp

    def gguf_tensor(self, hf_name: str) -> tuple[str, Transform | None] | None:
        for pattern, (template, fn) in self.tensor_map.items():
            m = re.fullmatch(pattern, hf_name)
            if m:
                return template.format(*m.groups()), fn
        return None

    def metadata(self, hp: HParams) -> dict[str, object]:
        kv: dict[str, object] = {
            "vocab_size": hp.n_vocab,
            "context_length": hp.n_ctx_train,
            "embedding_length": hp.n_embd,
            "block_count": hp.n_layer,
            "feed_forward_length": hp.n_ff,
            "attention.head_count": hp.n_head,
            "attention.head_count_kv": hp.n_head_kv,
            "attention.layer_norm_rms_epsilon": float(hp.rms_eps),
            "rope.freq_base": float(hp.rope_theta),
            "rope.dimension_count": hp.n_rot,
        }
        if hp.head_dim != hp.n_embd // hp.n_head:
            kv["attention.key_length"] = hp.head_dim
            kv["attention.value_length"] = hp.head_dim
        kv |= ROPE_SCALINGS[hp.rope["rope_type"]](hp)[0]
        if self.extra_kv:
            kv |= self.extra_kv(hp)
        return {f"{self.gguf_name}.{k}": v for k, v in kv.items()}

    def generated_tensors(self, hp: HParams) -> dict[str, np.ndarray]:
        """Tensors llama.cpp needs that the checkpoint does not hold (RoPE frequency factors)."""
        return ROPE_SCALINGS[hp.rope["rope_type"]](hp)[1]

    def expected_tensors(self, hp: HParams) -> list[str]:
        """GGUF tensor names a complete checkpoint must provide."""
        names = ["token_embd.weight", "output_norm.weight"]
        if not hp.tied_embeddings:
            names.append("output.weight")
        per_layer = [t for p, (t, _) in self.tensor_map.items() if r"(\d+)" in p]
        names += [t.format(i) for i in range(hp.n_layer) for t in per_layer]
        return names

    def expected_shapes(self, hp: HParams) -> dict[str, tuple[int, ...]]:
        """GGUF tensor name -> numpy-order shape the config implies."""
        table = _shapes(hp) | (self.shapes(hp) if self.shapes else {})
        out = {}
        for template, shape in table.items():
            for i in range(hp.n_layer) if "{}" in template else [None]:
                out[template.format(i)] = shape
        return out


# ---------------------------------------------------------------- tensor tables
_LAYER = r"model\.layers\.(\d+)\."
_permute_q = lambda w, hp: permute_rope(w, hp.n_head)  # noqa: E731
_permute_k = lambda w, hp: permute_rope(w, hp.n_head_kv)  # noqa: E731


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores q/k rows for rotate-half RoPE; llama.cpp's llama graph rotates adjacent pairs."""
    # (n_head * head_dim, n_in) -> (n_head, 2, head_dim/2, n_in) -> swap the middle axes
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


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


def _norms_plus_one(table: dict[str, tuple[str, Transform | None]]) -> dict[str, tuple[str, Transform | None]]:
    """Gemma's RMSNorm scales by (1 + weight); llama.cpp's by weight, so the GGUF stores weight + 1."""
    return {p: (t, (lambda w, hp: w + 1) if t.endswith("norm.weight") else fn) for p, (t, fn) in table.items()}


# ---------------------------------------------------------------- arch-only keys
def _phi3_kv(hp: HParams) -> dict[str, object]:
    # llama.cpp sizes phi3's attn_output as n_embd x n_embd.
    # No sliding_window key: llama.cpp ignores it for phi3 (and warns), attending to the whole context.
    if hp.n_head * hp.head_dim != hp.n_embd:
        raise ConversionError(f"config.json: Phi3 with head_dim {hp.head_dim} * {hp.n_head} heads != "
                              f"hidden_size {hp.n_embd} is not supported by llama.cpp's phi3 graph")
    return {}


def _gemma2_kv(hp: HParams) -> dict[str, object]:
    cfg = hp.cfg
    # llama.cpp hard-codes the query scale by model size: 27B (46 layers) uses n_embd/n_head, the rest head_dim
    scalar = hp.n_embd // hp.n_head if hp.n_layer == 46 else hp.head_dim
    if cfg.get("query_pre_attn_scalar", scalar) != scalar:
        raise ConversionError(f"config.json: Gemma2 query_pre_attn_scalar {cfg['query_pre_attn_scalar']} is not "
                              f"supported (llama.cpp's gemma2 graph scales queries by 1/sqrt({scalar}))")
    for key in ("attn_logit_softcapping", "final_logit_softcapping", "sliding_window"):
        if cfg.get(key) is None:  # llama.cpp applies all three unconditionally
            raise ConversionError(f"config.json: Gemma2 without {key} is not supported")
    # llama.cpp's pattern: even layers slide, odd layers attend globally
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(hp.n_layer)]
    if (cfg.get("layer_types") or alternating) != alternating:
        raise ConversionError("config.json: Gemma2 layer_types other than alternating sliding/full are not supported")
    return {
        "attn_logit_softcapping": float(cfg["attn_logit_softcapping"]),
        "final_logit_softcapping": float(cfg["final_logit_softcapping"]),
        "attention.sliding_window": int(cfg["sliding_window"]),
    }


# ---------------------------------------------------------------- the entries
# llama.cpp's llama graph rotates adjacent pairs, so HF's q/k rows are permuted;
# the others use NeoX-style rotation like HF and take them as they are.
LLAMA = Arch("llama", _decoder_map(rope_permute=True), rope_scalings=("default", "linear", "llama3"))
QWEN2 = Arch("qwen2", _decoder_map(rope_permute=False) | {
    _LAYER + r"self_attn\.q_proj\.bias": ("blk.{}.attn_q.bias", None),
    _LAYER + r"self_attn\.k_proj\.bias": ("blk.{}.attn_k.bias", None),
    _LAYER + r"self_attn\.v_proj\.bias": ("blk.{}.attn_v.bias", None),
})
# A Qwen2 whose heads no longer span the hidden size (pruned heads or hidden dimensions): llama.cpp's
# qwen2 graph sizes attn_q as hidden × hidden, its llama graph takes any head count and adds q/k/v biases too.
QWEN2_AS_LLAMA = Arch("llama", _decoder_map(rope_permute=True) | {
    _LAYER + r"self_attn\.q_proj\.bias": ("blk.{}.attn_q.bias", _permute_q),
    _LAYER + r"self_attn\.k_proj\.bias": ("blk.{}.attn_k.bias", _permute_k),
    _LAYER + r"self_attn\.v_proj\.bias": ("blk.{}.attn_v.bias", None),
})
QWEN3 = Arch("qwen3", _decoder_map(rope_permute=False) | {
    _LAYER + r"self_attn\.q_norm\.weight": ("blk.{}.attn_q_norm.weight", None),
    _LAYER + r"self_attn\.k_norm\.weight": ("blk.{}.attn_k_norm.weight", None),
})
# Phi-3 keeps HF's fused projections: attn_qkv is [q; k; v] rows and ffn_up is [gate; up]
# rows, the order llama.cpp's views and fused SwiGLU split them in.
_UNFUSED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
PHI3 = Arch("phi3", {  # the shared table with q/k/v and gate/up fused, as HF and llama.cpp both store them
    **{k: v for k, v in _decoder_map(rope_permute=False).items() if not any(u in k for u in _UNFUSED)},
    _LAYER + r"self_attn\.qkv_proj\.weight": ("blk.{}.attn_qkv.weight", None),
    _LAYER + r"mlp\.gate_up_proj\.weight": ("blk.{}.ffn_up.weight", None),
}, rope_scalings=("default", "linear", "longrope"), partial_rotary=True,
    shapes=lambda hp: {"blk.{}.ffn_up.weight": (2 * hp.n_ff, hp.n_embd)}, extra_kv=_phi3_kv)
# Gemma's reference implementation uses the tanh GELU even where configs say "gelu".
_GELU_TANH = frozenset({"gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu"})
GEMMA = Arch("gemma", _norms_plus_one(_decoder_map(rope_permute=False)), activations=_GELU_TANH, always_tied=True)
GEMMA2 = Arch("gemma2", _norms_plus_one(_decoder_map(rope_permute=False) | {
    _LAYER + r"post_attention_layernorm\.weight": ("blk.{}.post_attention_norm.weight", None),
    _LAYER + r"pre_feedforward_layernorm\.weight": ("blk.{}.ffn_norm.weight", None),
    _LAYER + r"post_feedforward_layernorm\.weight": ("blk.{}.post_ffw_norm.weight", None),
}), activations=_GELU_TANH, always_tied=True, extra_kv=_gemma2_kv)

ARCHITECTURES = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,  # same graph in llama.cpp; sliding window unused by Mistral 7B v0.2+
    "Qwen2ForCausalLM": QWEN2,
    "Qwen3ForCausalLM": QWEN3,
    "Phi3ForCausalLM": PHI3,
    "GemmaForCausalLM": GEMMA,
    "Gemma2ForCausalLM": GEMMA2,
}


def arch_for(config: dict) -> Arch:
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            arch = ARCHITECTURES[name]
            if arch is QWEN2:
                hp = HParams.from_config(config)
                if hp.n_head * hp.head_dim != hp.n_embd:
                    return QWEN2_AS_LLAMA
            return arch
    raise ConversionError(
        f"unsupported architecture {', '.join(names) or '(none in config.json)'}; "
        f"supported: {', '.join(sorted(ARCHITECTURES))}"
    )
