"""Control vectors: steer a model by adding a direction to the output of its layers, as llama.cpp's
`--control-vector FILE`, `--control-vector-scaled FILE SCALE` and `--control-vector-layer-range START END`;
and `make_control_vector`, which derives the directions from pairs of contrasting prompts (llama.cpp's
cvector-generator does this in C++; here the hidden states come through an eval callback).

A control-vector GGUF holds one f32 vector of n_embd values per layer, named `direction.{il}` for layers
il >= 1 (layer 0's output is never steered). With several files the scaled directions add up; llama.cpp then
adds the sum for layer il to that layer's output (graph node `l_out-{il}`), for il in the layer range.
"""
from __future__ import annotations

import ctypes
import hashlib
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as lib
import numpy as np

from edgelm.errors import GGUFError, ModelLoadError, UsageError
from edgelm.gguf_reader import GGUFFile, read_gguf

ARCH = "controlvector"


@dataclass(frozen=True)
class ControlVector:
    """The summed, scaled directions for layers 1..n_layer-1 and the layer range they apply to."""

    directions: np.ndarray  # (n_layer - 1, n_embd) float32: row il - 1 is layer il's
    layer_start: int  # inclusive, >= 1
    layer_end: int  # inclusive, <= n_layer - 1
    fingerprint: str

    def apply(self, ctx) -> None:
        """Set the vector on a new llama_context."""
        data = np.ascontiguousarray(self.directions, dtype=np.float32)
        rc = lib.llama_set_adapter_cvec(ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), data.size,
                                        data.shape[1], self.layer_start, self.layer_end)
        if rc != 0:
            raise ModelLoadError("llama.cpp could not set the control vector on a context")


def read_directions(info: GGUFFile, n_embd: int, n_layer: int) -> dict[int, np.ndarray]:
    """layer -> direction of one control-vector file, checked as llama.cpp's loader would (before it reads it)."""
    path = info.path
    out = {}
    for t in info.tensors:
        prefix, _, layer = t.name.partition(".")
        if prefix != "direction" or not layer.isdigit():
            raise GGUFError(f"{path}: tensor {t.name} is not a direction.N: not a control vector")
        il = int(layer)
        if not 1 <= il < n_layer:
            raise GGUFError(f"{path}: {t.name}: this model steers layers 1..{n_layer - 1}")
        if t.type_name != "f32" or len(t.shape) != 1 or t.shape[0] != n_embd:
            raise GGUFError(f"{path}: {t.name} is {t.type_name} {list(t.shape)}; the model needs f32 [{n_embd}]")
        out[il] = np.frombuffer(info.tensor_bytes(t), dtype=np.float32).copy()
    if not out:
        raise GGUFError(f"{path}: no direction tensors: not a control vector")
    return out


def control_vector(value, n_embd: int, n_layer: int, layer_range: tuple[int, int] | None = None) -> ControlVector:
    """`control=` as the API takes it (a path, (path, scale), or a list of them) as one summed vector."""
    from .lora import lora_specs, resolve_spec  # the same argument shapes as lora=

    total = np.zeros((n_layer - 1, n_embd), np.float32)
    h = hashlib.sha256()
    for spec in lora_specs(value, "control"):
        info = read_gguf(resolve_spec(spec, "control vector"))
        for il, direction in read_directions(info, n_embd, n_layer).items():
            total[il - 1] += spec.scale * direction
        h.update(f"{info.fingerprint()}*{spec.scale!r}\n".encode())
    start, end = layer_range or (1, n_layer - 1)
    if not (isinstance(start, int) and isinstance(end, int) and 1 <= start <= end <= n_layer - 1):
        raise UsageError(f"control vector layer range {start}..{end}: layers 1..{n_layer - 1} of this model")
    h.update(f"{start}-{end}".encode())
    return ControlVector(total, start, end, h.hexdigest())


# ---------------------------------------------------------------------------- making one


def make_control_vector(model_path, positive: list[str], negative: list[str], *, method: str = "mean",
                        n_threads: int | None = None) -> np.ndarray:
    """Directions (n_layer - 1, n_embd) for layers 1..n_layer-1 from paired prompts: per pair, the difference of
    each layer's output at the prompt's last token, positive minus negative; "mean" averages the differences,
    "pca" takes their first principal component (signed and scaled to the mean difference's projection)."""
    from .context import Context, ContextOptions
    from .exits import _Hidden
    from .model import LlamaModel

    if method not in ("mean", "pca"):
        raise UsageError(f"method must be mean or pca, not {method!r}")
    if len(positive) != len(negative) or not positive:
        raise UsageError(f"{len(positive)} positive and {len(negative)} negative prompts: give them in pairs")
    with LlamaModel(model_path) as model:
        prompts = [model.tokenize(p) for p in (*positive, *negative)]
        if min(map(len, prompts)) < 1:
            raise UsageError("an empty prompt")
        n_ctx = max(map(len, prompts))
        hidden = _Hidden(model.n_layer)
        ctx = Context(model, ContextOptions(n_ctx=n_ctx, n_batch=n_ctx, n_threads=n_threads),
                      eval_callback=hidden.callback)
        last = []  # per prompt: (n_layer, n_embd) at its last token
        try:
            for tokens in prompts:
                ctx.clear()
                for rows in hidden.rows.values():
                    rows.clear()
                ctx.decode(tokens, 0)
                if hidden.error is not None:
                    raise hidden.error
                last.append(np.stack([hidden.rows[i][-1][-1] for i in range(model.n_layer)]))
        finally:
            ctx.close()
    states = np.stack(last)  # (2 * pairs, n_layer, n_embd)
    diffs = (states[:len(positive)] - states[len(positive):])[:, 1:]  # layers 1..n_layer-1
    mean = diffs.mean(axis=0)
    if method == "mean" or len(positive) < 2:
        return mean.astype(np.float32)
    out = np.empty_like(mean)
    for i in range(diffs.shape[1]):
        _, _, vt = np.linalg.svd(diffs[:, i], full_matrices=False)
        pc = vt[0] * np.sign(vt[0] @ mean[i] or 1.0)
        out[i] = pc * (pc @ mean[i])
    return out.astype(np.float32)


def write_control_vector(path, directions: np.ndarray, *, model_hint: str = "") -> Path:
    """A control-vector GGUF (direction.1 .. direction.{n}), written atomically."""
    import gguf

    from edgelm.fsutil import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_string(f"{ARCH}.model_hint", model_hint)
        writer.add_uint32(f"{ARCH}.layer_count", len(directions))
        for il, direction in enumerate(directions, start=1):
            writer.add_tensor(f"direction.{il}", np.ascontiguousarray(direction, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path

