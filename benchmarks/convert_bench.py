"""Conversion time and peak memory: `edgelm convert` against llama.cpp's convert_hf_to_gguf.py.

    .venv/bin/python benchmarks/convert_bench.py                 # writes docs/conversion.md

Both convert the same random-weight checkpoint of a real 0.5B shape (scripts/make_random_checkpoint.py,
cached under .bench/) to the same outtype, each in a fresh process, side by side in one run with the
order alternating between repetitions; medians are reported. The reference runs with its own gguf-py
(PYTHONPATH=<llama.cpp>/gguf-py). The outputs are then compared tensor by tensor, edgelm's peak RSS
is checked against the budget (3 × the largest tensor as stored in the checkpoint + 300 MB), also on a
larger shape once, and when edgelm loses on time, memory or budget, convert_profile.py shows why.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import gguf_diff
from common import BENCH, DOCS, MB, ROOT, llama_cpp_source, log, machine, markdown_table, median, python, \
    run_measured, source_digest, spread, today
from convert_profile import findings, profile

OUT = BENCH / "convert"
HERE = Path(__file__).resolve().parent
TOOLS = ("edgelm", "llama.cpp")


def checkpoint(shape: str) -> Path:
    path = BENCH / f"ckpt-{shape}"
    if not (path / "config.json").is_file():
        log(f"making the random {shape} checkpoint at {path}")
        run_measured([python(), ROOT / "scripts" / "make_random_checkpoint.py", shape, path]).check()
    return path


def sizes(ckpt: Path) -> dict:
    """Largest tensor (name, bytes as stored), total bytes and bytes per element of the safetensors files."""
    from edgelm.converters.checkpoint import Checkpoint

    refs = Checkpoint.open(ckpt).tensors
    nbytes = {name: ref.end - ref.start for name, ref in refs.items()}
    name = max(nbytes, key=nbytes.get)
    total = sum(nbytes.values())
    return {"largest": name, "largest_bytes": nbytes[name], "total_bytes": total,
            "bf16": any(r.dtype == "BF16" for r in refs.values()),
            "bytes_per_element": total / sum(r.n_elements for r in refs.values()),
            "budget": 3 * nbytes[name] + 300 * MB}


def command(tool: str, ckpt: Path, out: Path, outtype: str) -> tuple[list, dict]:
    if tool == "edgelm":
        return [python(), "-m", "edgelm", "convert", ckpt, "-o", out, "--outtype", outtype], {}
    env = {"PYTHONPATH": str(llama_cpp_source() / "gguf-py")}
    return [python(), HERE / "reference_convert.py", ckpt, "--outfile", out, "--outtype", outtype], env


def warm(ckpt: Path) -> None:
    """Read the checkpoint once so that no run pays a cold page cache."""
    for f in ckpt.glob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def bench(ckpt: Path, outtypes: list[str], reps: int, tag: str = "") -> dict:
    """{outtype: {tool: [Run, ...]}}, order alternating per repetition, outputs kept from the last one."""
    warm(ckpt)
    runs: dict = {t: {tool: [] for tool in TOOLS} for t in outtypes}
    for rep in range(reps):
        for outtype in outtypes:
            for tool in (TOOLS if rep % 2 == 0 else TOOLS[::-1]):
                out = OUT / f"{tool}{tag}-{outtype}.gguf"
                out.unlink(missing_ok=True)
                os.sync()  # the previous run's dirty pages must not be flushed on this run's clock
                cmd, env = command(tool, ckpt, out, outtype)
                r = run_measured(cmd, env=env).check()
                runs[outtype][tool].append(r)
                log(f"{ckpt.name} rep {rep + 1}/{reps} {outtype:5s} {tool:9s} {r.seconds:6.1f} s wall "
                    f"{r.cpu_seconds:6.1f} s CPU {r.peak_rss / MB:7.0f} MB")
    return runs


def _col(runs, key: str) -> list[float]:
    return [getattr(x, key) for x in runs]


def render(shape: str, runs: dict, diffs: dict, sz: dict, profiles: list[dict], scaling: list[dict], meta: dict) -> str:
    time_rows, mem_rows = [], []
    for outtype, by_tool in runs.items():
        e, r = by_tool["edgelm"], by_tool["llama.cpp"]
        ratio = lambda key: median(_col(e, key)) / median(_col(r, key))  # noqa: E731
        time_rows.append([outtype, spread(_col(e, "seconds")), spread(_col(r, "seconds")), f"{ratio('seconds'):.2f}",
                          spread(_col(e, "cpu_seconds")), spread(_col(r, "cpu_seconds")), f"{ratio('cpu_seconds'):.2f}"])
        worst = max(_col(e, "peak_rss"))
        mem_rows.append([outtype, f"{median(_col(e, 'peak_rss')) / MB:,.0f}", f"{median(_col(r, 'peak_rss')) / MB:,.0f}",
                         f"{ratio('peak_rss'):.2f}", f"{worst / MB:,.0f}", f"{sz['budget'] / MB:,.0f}",
                         "within" if worst <= sz["budget"] else f"**over by {(worst - sz['budget']) / MB:,.0f} MB**"])
    out = [
        "# Conversion: edgelm against llama.cpp's convert_hf_to_gguf.py",
        "",
        (f"Checkpoint: random weights in the `{shape}` shape (`scripts/make_random_checkpoint.py`, Llama layout, bf16),"
         if meta["random"] else f"Checkpoint: `{shape}`,"),
        f"{meta['n_params'] / 1e6:,.0f}M parameters, {sz['total_bytes'] / MB:,.0f} MB of safetensors; largest tensor "
        f"`{sz['largest']}` ({sz['largest_bytes'] / MB:,.0f} MB as stored).",
        f"Each conversion runs in a fresh process (interpreter start and imports included), {meta['reps']} repetitions",
        "per tool and outtype, order alternating, page cache warm, `sync` before every run. Peak RSS: the command's",
        "`ru_maxrss` from `wait4` in a small spawner process (a child's `ru_maxrss` starts from the peak of whatever",
        "forked it, so forking straight from the benchmark would leak its own memory into the numbers); resident",
        "file-backed pages of a memory-mapped checkpoint count too. MB = 10^6 bytes.",
        "",
        "### Time (seconds: median, min-max)",
        "",
        markdown_table(["outtype", "edgelm wall", "llama.cpp wall", "wall ratio edgelm/llama.cpp", "edgelm CPU",
                        "llama.cpp CPU", "CPU ratio edgelm/llama.cpp"], time_rows),
        "",
        "CPU = user + system seconds of the child; on a shared machine it moves less than wall time.",
        "",
        "### Peak memory (MB)",
        "",
        markdown_table(["outtype", "edgelm peak RSS", "llama.cpp peak RSS", "RSS ratio edgelm/llama.cpp",
                        "edgelm worst run", "budget", "edgelm vs budget"], mem_rows, "lrrrrrl"),
        "",
        f"Budget (from the issue): 3 × largest tensor as stored + 300 MB = 3 × {sz['largest_bytes'] / MB:,.0f} + 300 = "
        f"{sz['budget'] / MB:,.0f} MB, checked against edgelm's worst run.",
        "",
    ]
    if scaling:
        out += ["### The budget on a larger shape", "",
                "One f16 run per tool (order: edgelm first), to see how peak RSS scales against the budget.", "",
                markdown_table(["shape", "safetensors MB", "largest tensor MB", "budget MB", "edgelm peak RSS MB",
                                "llama.cpp peak RSS MB", "edgelm vs budget", "edgelm / llama.cpp wall s", "outputs"],
                               [[s["shape"], f"{s['total_bytes'] / MB:,.0f}", f"{s['largest_bytes'] / MB:,.0f}",
                                 f"{s['budget'] / MB:,.0f}", f"{s['edgelm_rss'] / MB:,.0f}", f"{s['llama_rss'] / MB:,.0f}",
                                 "within" if s["edgelm_rss"] <= s["budget"]
                                 else f"**over by {(s['edgelm_rss'] - s['budget']) / MB:,.0f} MB**",
                                 f"{s['edgelm_s']:.1f} / {s['llama_s']:.1f}", s["diff"]] for s in scaling],
                               "lrrrrrlrl"), ""]
    out += ["## Are the outputs the same model?", ""]
    for outtype, d in diffs.items():
        out.append(f"- **{outtype}**: {d.summary()}; names, shapes and types "
                   f"{'identical' if d.layout_equal else 'differ'}. Metadata keys only in edgelm's file: "
                   f"{', '.join(f'`{k}`' for k in d.metadata_only_a) or 'none'}; only in llama.cpp's: "
                   f"{', '.join(f'`{k}`' for k in d.metadata_only_b) or 'none'}; values differing: "
                   f"{', '.join(f'`{k}`' for k in d.metadata_differ) or 'none'} (edgelm.* provenance keys ignored).")
    out += ["", "llama.cpp's converter refuses the reference tokenizer's unknown pre-tokenizer hash, so",
            "`benchmarks/reference_convert.py` answers `llama-bpe` (its actual split) to that one lookup; tensors go",
            "through the reference code unchanged.", ""]
    if profiles:
        out += ["## Where edgelm's time and memory go", "",
                "Measured by `benchmarks/convert_profile.py` (cProfile; tracemalloc plus /proc/self/status per tensor),",
                "one run each; cProfile adds overhead, so read the shares, not the absolute seconds.", ""]
        for p in profiles:
            out += [f"**{p['outtype']}** ({p['total_s']:.1f} s under cProfile; "
                    f"{p['hwm_before_convert'] / MB:,.0f} MB resident after imports):", "",
                    markdown_table(["function (cumulative)", "seconds", "share"],
                                   [[k, f"{v:.2f}", f"{100 * v / p['total_s']:.0f}%"] for k, v in p["watched"].items()]),
                    "",
                    "Most self time: " + "; ".join(f"`{name}` {t:.2f} s" for t, name in p["top_self"]) + ".", ""]
            notes = findings(p, sz["total_bytes"], sz["budget"], sz["bf16"])
            if notes:  # the numbers are this run's; the code they point at was read on 2026-11-24
                out += ["Findings (numbers from this run; the code they name as read on 2026-11-24):", ""]
            out += [f"- {f}" for f in notes] + [""]
    out += ["## Machine and run", "", f"- {meta['machine']}",
            f"- {meta['date']}, llama-cpp-python {meta['llama_cpp_python']} (convert_hf_to_gguf.py and gguf-py from its",
            f"  vendored llama.cpp; edgelm with gguf {meta['gguf']}); script wall time {meta['seconds'] / 60:.1f} min.",
            f"- Code measured: `converters/*.py` sha256 {meta['converters']}… (`common.source_digest`).",
            "- The machine is shared with other work: the min-max spread shows how much the runs moved.",
            "", "## Regenerate", "", "```bash", f".venv/bin/python {meta['command']}", "```", ""]
    return "\n".join(out)


def scale_check(shape: str) -> dict:
    """One f16 run per tool on a larger random shape: peak RSS against the budget, outputs compared."""
    ckpt = checkpoint(shape)
    runs = bench(ckpt, ["f16"], 1, tag=f"-{shape}")["f16"]
    a, b = OUT / f"edgelm-{shape}-f16.gguf", OUT / f"llama.cpp-{shape}-f16.gguf"
    diff = gguf_diff.compare(a, b).summary()
    a.unlink()
    b.unlink()
    e, r = runs["edgelm"][0], runs["llama.cpp"][0]
    return {"shape": shape, **sizes(ckpt), "edgelm_rss": e.peak_rss, "llama_rss": r.peak_rss,
            "edgelm_s": e.seconds, "llama_s": r.seconds, "diff": diff}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen2.5-0.5b", help="a scripts/make_random_checkpoint.py shape")
    p.add_argument("--checkpoint", type=Path, help="convert this checkpoint directory instead of a random --shape")
    p.add_argument("--outtype", action="append", help="f16 and q8_0 by default (both tools write both)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--scale-shape", action="append",
                   help="larger shapes for the one-run budget check (default llama-3.2-1b; 'none' to skip)")
    p.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                   help="profile edgelm when it is slower, larger or over budget (auto)")
    p.add_argument("--doc", type=Path, default=DOCS / "conversion.md")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv

    import gguf
    import llama_cpp

    from edgelm.gguf_reader import read_gguf

    t0 = time.perf_counter()
    llama_cpp_source()  # fail early with the set-up hint
    OUT.mkdir(parents=True, exist_ok=True)
    ckpt = args.checkpoint or checkpoint(args.shape)
    shape = args.checkpoint.name if args.checkpoint else args.shape
    outtypes = args.outtype or ["f16", "q8_0"]
    meta = {"machine": machine(), "date": today(), "reps": args.reps, "random": args.checkpoint is None,
            "command": " ".join(["benchmarks/convert_bench.py", *argv]), "llama_cpp_python": llama_cpp.__version__,
            "gguf": getattr(gguf, "__version__", "0.19.0"), "converters": source_digest("converters")}
    runs = bench(ckpt, outtypes, args.reps)
    diffs = {t: gguf_diff.compare(OUT / f"edgelm-{t}.gguf", OUT / f"llama.cpp-{t}.gguf") for t in outtypes}
    for t, d in diffs.items():
        log(f"{t}: {d.summary()}")
    meta["n_params"] = read_gguf(OUT / f"edgelm-{outtypes[0]}.gguf").n_parameters
    sz = sizes(ckpt)
    scaling = [scale_check(s) for s in (args.scale_shape or ["llama-3.2-1b"]) if s != "none"]
    profiles = []
    for t in outtypes:
        e, r = runs[t]["edgelm"], runs[t]["llama.cpp"]
        worse = any(median(_col(e, k)) > median(_col(r, k)) for k in ("seconds", "cpu_seconds", "peak_rss"))
        if args.profile == "always" or (args.profile == "auto" and (worse or max(_col(e, "peak_rss")) > sz["budget"])):
            log(f"profiling edgelm {t}")
            profiles.append(profile(ckpt, OUT, t))
    meta["seconds"] = time.perf_counter() - t0
    args.doc.write_text(render(shape, runs, diffs, sz, profiles, scaling, meta), encoding="utf-8")
    raw = {t: {tool: [{"seconds": x.seconds, "cpu_seconds": x.cpu_seconds, "peak_rss": x.peak_rss} for x in rs]
               for tool, rs in by.items()} for t, by in runs.items()}
    (OUT / "results.json").write_text(json.dumps({"meta": meta, "sizes": sz, "runs": raw, "scaling": scaling,
                                                  "profiles": profiles}, indent=1, default=str))
    log(f"wrote {args.doc} in {meta['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
