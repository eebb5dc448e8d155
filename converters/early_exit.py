"""The early-exit split: one GGUF model cut at layer k into a draft and a tail that share their weights.

    model.gguf                the single-file model, untouched
    model.ee-shared.gguf      token_embd and output (split 1 of both models below; the same for every k)
    model.ee{k}-draft.gguf    split 0 of the draft D: layers 0..k-1, its exit norm as output_norm
    model.ee{k}-tail.gguf     split 0 of the tail T: layers k..L-1 renumbered from 0, the real final norm

Each model loads with `llama_model_load_from_splits([head, shared])`; both map the one shared file, so
no weight is held twice. llama.cpp checks only `split.no` of a later split, and that the head's
`split.tensors.count` equals the model's total tensor count. The heads carry `edgelm.early_exit.*`
keys that tie the three files to each other and to the source model, so that pieces of different
splits or models are refused by edgelm before llama.cpp loads them (see `check_split`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from edgelm.errors import ConversionError
# the reading side lives with the runtime; re-exported here beside the writer
from edgelm.runtime.splits import (FORMAT, KEY, SplitInfo, SplitPaths, available_splits, check_split,  # noqa: F401
                                   fingerprint, split_paths)

from .export import atomic_path

# Architectures whose layers do not depend on their index (no per-index sliding-window pattern, no
# layer-indexed scaling) and whose graph takes hidden states through llama_batch.embd unscaled (granite and
# gemma scale the input embedding even then), so layers k..L-1 renumbered from 0 compute what they did in place.
SPLIT_ARCHS = ("llama", "qwen2", "qwen3")
SHARED_TENSORS = ("token_embd.weight", "output.weight")
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")

# The draft's passthrough layer. llama.cpp's last layer keeps only the rows whose logits are asked for, so a
# draft ending at layer k-1 computes l_out-{k-1} (what the tail needs for every position) only for those rows.
# The draft therefore gets one more layer, k, that adds exactly zero, and drops the rows after l_out-{k-1} has
# all of them: prefill then asks for one row of logits instead of n_batch x n_vocab floats. A llama draft is
# written as llama.cpp's "deci" architecture (Llama with per-layer head and FFN counts; its blocks compute exactly
# what llama's do, which tests/test_early_exit.py checks bit for bit), whose layer k has no attention and an FFN
# of width 1 with zero weights: next to nothing to compute or store. Other drafts (qwen2, qwen3, a llama with
# biases) keep their architecture and get a copy of layer 0's tensors with every byte zero (every ggml type
# decodes zero bytes to 0.0): attention and FFN then add exactly 0, at the price of one layer's compute and bytes.
PASSTHROUGH_ARCH = {"llama": "deci"}
# block tensors deci computes as llama does; a llama with others (biases, MoE, scales) gets the zero layer
PASSTHROUGH_BLOCK = {"attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                     "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"}
PASSTHROUGH_FF = 1  # the passthrough layer's FFN width (all zero)


def _copy_kv(writer: gguf.GGUFWriter, reader: gguf.GGUFReader, skip: set[str], overrides: dict,
             drop_prefix: str | None = None, rename: tuple[str, str] | None = None) -> None:
    """Copy the reader's keys, except `skip`, `overrides` and `drop_prefix`; `rename` = (old arch, new arch)."""
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in skip or key == "general.architecture":
            continue
        if drop_prefix is not None and key.startswith(drop_prefix):
            continue
        if rename is not None and key.startswith(rename[0] + "."):
            key = rename[1] + key[len(rename[0]):]
        if key in overrides:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)
    for key, (value, vtype) in overrides.items():
        writer.add_key_value(key, value, vtype)


