"""The compression pipeline on the small model: prune → distill → quantize → early-exit split, against the
teacher's own llama.cpp Q4_K_M.

    .venv/bin/python benchmarks/compress_pipeline.py [--threads 2] [--steps 200] [--runs half third]

Per run: (a) the share of the pruned student's perplexity gap to the teacher that distillation recovers
(held-out perplexity from transformers over the same windows, as distill reports it); (b) the final GGUF's
bytes and llama.cpp held-out perplexity vs the teacher's Q4_K_M (imatrix from the same calibration text);
(c) early-exit acceptance and greedy speedup with exit norms trained during distillation vs the final norm
reused (the same split layer, the same prompts, outputs checked identical to plain decoding).
Writes docs/compression-pipeline.md and .bench/compress/*.report.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import BENCH, DOCS, log, machine, today  # noqa: E402

from edgelm import corpus  # noqa: E402
from edgelm.converters import convert  # noqa: E402
from edgelm.converters.distill import DistillOptions  # noqa: E402
from edgelm.converters.pipeline import _early_exit_stage, compress, parse_prune_spec  # noqa: E402
from edgelm.converters.prune import measure_gguf  # noqa: E402

TEACHER = Path("models/small")
RUNS = {  # name: (prune spec, exit layers trained while distilling)
    "half": ("target-params=8392832", (4, 6, 8)),  # 50% of 16,785,664: FFN and hidden size share the cut
    "third": ("target-params=5595221,drop-layers=auto,ffn-keep=auto,hidden-keep=auto", (3, 4, 6)),
}


def _gap(report) -> str:
    source, pruned, distilled = (next(s for s in report.stages if s.name == n) for n in ("source", "pruned", "distilled"))
    gap = pruned.perplexity - source.perplexity
    return (f"{pruned.perplexity:.2f} → {distilled.perplexity:.2f} against the source's {source.perplexity:.2f}: "
            f"{(pruned.perplexity - distilled.perplexity) / gap:.0%} of the gap" if gap > 0 else "no gap to recover")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--runs", nargs="+", default=list(RUNS))
    args = ap.parse_args()
    work = BENCH / "compress"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    calib = corpus.text("train", max_chars=300_000)
    heldout = corpus.text("heldout", max_chars=40_000)
    base = convert(TEACHER, work / "teacher-q4_k_m.gguf", quant="q4_k_m", imatrix="auto", calib=calib).path
    teacher = measure_gguf("teacher", "Q4_K_M + imatrix", base, heldout, args.threads)
    log(f"teacher q4_k_m: {teacher.gguf_bytes / 1e6:.2f} MB, ppl {teacher.perplexity}")
    sections = []
    for name in args.runs:
        spec, exits = RUNS[name]
        out = work / f"{name}.gguf"
        options = DistillOptions(steps=args.steps, batch=8, seq_len=256, lr=5e-4, warmup=20, exit_layers=exits,
                                 eval_every=50, checkpoint_every=50, n_threads=args.threads)
        report = compress(TEACHER, out, prune=parse_prune_spec(spec), distill_data=[corpus.text("train")],
                          distill_options=options, quant="q4_k_m", early_exit="auto", calib=calib, heldout=heldout,
                          n_threads=args.threads, log=log)
        final = next(s for s in report.stages if s.name == "quantized")
        k = int(report.stages[-1].detail.split("layer ")[1].split(":")[0])
        # the same split layer with the final norm reused: exit training's effect alone
        plain = work / f"{name}-untrained.gguf"
        shutil.copyfile(out, plain)
        untrained = _early_exit_stage(plain, k, work, calib, heldout, args.threads, final)
        distilled = next(s for s in report.stages if s.name == "distilled")
        sections.append(
            f"## Run `{name}`: `--prune {spec}`, {args.steps} distillation steps, exit layers {list(exits)}\n\n"
            f"{report.table()}\n\n"
            f"- (a) distillation: {distilled.detail} (transformers, first {options.eval_tokens} held-out tokens); in "
            f"llama.cpp over the whole held-out text: {_gap(report)} (goal ≥ 70%)\n"
            f"- (b) final Q4_K_M: {final.gguf_bytes / 1e6:.2f} MB ({final.gguf_bytes / teacher.gguf_bytes:.0%} of the "
            f"teacher's {teacher.gguf_bytes / 1e6:.2f} MB), held-out ppl {final.perplexity:.2f} vs the teacher's "
            f"{teacher.perplexity:.2f} ({final.perplexity / teacher.perplexity - 1:+.1%}; goal: smaller and within +15%)\n"
            f"- (c) early exit at layer {k}: trained exit norms: {report.stages[-1].detail}; final norm reused: "
            f"{untrained.detail}\n")
        (work / f"{name}.json").write_text(json.dumps({"report": json.loads(out.with_name(out.name + ".report.json")
                                                                            .read_text()),
                                                       "untrained_exit": vars(untrained)}, indent=2))
        log(sections[-1])
    (DOCS / "compression-pipeline.md").write_text(
        f"# Compression pipeline: the small model pruned, distilled, quantized, split\n\n"
        f"Measured {today()} on {machine()} by `benchmarks/compress_pipeline.py` (threads {args.threads}).\n"
        f"Teacher: `models/small` at llama.cpp Q4_K_M with edgelm's importance matrix: "
        f"{teacher.gguf_bytes / 1e6:.2f} MB, held-out perplexity {teacher.perplexity:.2f} (first 40k characters "
        f"of the corpus's held-out split, llama.cpp, 512-token windows).\n\n" + "\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
