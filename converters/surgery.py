"""Structural edits of a llama-family checkpoint that leave a standard one: fewer layers, FFN channels,
attention heads or hidden dimensions, tied embeddings, sparse weights.

Weights are held as float32 numpy arrays under their Hugging Face names; every edit returns new
`Weights` whose config.json describes exactly the shapes it holds, so transformers loads the
result and `edgelm convert` turns it into a GGUF stock llama.cpp runs.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from edgelm.errors import ConversionError

from .checkpoint import Checkpoint
from .export import atomic_folder

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")  # model_type values: one tensor layout
ATTN_IN = ("q_proj", "k_proj", "v_proj")  # read the normalized residual stream
FFN_IN = ("gate_proj", "up_proj")
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# tokenizer and generation files travel with the weights unchanged
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
               "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "README.md", "LICENSE")


def copy_side_files(source: Path, dest: Path) -> None:
    """The tokenizer and generation files a checkpoint carries unchanged."""
    for name in SIDE_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, dest / name)


def attn(i: int, proj: str, kind: str = "weight") -> str:
    return f"model.layers.{i}.self_attn.{proj}.{kind}"


def mlp(i: int, proj: str, kind: str = "weight") -> str:
    return f"model.layers.{i}.mlp.{proj}.{kind}"


@dataclass
class Weights:
    config: dict
    tensors: dict[str, np.ndarray]  # HF name -> float32 array
    source: Path  # where tokenizer and generation files come from
    dtype: str = "float16"  # what save() writes: float16, or float32 for float32/bfloat16 sources
    files: dict[str, str] = field(default_factory=dict)  # side files that replace the source's (a trimmed tokenizer)

    @classmethod
    def load(cls, hf_dir: str | Path) -> "Weights":
        ckpt = Checkpoint.open(hf_dir)
        try:
            model_type = ckpt.config.get("model_type")
            if model_type not in ARCHITECTURES:
                raise ConversionError(f"{hf_dir}: pruning supports {', '.join(ARCHITECTURES)} checkpoints, "
                                      f"not {model_type!r}")
            tensors = {name: ckpt.array(name) for name in ckpt if not name.endswith("rotary_emb.inv_freq")}
            dtypes = {ref.dtype for ref in ckpt.tensors.values()}
        finally:
            ckpt.close()
        w = cls(dict(ckpt.config), tensors, Path(hf_dir), "float16" if dtypes == {"F16"} else "float32")
        w.check()
        return w

    # ------------------------------------------------------------ shapes
    @property
    def n_layer(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def n_head(self) -> int:
        return int(self.config["num_attention_heads"])

    @property
    def n_head_kv(self) -> int:
        return int(self.config.get("num_key_value_heads") or self.n_head)

    @property
    def head_dim(self) -> int:
        return int(self.config.get("head_dim") or self.config["hidden_size"] // self.n_head)

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False)) or "lm_head.weight" not in self.tensors

    @property
    def n_params(self) -> int:
        return sum(int(a.size) for a in self.tensors.values())

    def predicted_params(self, config: dict) -> int:
        """Parameters of this checkpoint reshaped to `config` (a plan's size, before building it)."""
        d, v, ff = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
        nh = config["num_attention_heads"]
        nkv = config.get("num_key_value_heads") or nh
        hd = config.get("head_dim") or d // nh
        has = self.tensors.__contains__
        per_layer = 2 * d * hd * (nh + nkv) + 3 * d * ff + 2 * d
        per_layer += hd * (nh + 2 * nkv) * has(attn(0, "q_proj", "bias")) + d * has(attn(0, "o_proj", "bias"))
        per_layer += (2 * ff + d) * has(mlp(0, "down_proj", "bias"))
        per_layer += 2 * hd * has("model.layers.0.self_attn.q_norm.weight")
        n_vocab_matrices = 1 if config.get("tie_word_embeddings", self.tied) else 2
        return v * d * n_vocab_matrices + d + config["num_hidden_layers"] * per_layer

    def head(self) -> np.ndarray:
        return self.tensors["model.embed_tokens.weight"] if self.tied else self.tensors["lm_head.weight"]

    def check(self) -> None:
        """Every tensor the config implies, with the shape it implies."""
        d, hd, ff = self.config["hidden_size"], self.head_dim, self.config["intermediate_size"]
        want = {"model.embed_tokens.weight": (self.config["vocab_size"], d), "model.norm.weight": (d,)}
        for i in range(self.n_layer):
            want |= {attn(i, "q_proj"): (self.n_head * hd, d), attn(i, "k_proj"): (self.n_head_kv * hd, d),
                     attn(i, "v_proj"): (self.n_head_kv * hd, d), attn(i, "o_proj"): (d, self.n_head * hd),
                     mlp(i, "gate_proj"): (ff, d), mlp(i, "up_proj"): (ff, d), mlp(i, "down_proj"): (d, ff),
                     f"model.layers.{i}.input_layernorm.weight": (d,),
                     f"model.layers.{i}.post_attention_layernorm.weight": (d,)}
        for name, shape in want.items():
            if name not in self.tensors:
                raise ConversionError(f"{self.source}: missing tensor {name}")
            if self.tensors[name].shape != shape:
                raise ConversionError(f"{self.source}: {name} has shape {list(self.tensors[name].shape)}, "
                                      f"config.json implies {list(shape)}")

    def with_(self, config: dict, tensors: dict[str, np.ndarray]) -> "Weights":
        out = replace(self, config=config, tensors=tensors)
        out.check()
        return out

    # ------------------------------------------------------------ saving
    def save(self, out_dir: str | Path, extra_files: dict[str, str] | None = None) -> Path:
        """Write a transformers checkpoint directory; `out_dir` appears complete or not at all."""
        from safetensors.numpy import save_file

        out = Path(out_dir)
        with atomic_folder(out) as tmp:
            dtype = np.float16 if self.dtype == "float16" else np.float32
            arrays = {k: np.ascontiguousarray(v.astype(dtype)) for k, v in self.tensors.items()}
            save_file(arrays, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            config = dict(self.config, dtype=self.dtype)
            config.pop("torch_dtype", None)
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            copy_side_files(self.source, tmp)
            for name, text in (self.files | (extra_files or {})).items():
                (tmp / name).write_text(text)
        return out


# ---------------------------------------------------------------- depth
def drop_layers(w: Weights, drop: list[int]) -> Weights:
    """Remove whole decoder layers and renumber the rest."""
    drop_set = set(drop)
    if bad := sorted(i for i in drop_set if not 0 <= i < w.n_layer):
        raise ConversionError(f"no layer {bad[0]}: the model has layers 0..{w.n_layer - 1}")
    keep = [i for i in range(w.n_layer) if i not in drop_set]
    if not keep:
        raise ConversionError(f"cannot remove all {w.n_layer} layers")
    renumber = {old: new for new, old in enumerate(keep)}
    tensors = {}
    for name, a in w.tensors.items():
        m = _LAYER.fullmatch(name)
        if m is None:
            tensors[name] = a
        elif int(m.group(1)) in renumber:
            tensors[f"model.layers.{renumber[int(m.group(1))]}.{m.group(2)}"] = a
    config = dict(w.config, num_hidden_layers=len(keep))
    for key in ("layer_types",):  # per-layer lists follow their layers
        if isinstance(config.get(key), list) and len(config[key]) == w.n_layer:
            config[key] = [config[key][i] for i in keep]
    return w.with_(config, tensors)


# ---------------------------------------------------------------- width
def keep_ffn_channels(w: Weights, keep: list[np.ndarray]) -> Weights:
    """Keep FFN channels `keep[i]` (indices, the same count in every layer) of each layer."""
    sizes = {len(k) for k in keep}
    if len(keep) != w.n_layer or len(sizes) != 1 or 0 in sizes:
        raise ConversionError("FFN pruning keeps the same, non-zero number of channels in every layer")
    tensors = dict(w.tensors)
    for i, idx in enumerate(keep):
        idx = np.sort(idx)
        for proj in FFN_IN:
            tensors[mlp(i, proj)] = w.tensors[mlp(i, proj)][idx]
            if mlp(i, proj, "bias") in tensors:
                tensors[mlp(i, proj, "bias")] = w.tensors[mlp(i, proj, "bias")][idx]
        tensors[mlp(i, "down_proj")] = w.tensors[mlp(i, "down_proj")][:, idx]
    return w.with_(dict(w.config, intermediate_size=sizes.pop()), tensors)


def keep_heads(w: Weights, kv_keep: list[np.ndarray], q_keep: list[list[np.ndarray]]) -> Weights:
    """Keep KV groups `kv_keep[i]` and, within each kept group j, its query heads `q_keep[i][j]`
    (0-based within the group). Every layer keeps the same counts, so GQA groups stay whole."""
    group = w.n_head // w.n_head_kv
    n_kv = {len(k) for k in kv_keep}
    n_q = {len(q) for per_layer in q_keep for q in per_layer}
    if len(kv_keep) != w.n_layer or len(n_kv) != 1 or len(n_q) != 1 or 0 in n_kv or 0 in n_q:
        raise ConversionError("head pruning keeps the same, non-zero number of KV groups and query heads per "
                              "group in every layer")
    hd, tensors = w.head_dim, dict(w.tensors)

    def rows(heads) -> np.ndarray:  # head indices -> row indices of a projection
        return np.concatenate([np.arange(h * hd, (h + 1) * hd) for h in heads])

    for i in range(w.n_layer):
        kv = np.sort(kv_keep[i])
        q = [g * group + qi for g, per_group in zip(kv, q_keep[i]) for qi in np.sort(per_group)]
        for proj, heads in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            r = rows(heads)
            tensors[attn(i, proj)] = w.tensors[attn(i, proj)][r]
            if attn(i, proj, "bias") in tensors:
                tensors[attn(i, proj, "bias")] = w.tensors[attn(i, proj, "bias")][r]
        tensors[attn(i, "o_proj")] = w.tensors[attn(i, "o_proj")][:, rows(q)]
    n_kv_new, n_q_new = n_kv.pop(), n_q.pop()
    config = dict(w.config, num_attention_heads=n_kv_new * n_q_new, num_key_value_heads=n_kv_new, head_dim=hd)
    return w.with_(config, tensors)


# ---------------------------------------------------------------- hidden size (SliceGPT with one rotation)
def fold_norms(w: Weights) -> Weights:
    """Multiply every RMSNorm weight into the linears that read it and set the norms to one: the
    network computes the same function, and now commutes with rotations of the residual stream."""
    tensors = dict(w.tensors)
    for i in range(w.n_layer):
        for norm, projs in (("input_layernorm", [attn(i, p) for p in ATTN_IN]),
                            ("post_attention_layernorm", [mlp(i, p) for p in FFN_IN])):
            g = tensors[f"model.layers.{i}.{norm}.weight"]
            for p in projs:
                tensors[p] = w.tensors[p] * g[None, :]
            tensors[f"model.layers.{i}.{norm}.weight"] = np.ones_like(g)
    g = tensors["model.norm.weight"]
    tensors["lm_head.weight"] = w.head() * g[None, :]  # a tied head cannot absorb the norm: untie it
    tensors["model.norm.weight"] = np.ones_like(g)
    return w.with_(dict(w.config, tie_word_embeddings=False), tensors)


def rotate_hidden(w: Weights, q: np.ndarray) -> Weights:
    """Express the residual stream in the orthonormal basis `q` (hidden × k), keeping its first k
    directions. Norms must be folded first (fold_norms). With k = hidden the model is unchanged."""
    d, k = q.shape
    if d != w.config["hidden_size"] or not 0 < k <= d:
        raise ConversionError(f"rotation of shape {list(q.shape)} does not fit hidden size {w.config['hidden_size']}")
    if any(not np.allclose(w.tensors[f"model.layers.{i}.{n}.weight"], 1.0)
           for i in range(w.n_layer) for n in ("input_layernorm", "post_attention_layernorm")):
        raise ConversionError("rotate_hidden needs folded norms (fold_norms first)")
    tensors = {}
    # RMSNorm divides by sqrt(mean x²) over k dims instead of d: scale its weight so outputs keep their size
    scale = np.float32(np.sqrt(d / k))
    for name, a in w.tensors.items():
        m = _LAYER.fullmatch(name)
        part = m.group(2) if m else name
        if name in ("model.embed_tokens.weight", "lm_head.weight") or part.endswith(
                tuple(f"{p}.weight" for p in ATTN_IN + FFN_IN)):
            tensors[name] = a @ q  # reads the residual stream
        elif part.startswith(("self_attn.o_proj.", "mlp.down_proj.")):
            tensors[name] = q.T @ a  # writes it (weights and biases)
        elif part.endswith("layernorm.weight") or name == "model.norm.weight":
            tensors[name] = np.full(k, scale, dtype=np.float32)
        else:
            tensors[name] = a
    tensors = {n: a.astype(np.float32) for n, a in tensors.items()}
    return w.with_(dict(w.config, hidden_size=k, head_dim=w.head_dim), tensors)


def principal_basis(covariance: np.ndarray) -> np.ndarray:
    """Eigenvectors of the activation covariance, strongest direction first (hidden × hidden)."""
    values, vectors = np.linalg.eigh(covariance)
    return vectors[:, np.argsort(values)[::-1]].astype(np.float32)


# ---------------------------------------------------------------- weight sharing and sparsity
def tie_embeddings(w: Weights, source: str = "embedding") -> Weights:
    """One matrix for the token embedding and the output head: the current embedding, or the head."""
    if source not in ("embedding", "head"):
        raise ConversionError(f"tie source must be 'embedding' or 'head', not {source!r}")
    tensors = dict(w.tensors)
    head = tensors.pop("lm_head.weight", None)
    if source == "head" and head is not None:
        tensors["model.embed_tokens.weight"] = head
    return w.with_(dict(w.config, tie_word_embeddings=True), tensors)


def sparsify(w: Weights, ratio: float, method: str, column_rms: dict[str, np.ndarray] | None = None) -> Weights:
    """Zero the `ratio` least important weights of every layer's linear, per output row: by |W| (magnitude)
    or by |W| times its input column's activation RMS (Wanda). Shapes and GGUF size do not change."""
    if not 0.0 < ratio < 1.0:
        raise ConversionError(f"sparsity must be in (0, 1), not {ratio}")
    if method not in ("magnitude", "wanda"):
        raise ConversionError(f"sparsity method must be 'magnitude' or 'wanda', not {method!r}")
    tensors = dict(w.tensors)
    for name, a in w.tensors.items():
        if not (_LAYER.fullmatch(name) and name.endswith("_proj.weight")):
            continue
        score = np.abs(a)
        if method == "wanda":
            if column_rms is None or name not in column_rms:
                raise ConversionError(f"wanda needs calibration activations for {name}")
            score = score * column_rms[name][None, :]
        n_zero = int(a.shape[1] * ratio)
        cut = np.argpartition(score, n_zero, axis=1)[:, :n_zero]
        out = a.copy()
        np.put_along_axis(out, cut, 0.0, axis=1)
        tensors[name] = out
    return w.with_(dict(w.config), tensors)