def _per_layer_arrays(reader: gguf.GGUFReader, arch: str, n_layer: int) -> dict[str, list]:
    """Hyperparameters given per layer (arrays of n_layer values), which a split must slice."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith(arch + ".") and field.types[0] == gguf.GGUFValueType.ARRAY:
            values = field.contents()
            if len(values) == n_layer:
                out[key] = values
    return out


def split_model(
    model: str | Path, k: int, *, exit_norm: np.ndarray | None = None, exit_norm_name: str = "final",
    passthrough: bool = True, exit_block: dict[str, np.ndarray] | None = None,
) -> SplitPaths:
    """Write the early-exit split of a single-file GGUF at exit layer k (1 <= k < n_layer) beside it.

    `exit_norm` (hidden,) is D's exit norm weight, for instance one trained for exits at layer k;
    None reuses the model's final norm (works, but a model not trained for early exit accepts less).
    `passthrough`: end the draft in a passthrough layer (see PASSTHROUGH_ARCH); False writes the plain
    draft of split format 2, whose prefill asks for every row's logits.
    `exit_block`: a trained exit block (EXIT_BLOCK_TENSORS, as scripts/train_exit.py writes them) that becomes the
    draft's passthrough layer and exit norm, so that D drafts from head(exit_norm(h + FFN(h))); T still receives
    h. Llama drafts only (the deci passthrough layer).
    """
    from edgelm.gguf_reader import read_gguf

    model = Path(model)
    read_gguf(model)  # edgelm's strict checks first
    reader = gguf.GGUFReader(model)
    arch = str(reader.fields["general.architecture"].contents())
    if "split.count" in reader.fields and int(reader.fields["split.count"].contents()) > 1:
        raise ConversionError(f"{model}: is itself one part of a split model; merge it first")
    if arch not in SPLIT_ARCHS:
        raise ConversionError(f"{model}: early-exit splits support {', '.join(SPLIT_ARCHS)}, not {arch}")
    n_layer = int(reader.fields[f"{arch}.block_count"].contents())
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n_layer:
        raise ConversionError(f"exit layer must be an integer in [1, {n_layer - 1}] for this {n_layer}-layer model, "
                              f"not {k!r}")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors or "output_norm.weight" not in tensors:
        raise ConversionError(f"{model}: no token_embd or output_norm tensor; not a decoder this split supports")
    final_norm = tensors["output_norm.weight"]
    n_embd = int(reader.fields[f"{arch}.embedding_length"].contents())
    n_vocab = int(tensors["token_embd.weight"].shape[1])  # gguf-py shapes are ggml's: (n_embd, n_vocab)
    if exit_block is not None:
        if exit_norm is not None:
            raise ConversionError("an exit block brings its own exit norm: give exit_norm or exit_block, not both")
        exit_block = _checked_block(exit_block, n_embd)
        exit_norm, exit_norm_name = exit_block.pop("output_norm"), "trained block"
    if exit_norm is not None:
        exit_norm = np.asarray(exit_norm, dtype=np.float32)
        if exit_norm.shape != (n_embd,) or not np.all(np.isfinite(exit_norm)):
            raise ConversionError(f"exit norm must be {n_embd} finite floats, got shape {exit_norm.shape}")
    blocks: dict[int, list] = {}
    globals_ = []
    for t in reader.tensors:
        m = _BLOCK.fullmatch(t.name)
        if m:
            blocks.setdefault(int(m.group(1)), []).append((m.group(2), t))
        elif t.name not in SHARED_TENSORS and t.name != "output_norm.weight":
            globals_.append(t)  # rope_freqs and the like: small, needed by both
    if sorted(blocks) != list(range(n_layer)):
        raise ConversionError(f"{model}: tensors of blocks {sorted(blocks)} do not match block_count {n_layer}")

    paths = split_paths(model, k)
    source = fingerprint(model)
    shared = [tensors[n] for n in SHARED_TENSORS if n in tensors]
    _write(paths.shared, arch, [(t.name, t) for t in shared], {
        "split.no": (1, gguf.GGUFValueType.UINT16),
        "split.count": (2, gguf.GGUFValueType.UINT16),
        KEY + "role": ("shared", gguf.GGUFValueType.STRING),
        KEY + "format": (FORMAT, gguf.GGUFValueType.UINT32),
        KEY + "source": (source, gguf.GGUFValueType.STRING),
    }, reader=None)
    shared_sha = fingerprint(paths.shared)
    per_layer = _per_layer_arrays(reader, arch, n_layer)
    deci = (passthrough and arch in PASSTHROUGH_ARCH and not per_layer
            and all(rest in PASSTHROUGH_BLOCK for il in range(k) for rest, _ in blocks[il]))
    if exit_block is not None and not deci:
        raise ConversionError(f"{model}: an exit block needs a llama draft with a passthrough layer (plain Llama "
                              "blocks, no per-layer arrays)")
    name = str(reader.fields["general.name"].contents()) if "general.name" in reader.fields else model.stem
    for role, lo, hi, path in (("draft", 0, k, paths.draft), ("tail", k, n_layer, paths.tail)):
        items = [(t.name, t) for t in globals_]
        for il in range(lo, hi):
            items += [(f"blk.{il - lo}.{rest}", t) for rest, t in blocks[il]]
        if role == "draft" and exit_norm is not None:
            items.append(("output_norm.weight", exit_norm))
        else:
            items.append(("output_norm.weight", final_norm))
        out_arch, n_blocks = arch, hi - lo
        overrides = {}
        if role == "draft" and deci:
            out_arch, n_blocks = PASSTHROUGH_ARCH[arch], k + 1
            items += _passthrough_block(k, n_embd, exit_block)
            n_ff = PASSTHROUGH_FF if exit_block is None else exit_block["ffn_gate"].shape[0]
            overrides.update(_passthrough_arrays(reader, arch, out_arch, k, n_ff))
        elif role == "draft" and passthrough:
            n_blocks = k + 1
            items += [(f"blk.{k}.{rest}", _Zeros(np.zeros_like(t.data), t.tensor_type)) for rest, t in blocks[0]]
        overrides |= {
            f"{out_arch}.block_count": (n_blocks, gguf.GGUFValueType.UINT32),
            "general.name": (f"{name} (early exit {role}, layers {lo}-{hi - 1})", gguf.GGUFValueType.STRING),
            "split.no": (0, gguf.GGUFValueType.UINT16),
            "split.count": (2, gguf.GGUFValueType.UINT16),
            "split.tensors.count": (len(items) + len(shared), gguf.GGUFValueType.INT32),
            KEY + "role": (role, gguf.GGUFValueType.STRING),
            KEY + "format": (FORMAT, gguf.GGUFValueType.UINT32),
            KEY + "layer": (k, gguf.GGUFValueType.UINT32),
            KEY + "n_layer": (n_layer, gguf.GGUFValueType.UINT32),
            KEY + "source": (source, gguf.GGUFValueType.STRING),
            KEY + "shared": (shared_sha, gguf.GGUFValueType.STRING),
            KEY + "exit_norm": (exit_norm_name if role == "draft" else "final", gguf.GGUFValueType.STRING),
            KEY + "passthrough": (int(role == "draft" and passthrough), gguf.GGUFValueType.UINT32),
        }
        for key, values in per_layer.items():  # the zero layer has layer 0's shapes
            extra = [values[0]] if role == "draft" and passthrough and not deci else []
            overrides[key] = (values[lo:hi] + extra, gguf.GGUFValueType.ARRAY)
        if role == "tail":
            # T never tokenizes: fed hidden states, its logits read by the draft's samplers. A vocabulary of
            # n_vocab nameless tokens instead of the tokenizer spares llama.cpp's second copy of it (its tables
            # take 26 MiB for a 151,936-token vocabulary)
            overrides["tokenizer.ggml.model"] = ("none", gguf.GGUFValueType.STRING)
            overrides[f"{arch}.vocab_size"] = (n_vocab, gguf.GGUFValueType.UINT32)
        _write(path, out_arch, items, overrides, reader=reader, drop_prefix="tokenizer." if role == "tail" else None,
               rename=(arch, out_arch) if out_arch != arch else None)
    return paths


@dataclass(frozen=True)
class _Zeros:
    """A zero-layer tensor: layer 0's array shape and ggml type, every byte zero (written as a read tensor is)."""
    data: np.ndarray
    tensor_type: gguf.GGMLQuantizationType


