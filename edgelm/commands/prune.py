"""`edgelm prune HF_DIR -o OUT_DIR --calib TEXT`: a smaller standard checkpoint (fewer layers, heads, FFN
channels or hidden dimensions) that transformers loads, `edgelm convert` converts and stock llama.cpp runs,
with a report of parameters, GGUF bytes, held-out perplexity and speed after each step."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from edgelm.errors import UsageError


def _or_auto(kind: type, what: str):
    """An argparse type: 'auto', or a value of `kind`."""
    def parse(text: str):
        if text == "auto":
            return text
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} or 'auto', not {text!r}") from None
    return parse


_ratio = _or_auto(float, "a ratio in (0, 1]")
_count = _or_auto(int, "a layer count")


def _params(text: str) -> int:
    scale = {"k": 1e3, "m": 1e6, "b": 1e9}.get(text[-1:].lower(), 1)
    try:
        return int(float(text[:-1] if scale != 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a parameter count such as 8000000 or 8M, not {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgelm prune", description=__doc__)
    p.add_argument("hf_dir", help="checkpoint directory (llama, mistral, qwen2 or qwen3)")
    p.add_argument("-o", "--output", required=True, help="new checkpoint directory (must not exist or be empty)")
    p.add_argument("--calib", required=True, metavar="TEXT_FILE|corpus",
                   help="calibration text the activation statistics come from ('corpus': edgelm's training split)")
    p.add_argument("--heldout", default="corpus", metavar="TEXT_FILE|corpus",
                   help="text the report's perplexity is measured on (default: edgelm's held-out split)")
    p.add_argument("--drop-layers", type=_count, metavar="N|auto",
                   help="remove N layers (auto: as many as --max-ppl-increase allows, or --target-params needs)")
    p.add_argument("--depth-metric", choices=("influence", "perplexity"), default="influence",
                   help="rank layers by block influence 1-cos(h_in, h_out) or by measured perplexity impact")
    p.add_argument("--ffn-keep", type=_ratio, metavar="R|auto", help="share of FFN channels to keep")
    p.add_argument("--heads-keep", type=_ratio, metavar="R|auto",
                   help="share of query heads to keep (whole GQA groups: fewer heads per group, or fewer groups)")
    p.add_argument("--hidden-keep", type=_ratio, metavar="R|auto",
                   help="share of hidden dimensions to keep (SliceGPT: PCA rotation of the residual stream)")
    p.add_argument("--tie-embeddings", nargs="?", const="auto", choices=("auto", "always"),
                   help="share one matrix between token embedding and output head (auto: only when it pays off)")
    p.add_argument("--target-params", type=_params, metavar="N",
                   help="choose the ratio of the 'auto' methods (default: FFN and hidden) to land at or under N")
    p.add_argument("--trim-vocab", metavar="TEXT_FILE|calib",
                   help="keep only the tokens this domain text uses (text outside it still encodes, in more tokens)")
    p.add_argument("--trim-min-count", type=int, default=1, metavar="N", help="uses a token needs to be kept")
    p.add_argument("--sparsity", type=float, metavar="R",
                   help="also zero R of each linear's weights (unstructured: no smaller GGUF, no faster; for study)")
    p.add_argument("--sparsity-method", choices=("wanda", "magnitude"), default="wanda")
    p.add_argument("--max-ppl-increase", type=float, default=0.10, metavar="F",
                   help="perplexity budget of auto depth and auto tying (default 0.10: 10%%)")
    p.add_argument("--report-quant", default="q8_0", metavar="TYPE",
                   help="GGUF type the report's bytes, perplexity and speed are measured at")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv: list[str]) -> int:
    from edgelm import corpus
    from edgelm.converters.prune import PruneOptions, prune
    from edgelm.converters.quantize import QUANT_TYPES

    args = build_parser().parse_args(argv)
    if args.report_quant not in QUANT_TYPES:
        raise UsageError(f"--report-quant {args.report_quant!r}: unknown type; known: {', '.join(QUANT_TYPES)}")
    fields = {f.name for f in dataclasses.fields(PruneOptions)}
    options = PruneOptions(**{k: v for k, v in vars(args).items() if k in fields}, n_threads=args.threads)
    calib = corpus.text_arg(args.calib, "train", max_chars=300_000, what="calibration text")
    heldout = corpus.text_arg(args.heldout, "heldout", max_chars=40_000, what="held-out text")
    report = prune(args.hf_dir, args.output, calib=calib, heldout=heldout, options=options,
                   log=None if args.json else (lambda line: print(line, flush=True)))
    if args.json:
        print(json.dumps(dataclasses.asdict(report), indent=2))
    else:
        print(report.table())
        print(f"wrote {args.output} (report: {Path(args.output) / 'prune_report.md'})")
    return 0
