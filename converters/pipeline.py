"""The compression pipeline: prune → distill → convert → quantize (importance matrix from the same calibration
text) → early-exit split, each stage measured in llama.cpp (parameters, GGUF bytes, held-out perplexity,
decode tokens/s) into one report table.

`edgelm convert HF_DIR -o OUT.gguf --prune SPEC --distill DATA --quant q4_k_m --early-exit auto` drives it.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from edgelm.errors import ConversionError

from .prune import PruneOptions, Step, measure_gguf


@dataclass
class PipelineReport:
    source: str
    output: str
    stages: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        base = self.stages[0]
        lines = ["| stage | what | parameters | GGUF bytes | held-out ppl | tokens/s |",
                 "|---|---|---:|---:|---:|---:|"]
        for s in self.stages:
            lines.append(f"| {s.name} | {s.detail} | {s.n_params / 1e6:.2f}M ({s.n_params / base.n_params:.0%}) | "
                         f"{s.gguf_bytes / 1e6:.1f} MB ({s.gguf_bytes / base.gguf_bytes:.0%}) | {s.perplexity:.2f} | "
                         f"{s.tokens_per_second:.0f} |")
        return "\n".join(lines + [f"\n{n}" for n in self.notes])


def parse_prune_spec(spec: str) -> PruneOptions:
    """`--prune "ffn-keep=0.5,hidden-keep=0.75"` (the flags of `edgelm prune`, without dashes) -> PruneOptions."""
    from edgelm.commands.prune import build_parser

    argv = ["HF", "-o", "OUT", "--calib", "corpus"]
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = item.partition("=")
        argv += [f"--{key.strip()}"] + ([value.strip()] if sep else [])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        raise ConversionError(f"--prune {spec!r}: expected key=value pairs of `edgelm prune` options, "
                              "e.g. ffn-keep=0.5,hidden-keep=0.75 or target-params=8M") from None
    fields = set(PruneOptions.__dataclass_fields__)
    return PruneOptions(**{k: v for k, v in vars(args).items() if k in fields})


def compress(hf_dir: str | Path, out: str | Path, *, prune: PruneOptions | None = None,
             distill_data: list[str] | None = None, distill_options=None, outtype: str = "f16",
             quant: str | None = None, early_exit: int | str | None = None, calib: str | None = None,
             heldout: str | None = None, name: str | None = None, n_threads: int | None = None,
             log: Callable[[str], None] | None = None) -> PipelineReport:
    """Run every stage asked for; the GGUF lands at `out`, the report at OUT.report.md and OUT.report.json."""
    from edgelm import corpus

    from .convert import convert

    log = log or (lambda s: None)
    hf_dir, out = Path(hf_dir), Path(out)
    calib = calib if calib is not None else corpus.text("train", max_chars=300_000)
    heldout = heldout if heldout is not None else corpus.text("heldout", max_chars=40_000)
    report = PipelineReport(str(hf_dir), str(out))
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.pipeline-"))

    def add(stage: Step) -> None:
        report.stages.append(stage)
        log(f"{stage.name}: {stage.detail}: held-out ppl {stage.perplexity:.2f}")

    def measure_hf(stage: str, detail: str, ckpt: Path) -> None:
        gguf = convert(ckpt, work / f"{stage}.gguf", outtype=outtype, progress=False).path
        add(measure_gguf(stage, detail, gguf, heldout, n_threads))
        gguf.unlink()

    try:
        t0 = time.perf_counter()
        source = f"{outtype} GGUF of {hf_dir.name}"
        current = hf_dir
        if prune is None:
            measure_hf("source", source, hf_dir)
        else:
            from .prune import prune as run_prune

            # prune's own report measures the source and the result at this type: its first and last rows
            pruned = work / "pruned"
            r = run_prune(current, pruned, calib=calib, heldout=heldout,
                          options=replace(prune, report_quant=outtype, n_threads=prune.n_threads or n_threads))
            add(replace(r.steps[0], name="source", detail=source))
            steps = "; ".join(s.detail for s in r.steps[1:]) or "nothing removed"
            add(replace(r.steps[-1], name="pruned", detail=steps))
            report.notes += r.notes
            current = pruned
        if distill_data is not None:
            from .distill import DistillOptions, distill

            o = distill_options or DistillOptions(n_threads=n_threads)
            distilled = work / "distilled"
            d = distill(hf_dir, current, distilled, data=distill_data, heldout=heldout, options=o)
            gap = f", {d.gap_recovered:.0%} of the gap recovered" if d.gap_recovered is not None else ""
            measure_hf("distilled", f"{d.tokens_seen:,} tokens from {hf_dir.name}{gap}", distilled)
            if report.stages[-1].perplexity <= report.stages[-2].perplexity:
                current = distilled
            else:  # nothing to recover (pruning lost almost nothing) and training noise cost a little: keep the better
                report.notes.append(f"distilled: held-out perplexity rose ({report.stages[-2].perplexity:.2f} → "
                                    f"{report.stages[-1].perplexity:.2f}); the later stages use the pruned model")
        result = convert(current, out, outtype=outtype, quant=quant, imatrix="auto" if quant else None,
                         calib=calib, name=name, progress=False)
        if quant:
            add(measure_gguf("quantized", f"{quant}, importance matrix from the calibration text", result.path,
                             heldout, n_threads))
        if early_exit is not None:
            report.stages.append(_early_exit_stage(out, early_exit, current, calib, heldout, n_threads,
                                                   report.stages[-1]))
        report.notes.append(f"pipeline wall time {time.perf_counter() - t0:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from edgelm import fsutil

    fsutil.atomic_write(out.with_name(out.name + ".report.md"), (report.table() + "\n").encode())
    fsutil.atomic_write(out.with_name(out.name + ".report.json"), json.dumps(asdict(report), indent=2).encode())
    return report


def _early_exit_stage(out: Path, k, ckpt: Path, calib: str, heldout: str, n_threads, last: Step) -> Step:
    """Write the split, then decode held-out prompts greedily with and without it: same tokens, other speed."""
    import edgelm

    from .early_exit import write_early_exit

    k, paths, _ = write_early_exit(out, k, hf_dir=ckpt, calib=calib, n_threads=n_threads)
    prompts = [p for p in heldout.split("\n\n") if len(p) > 200][:4] or [heldout[:400]]
    speeds, texts, accepted, drafted = {}, {}, 0, 0
    for mode in (False, True):
        with edgelm.load(out, n_ctx=1024, n_threads=n_threads, early_exit=k if mode else False) as m:
            n, seconds, outs = 0, 0.0, []
            for p in prompts:
                c = m.generate(p[:600], max_tokens=96, temperature=0, ignore_eos=True)
                n, seconds = n + c.timings.completion_tokens - 1, seconds + c.timings.gen_s
                outs.append(c.text)
                if mode and c.timings.speculative is not None:
                    accepted += c.timings.speculative.accepted
                    drafted += c.timings.speculative.drafted
            speeds[mode], texts[mode] = n / seconds, outs
    if texts[True] != texts[False]:
        raise ConversionError("early exit changed the greedy output: a bug, please report it")
    share = f"{accepted / drafted:.0%} of {drafted} drafts accepted" if drafted else "no drafts"
    return Step("early exit", f"split at layer {k}: {share}, {speeds[True] / speeds[False]:.2f}× plain decode, "
                f"same tokens", last.n_params, sum(p.stat().st_size for p in (paths.shared, paths.draft, paths.tail)),
                last.perplexity, round(speeds[True], 1))