def _passthrough_block(k: int, n_embd: int, block: dict[str, np.ndarray] | None) -> list[tuple[str, np.ndarray]]:
    """Layer k of the draft: attention-free (no tensors), and an FFN whose output is exactly zero, or the exit
    block's."""
    if block is None:
        zeros = np.zeros((PASSTHROUGH_FF, n_embd), np.float32)  # gguf-py takes numpy's (rows, columns)
        block = {"ffn_norm": np.ones(n_embd, np.float32), "ffn_gate": zeros, "ffn_up": zeros, "ffn_down": zeros.T.copy()}
    return [(f"blk.{k}.{name}.weight", block[name]) for name in ("ffn_norm", "ffn_gate", "ffn_up", "ffn_down")]


# a trained exit block: torch's Linear layout, (out, in), which is gguf-py's (rows, columns) for llama's FFN tensors
EXIT_BLOCK_TENSORS = ("ffn_norm", "ffn_gate", "ffn_up", "ffn_down", "output_norm")


def _checked_block(block: dict[str, np.ndarray], n_embd: int) -> dict[str, np.ndarray]:
    """The block's norms in f32, its matrices in f16 (as llama.cpp keeps small matrices), shapes and values checked."""
    missing = [name for name in EXIT_BLOCK_TENSORS if name not in block]
    if missing:
        raise ConversionError(f"exit block: no {', '.join(missing)} tensor")
    matrices = ("ffn_gate", "ffn_up", "ffn_down")
    with np.errstate(over="ignore"):  # a value past float16's range becomes inf, refused below
        out = {name: np.ascontiguousarray(block[name], dtype=np.float16 if name in matrices else np.float32)
               for name in EXIT_BLOCK_TENSORS}
    width = out["ffn_gate"].shape[0] if out["ffn_gate"].ndim == 2 else 0
    shapes = {"ffn_norm": (n_embd,), "output_norm": (n_embd,), "ffn_gate": (width, n_embd), "ffn_up": (width, n_embd),
              "ffn_down": (n_embd, width)}
    for name, shape in shapes.items():
        if width < 1 or out[name].shape != shape:
            raise ConversionError(f"exit block: {name} has shape {out[name].shape}, not {shape} for a hidden size "
                                  f"of {n_embd}")
    bad = [name for name, w in out.items() if not np.all(np.isfinite(w))]
    if bad:
        raise ConversionError(f"exit block: {', '.join(bad)} holds values that are not finite (in float16 for "
                              "the matrices)")
    return out


