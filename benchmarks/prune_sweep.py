"""Size vs perplexity for every pruning method and some combinations, on the small reference model.

    .venv/bin/python benchmarks/prune_sweep.py [--model models/small] [--threads 1] [--only NAME ...]

Each setting is one `edgelm.converters.prune.prune()` run (calibrated on the corpus's training split);
its last report row is the pruned model, measured as a q8_0 GGUF in llama.cpp: parameters, bytes,
held-out perplexity (first 40k characters of the held-out split) and decode tokens/s.
Writes docs/pruning-sweep.md, docs/img/prune-size-ppl.png and .bench/prune_sweep.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import BENCH, DOCS, log, machine, markdown_table, today  # noqa: E402

from edgelm.converters.prune import PruneOptions, prune  # noqa: E402

HALF = 8_392_832  # half the small model's 16,785,664 parameters
SETTINGS: dict[str, tuple[str, dict]] = {
    # name: (method family, PruneOptions fields)
    "depth-2": ("depth (influence)", dict(drop_layers=2)),
    "depth-4": ("depth (influence)", dict(drop_layers=4)),
    "depth-6": ("depth (influence)", dict(drop_layers=6)),
    "depth-8": ("depth (influence)", dict(drop_layers=8)),
    "depth-ppl-4": ("depth (perplexity)", dict(drop_layers=4, depth_metric="perplexity")),
    "depth-ppl-8": ("depth (perplexity)", dict(drop_layers=8, depth_metric="perplexity")),
    "ffn-0.75": ("FFN channels", dict(ffn_keep=0.75)),
    "ffn-0.5": ("FFN channels", dict(ffn_keep=0.5)),
    "ffn-0.25": ("FFN channels", dict(ffn_keep=0.25)),
    "heads-0.5": ("attention heads", dict(heads_keep=0.5)),
    "hidden-0.75": ("hidden (SliceGPT)", dict(hidden_keep=0.75)),
    "hidden-0.5": ("hidden (SliceGPT)", dict(hidden_keep=0.5)),
    "hidden-0.375": ("hidden (SliceGPT)", dict(hidden_keep=0.375)),
    "hidden-0.25": ("hidden (SliceGPT)", dict(hidden_keep=0.25)),
    "tie": ("tied embeddings", dict(tie_embeddings="always")),
    "ffn-0.5+hidden-0.75": ("combination", dict(ffn_keep=0.5, hidden_keep=0.75)),
    "depth-2+ffn-0.75+hidden-0.75": ("combination", dict(drop_layers=2, ffn_keep=0.75, hidden_keep=0.75)),
    "target-50%: ffn+hidden": ("combination", dict(target_params=HALF)),
    "target-50%: depth+ffn+hidden": ("combination", dict(target_params=HALF, drop_layers="auto", ffn_keep="auto",
                                                          hidden_keep="auto")),
    "wanda-0.5": ("sparsity (no size change)", dict(sparsity=0.5, sparsity_method="wanda")),
    "magnitude-0.5": ("sparsity (no size change)", dict(sparsity=0.5, sparsity_method="magnitude")),
}


def plot(rows: list[dict], original: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    top = original["perplexity"] * 1.6  # the interesting region; rows above it are named in the legend
    families = sorted({r["family"] for r in rows if "sparsity" not in r["family"]})
    for family in families:
        pts = sorted((r["n_params"] / 1e6, r["perplexity"]) for r in rows if r["family"] == family)
        off = [f"{p:.0f}" for _, p in pts if p > top]
        label = family + (f" (off the chart: ppl {', '.join(off)})" if off else "")
        ax.plot(*zip(*pts), marker="o", label=label, linestyle="-" if family != "combination" else "none")
    ax.scatter([original["n_params"] / 1e6], [original["perplexity"]], marker="*", s=200, color="k", label="original")
    ax.set_ylim(original["perplexity"] * 0.95, top)
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("held-out perplexity (llama.cpp, q8_0)")
    ax.set_title("Pruning the small reference model (no retraining)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/small")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", help="setting names to run (default: all)")
    ap.add_argument("--render", action="store_true", help="only rewrite the report from .bench/prune_sweep.json")
    args = ap.parse_args()
    if args.render:
        saved = json.loads((BENCH / "prune_sweep.json").read_text())
        return render(saved["rows"], saved["original"], saved.get("threads", args.threads))
    work = BENCH / "prune"
    work.mkdir(parents=True, exist_ok=True)
    rows, original = [], None
    for name, (family, fields) in SETTINGS.items():
        if args.only and name not in args.only:
            continue
        out = work / name.replace(" ", "").replace(":", "-").replace("%", "pct").replace("+", "_")
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        report = prune(args.model, out, options=PruneOptions(**fields, n_threads=args.threads))
        seconds = time.perf_counter() - t0
        original = original or vars(report.steps[0])
        last = vars(report.steps[-1])
        rows.append({**last, "name": name, "family": family, "seconds": round(seconds, 1),
                     "steps": " → ".join(s.detail for s in report.steps[1:])})
        log(f"{name}: {last['n_params'] / 1e6:.2f}M, ppl {last['perplexity']:.2f} ({seconds:.0f} s)")
        shutil.rmtree(out, ignore_errors=True)
    (BENCH / "prune_sweep.json").write_text(json.dumps({"original": original, "rows": rows, "threads": args.threads},
                                                       indent=2))
    return render(rows, original, args.threads)


def render(rows: list[dict], original: dict, threads: int) -> int:
    table = markdown_table(
        ["setting", "method", "what it did", "parameters", "GGUF q8_0", "held-out ppl", "ppl ratio", "tokens/s"],
        [[r["name"], r["family"], r["steps"], f"{r['n_params'] / 1e6:.2f}M ({r['n_params'] / original['n_params']:.0%})",
          f"{r['gguf_bytes'] / 1e6:.1f} MB", f"{r['perplexity']:.2f}", f"{r['perplexity'] / original['perplexity']:.2f}×",
          f"{r['tokens_per_second']:.0f}"] for r in rows])
    plot(rows, original, DOCS / "img" / "prune-size-ppl.png")
    (DOCS / "pruning-sweep.md").write_text(
        f"# Pruning sweep: the small model, no retraining\n\n"
        f"Measured {today()} on {machine()} by `benchmarks/prune_sweep.py` (threads {threads}).\n"
        f"Original: {original['n_params'] / 1e6:.2f}M parameters, {original['gguf_bytes'] / 1e6:.1f} MB at q8_0, "
        f"held-out perplexity {original['perplexity']:.2f} (llama.cpp, first 40k characters of the corpus's held-out "
        f"split). Tokens/s: one `edgelm bench`-style decode measurement per row on a shared machine, a rough "
        f"guide only (single runs move by tens of percent here).\n\n"
        f"{table}\n\n![size vs perplexity](img/prune-size-ppl.png)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
