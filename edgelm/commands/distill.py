"""`edgelm distill --teacher HF_DIR|GGUF --student HF_DIR -o OUT_DIR [--data FILES | --generate N]`: train a
student (usually a pruned teacher) on the teacher's distribution; writes a standard checkpoint, exit norms when
asked for, and distill_report.json. Needs torch (pip install 'edgelm[train]'); CUDA when present."""
from __future__ import annotations

import argparse
import dataclasses
import json



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgelm distill", description=__doc__)
    p.add_argument("--teacher", required=True, help="checkpoint directory, or a GGUF (top-k logits cached on disk)")
    p.add_argument("--student", required=True, help="checkpoint directory with the teacher's vocabulary")
    p.add_argument("-o", "--output", required=True, help="new checkpoint directory (a killed run resumes here)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", nargs="+", metavar="FILE", help="training text files ('corpus': edgelm's training split)")
    src.add_argument("--generate", type=int, metavar="N", help="let the teacher write N tokens of training text")
    p.add_argument("--heldout", default="corpus", metavar="FILE|corpus", help="text for held-out perplexity")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--temperature", type=float, default=1.0, help="KL temperature (the loss is scaled by T²)")
    p.add_argument("--kl-weight", type=float, default=1.0)
    p.add_argument("--ce-weight", type=float, default=0.0, help="cross-entropy on the data")
    p.add_argument("--hidden-weight", type=float, default=0.0, help="hidden-state matching (HF teacher)")
    p.add_argument("--exit-layers", type=int, nargs="+", default=(), metavar="K",
                   help="train exit norms at these layers (LayerSkip-style exit losses) for --early-exit")
    p.add_argument("--exit-weight", type=float, default=0.2)
    p.add_argument("--exit-norm-only", action="store_true", help="freeze the student; train only the exit norms")
    p.add_argument("--top-k", type=int, default=32, help="teacher log-probabilities kept per position (GGUF teacher)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, …")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", action="store_true")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from edgelm import corpus
    from edgelm.converters.distill import DistillOptions, distill

    fields = {f.name for f in dataclasses.fields(DistillOptions)}
    options = DistillOptions(**{k: v for k, v in vars(args).items() if k in fields and v is not None},
                             n_threads=args.threads)
    options.exit_layers = tuple(args.exit_layers)
    data = [corpus.text_arg(f, "train", what="training text") for f in args.data] if args.data else None
    report = distill(args.teacher, args.student, args.output, data=data, generate=args.generate,
                     heldout=corpus.text_arg(args.heldout, "heldout", max_chars=60_000, what="held-out text"),
                     options=options)
    result = dataclasses.asdict(report) | {"gap_recovered": report.gap_recovered}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        gap = f", {report.gap_recovered:.0%} of the gap to the teacher" if report.gap_recovered is not None else ""
        teacher = f" (teacher {report.teacher_perplexity})" if report.teacher_perplexity else ""
        print(f"held-out perplexity {report.perplexity_before} → {report.perplexity_after}{teacher}{gap}; "
              f"{report.tokens_seen:,} tokens in {report.seconds:.0f} s")
        if report.exit_agreement:
            print("exit agreement: " + ", ".join(f"layer {k} {v:.1%}" for k, v in report.exit_agreement.items()))
        print(f"wrote {args.output}")
    return 0