def load_exit_blocks(path: str | Path) -> dict[int, dict[str, np.ndarray]]:
    """Exit blocks from a safetensors file: tensors `exit_block.{k}.{name}.weight`, name in EXIT_BLOCK_TENSORS."""
    from safetensors.numpy import load_file

    blocks: dict[int, dict[str, np.ndarray]] = {}
    for key, value in load_file(str(path)).items():
        parts = key.split(".")
        if len(parts) == 4 and parts[0] == "exit_block" and parts[1].isdigit() and parts[3] == "weight":
            blocks.setdefault(int(parts[1]), {})[parts[2]] = value
    if not blocks:
        raise ConversionError(f"{path}: holds no exit_block.K.NAME.weight tensors")
    return blocks


def _passthrough_arrays(reader: gguf.GGUFReader, arch: str, out_arch: str, k: int, n_ff_last: int) -> dict:
    """Per-layer head and FFN counts: the model's for layers 0..k-1, none (and an FFN of n_ff_last) for layer k."""
    def value(key: str) -> int | None:
        field = reader.fields.get(f"{arch}.{key}")
        return None if field is None else int(field.contents())

    heads, n_ff = value("attention.head_count"), value("feed_forward_length")
    kv_heads = value("attention.head_count_kv") or heads  # absent: one KV head per query head
    return {f"{out_arch}.{key}": ([n] * k + [last], gguf.GGUFValueType.ARRAY)
            for key, n, last in (("attention.head_count", heads, 0), ("attention.head_count_kv", kv_heads, 0),
                                 ("feed_forward_length", n_ff, n_ff_last))}


