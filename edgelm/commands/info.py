"""`edgelm info MODEL`: what a GGUF file holds, read and validated without llama.cpp."""
from __future__ import annotations

import argparse
import json
import math
from typing import Any

from edgelm.gguf_reader import format_count, read_gguf
from edgelm.gguf_summary import describe

ARRAY_PREVIEW = 8  # items kept from long arrays such as tokenizer.ggml.tokens
STRING_PREVIEW = 72  # characters of a string value shown in the text dump


def info(path: str, *, tensors: bool = False, metadata: bool = False) -> dict[str, Any]:
    """describe() of the file, plus the tensor table and a metadata preview when asked."""
    gguf = read_gguf(path)
    summary = describe(gguf)
    if tensors:
        summary["tensors"] = [
            {"name": t.name, "type": t.type_name, "shape": list(t.shape), "n_bytes": t.n_bytes, "offset": t.offset}
            for t in gguf.tensors
        ]
    if metadata:
        summary["metadata"] = {
            key: _metadata_entry(value, gguf.metadata_types[key]) for key, value in gguf.metadata.items()
        }
    return summary


def _metadata_entry(value: Any, type_name: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": type_name}
    if isinstance(value, list):
        entry["length"] = len(value)
        value = value[:ARRAY_PREVIEW]
        entry["value"] = [_json_safe(v) for v in value]
    else:
        entry["value"] = _json_safe(value)
    return entry


def _json_safe(value: Any) -> Any:
    # float metadata may hold inf/nan, which strict JSON cannot carry
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def format_bytes(n: int) -> str:
    for scale, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _or_dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _summary_lines(s: dict[str, Any]) -> list[str]:
    heads = _or_dash(s["n_heads"])
    if s["n_kv_heads"] is not None:
        heads += f" (kv heads {s['n_kv_heads']})"
    vocab = _or_dash(s["vocab_size"])
    if s["tokenizer_model"]:
        vocab += f" (tokenizer {s['tokenizer_model']})"
    bpw = s["bits_per_weight"]
    rows = [
        ("architecture", _or_dash(s["architecture"])),
        ("name", _or_dash(s["name"])),
        ("parameters", f"{format_count(s['n_parameters'])} ({s['n_parameters']:,})"),
        ("file size", f"{format_bytes(s['file_size'])} ({s['file_size']:,} bytes)"),
        ("bits per weight", "-" if bpw is None else f"{bpw:.2f}"),
        ("context length", _or_dash(s["context_length"])),
        ("layers", _or_dash(s["n_layers"])),
        ("embedding", _or_dash(s["n_embd"])),
        ("heads", heads),
        ("vocab", vocab),
        ("gguf", f"v{s['gguf_version']}, {s['n_tensors']} tensors, {s['n_metadata']} metadata keys"),
        ("tensor types", ", ".join(s["bytes_by_type"]) or "-"),
    ]
    if s.get("adapter"):
        alpha = "none (scaling folded in)" if s["lora_alpha"] is None else f"{s['lora_alpha']:g}"
        rows.insert(1, ("adapter", f"{s['adapter']}, rank {_or_dash(s['lora_rank'])}, alpha {alpha}, "
                                   f"{s['lora_targets']} weights adapted"))
    lines = [s["path"]] + [f"  {label:<16} {value}" for label, value in rows]
    lines.append("  bytes by type")
    total = s["tensor_bytes"] or 1
    for type_name, n in s["bytes_by_type"].items():
        lines.append(f"    {type_name:<8} {n:>15,} B  {100 * n / total:5.1f}%")
    return lines


def _tensor_lines(tensors: list[dict[str, Any]]) -> list[str]:
    width = max((len(t["name"]) for t in tensors), default=4)
    lines = [f"tensors ({len(tensors)})", f"  {'name':<{width}}  {'type':<8} {'shape':<22} {'bytes':>14}"]
    for t in tensors:
        shape = " x ".join(str(d) for d in t["shape"])
        lines.append(f"  {t['name']:<{width}}  {t['type']:<8} {shape:<22} {t['n_bytes']:>14,}")
    return lines


def _preview(entry: dict[str, Any]) -> str:
    value = entry["value"]
    if "length" in entry:
        items = ", ".join(_preview({"value": v}) for v in value)
        more = ", ..." if entry["length"] > len(value) else ""
        return f"[{items}{more}] ({entry['length']} items)"
    if isinstance(value, str) and len(value) > STRING_PREVIEW:
        return f"{value[:STRING_PREVIEW]!r}... ({len(value)} chars)"
    if isinstance(value, float):
        return f"{value:.6g}"
    return repr(value)


def _metadata_lines(metadata: dict[str, dict[str, Any]]) -> list[str]:
    width = max((len(k) for k in metadata), default=3)
    lines = [f"metadata ({len(metadata)})"]
    for key, entry in metadata.items():
        lines.append(f"  {key:<{width}}  {entry['type']:<15} {_preview(entry)}")
    return lines


def format_info(summary: dict[str, Any]) -> str:
    """The readable report; sections for tensors and metadata only when info() added them."""
    blocks = [_summary_lines(summary)]
    if "tensors" in summary:
        blocks.append(_tensor_lines(summary["tensors"]))
    if "metadata" in summary:
        blocks.append(_metadata_lines(summary["metadata"]))
    return "\n\n".join("\n".join(block) for block in blocks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgelm info", description="Show what a GGUF model file holds.")
    parser.add_argument("model", help="path to a .gguf file, or a name from `edgelm create`")
    parser.add_argument("--modelfile", action="store_true", help="for a name: print its Modelfile only")
    parser.add_argument("--tensors", action="store_true", help="list every tensor (name, type, shape, bytes)")
    parser.add_argument("--metadata", action="store_true", help="dump the metadata (long arrays shortened)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    from edgelm.modelfile import find

    profile = find(args.model)
    if args.modelfile:
        if profile is None:
            from edgelm.errors import UsageError

            raise UsageError(f"--modelfile is for names made by `edgelm create`; {args.model} is not one")
        print(profile.modelfile(), end="")
        return 0
    summary = info(profile.model if profile else args.model, tensors=args.tensors, metadata=args.metadata)
    print(json.dumps(summary) if args.json else format_info(summary))
    return 0
