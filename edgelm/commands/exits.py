"""`edgelm exits MODEL --calib TEXT`: per-layer exit agreement and the predicted early-exit speedup."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgelm.errors import UsageError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgelm exits", description=__doc__)
    p.add_argument("model", help="single-file GGUF model")
    p.add_argument("--calib", metavar="TEXT_FILE", help="calibration text (default: edgelm's held-out corpus)")
    p.add_argument("--tokens", type=int, default=2048, help="calibration tokens to score (default 2048)")
    p.add_argument("--exit-heads", metavar="FILE",
                   help="trained exit norms (exit_heads.safetensors; default: MODEL.exit_heads.safetensors, if any)")
    p.add_argument("--exit-blocks", metavar="FILE",
                   help="trained exit blocks (exit_blocks.safetensors; default: MODEL.exit_blocks.safetensors, if "
                        "any); a layer with a block is scored and timed with it, and --write puts it in the draft")
    p.add_argument("--layers", metavar="K,K,...", help="exit layers whose costs to measure (default: all)")
    p.add_argument("--draft-max", type=int, default=8, help="longest draft to consider (default 8)")
    p.add_argument("--write", metavar="K|auto", help="write the early-exit split at layer K (auto: the fastest)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def _layers(text: str | None, n_layer: int) -> list[int]:
    if text is None:
        return list(range(1, n_layer))
    try:
        layers = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UsageError(f"--layers takes comma-separated integers, not {text!r}") from None
    bad = [k for k in layers if not 1 <= k < n_layer]
    if bad or not layers:
        raise UsageError(f"--layers must lie in [1, {n_layer - 1}] for this model, not {text!r}")
    return layers


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from edgelm import corpus
    from edgelm.converters.early_exit import load_exit_blocks, split_model
    from edgelm.runtime.exits import agreement, load_exit_norms, measure_costs
    from edgelm.runtime.model import resolve_model

    model = resolve_model(args.model)
    from edgelm.gguf_reader import read_gguf

    info = read_gguf(model)
    layers = _layers(args.layers, int(info.get(f"{info.architecture}.block_count", 0)))  # bad --layers fail first
    if args.calib:
        if not Path(args.calib).is_file():
            raise UsageError(f"{args.calib}: no such calibration text file")
        text = Path(args.calib).read_text(encoding="utf-8", errors="replace")
    else:
        text = corpus.text("heldout", max_chars=40_000)
    heads = Path(args.exit_heads) if args.exit_heads else model.with_name(model.stem + ".exit_heads.safetensors")
    norms = load_exit_norms(heads) if args.exit_heads or heads.is_file() else {}
    blocks_file = (Path(args.exit_blocks) if args.exit_blocks
                   else model.with_name(model.stem + ".exit_blocks.safetensors"))
    if args.exit_blocks and not blocks_file.is_file():
        raise UsageError(f"{blocks_file}: no such exit-blocks file")
    blocks = load_exit_blocks(blocks_file) if blocks_file.is_file() else {}
    report = agreement(model, text, exit_norms=norms, exit_blocks=blocks, max_tokens=args.tokens,
                       n_threads=args.threads)
    measure_costs(model, report, layers, draft_max=args.draft_max, n_threads=args.threads, exit_blocks=blocks)
    if args.json:
        print(json.dumps({"n_layer": report.n_layer, "tokens": report.tokens, "full_ms": report.full_ms,
                          "layers": [{"k": k, "agreement": report.agreement[k - 1], "exit": report.exits[k - 1],
                                      "trained": report.exits[k - 1] != "final",
                                      "draft_ms": report.draft_ms.get(k),
                                      "speedup": report.speedup.get(k, (None,))[0],
                                      "draft_max": report.speedup.get(k, (None, None))[1],
                                      "threshold": report.speedup.get(k, (None, None, None))[2]}
                                     for k in range(1, report.n_layer)]}))
    else:
        print(f"{report.tokens} calibration tokens; full model {report.full_ms:.3f} ms per token; D ms: what one draft "
              "adds to a round; R(1): a round without drafts (D step + tail step)")
        print(f"{'k':>3}  {'agree':>6}  {'exit':<9}  {'D ms':>6}  {'R(1) ms':>7}  {'draft_max':>9}  "
              f"{'threshold':>9}  {'speedup':>7}")
        for k in range(1, report.n_layer):
            kind = {"final": "final", "norm": "trained", "block": "block"}[report.exits[k - 1]]
            line = f"{k:>3}  {report.agreement[k - 1]:>6.1%}  {kind:<9}"
            if k in report.speedup:
                speed, g, threshold = report.speedup[k]
                setting = f"{g:>9}  {threshold:>9}" if g else f"{'-':>9}  {'-':>9}"
                line += f"  {report.draft_ms[k]:>6.3f}  {report.round_ms[k][1]:>7.3f}  {setting}  {speed:>6.2f}x"
            print(line)
    if args.write:
        k = report.best() if args.write == "auto" else int(args.write) if args.write.isdigit() else None
        if k is None:
            raise UsageError(f"--write takes a layer number or auto, not {args.write!r}")
        if k in blocks:
            paths = split_model(model, k, exit_block=blocks[k])
        else:
            paths = split_model(model, k, exit_norm=norms.get(k), exit_norm_name="trained" if k in norms else "final")
        print(f"wrote {paths.draft.name}, {paths.tail.name}, {paths.shared.name}")
    return 0