def _write(path: Path, arch: str, items: list, overrides: dict, reader: gguf.GGUFReader | None,
           drop_prefix: str | None = None, rename: tuple[str, str] | None = None) -> None:
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        if reader is not None:
            _copy_kv(writer, reader, {"split.no", "split.count", "split.tensors.count"}, overrides, drop_prefix,
                     rename)
        else:
            for key, (value, vtype) in overrides.items():
                writer.add_key_value(key, value, vtype)
        for name, t in items:
            if isinstance(t, np.ndarray):
                writer.add_tensor(name, t)
            else:
                writer.add_tensor(name, t.data, raw_dtype=t.tensor_type)  # byte rows for quantized types
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        except OSError as e:
            raise ConversionError(f"{path}: write failed: {e.strerror or e}") from None
        finally:
            writer.close()


EXIT_HEADS = "exit_heads.safetensors"  # trained exit norms in a checkpoint folder: tensors exit_norm.{k}.weight
EXIT_BLOCKS = "exit_blocks.safetensors"  # trained exit blocks there: tensors exit_block.{k}.{name}.weight


def parse_exit_layer(text: str) -> int | str:
    """--early-exit's value: a layer number or "auto"."""
    if text == "auto":
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise ConversionError(f"--early-exit takes a layer number >= 1 or auto, not {text!r}")


def write_early_exit(model: str | Path, k: int | str, *, hf_dir: str | Path | None = None, calib: str | None = None,
                     n_threads: int | None = None, exit_block: bool = True):
    """Write the split of a converted model at layer k, or ("auto") at the layer with the best predicted speedup
    (edgelm.runtime.exits). Trained exit norms come from HF_DIR/exit_heads.safetensors when it exists; they are
    copied beside the model too, where `edgelm exits` finds them. A trained exit block for layer k in
    HF_DIR/exit_blocks.safetensors takes their place unless `exit_block` is False (`auto` chooses k by the norms
    alone).
    Returns (k, SplitPaths, ExitReport or None)."""
    import shutil

    from edgelm import corpus, fsutil
    from edgelm.runtime.exits import agreement, load_exit_norms, measure_costs

    model = Path(model)
    norms = {}
    heads = Path(hf_dir) / EXIT_HEADS if hf_dir is not None else None
    if heads is not None and heads.is_file():
        norms = load_exit_norms(heads)
        with fsutil.atomic_path(model.with_name(model.stem + "." + EXIT_HEADS)) as tmp:
            shutil.copyfile(heads, tmp)
    report = None
    if k == "auto":
        text = calib if calib is not None else corpus.text("heldout", max_chars=40_000)
        report = agreement(model, text, exit_norms=norms, n_threads=n_threads)
        layers = sorted(k for k in norms if k < report.n_layer) or list(range(1, report.n_layer))
        measure_costs(model, report, layers, n_threads=n_threads)
        k = report.best()
    block = None
    if exit_block and hf_dir is not None and (Path(hf_dir) / EXIT_BLOCKS).is_file():
        block = load_exit_blocks(Path(hf_dir) / EXIT_BLOCKS).get(k)
    if block is not None:
        paths = split_model(model, k, exit_block=block)
    else:
        paths = split_model(model, k, exit_norm=norms.get(k), exit_norm_name="trained" if k in norms else "final")
    return k, paths, report
