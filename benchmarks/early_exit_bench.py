"""Decode speed of speculative decoding in edgelm vs plain decoding, greedy, side by side in one run.

For each model: plain decoding (edgelm, and llama.cpp's llama-bench tg128 for reference), edgelm early
exit (the model's own split), a separate draft model (the tiny reference model) and prompt lookup, on
the same prompts (held-out code of the reference corpus), greedy, each configuration in a fresh process
so its peak RSS is its own. Rounds rotate the order; figures are medians over rounds. Every
speculative output is compared token by token with the plain output of the same prompt.

    .venv/bin/python benchmarks/early_exit_bench.py [--rounds 3] [--threads 2] [--tokens 128]

Models: the bundled default model (its split: exit norm trained alone, the weights untouched) and its
early-exit-trained sibling models/small-ee (scripts/train_exit.py layerskip), converted here to Q8_0, with
its trained exit norm, and again with its trained exit block (scripts/train_exit.py exit-block) when it has one.
Report: docs/early-exit.md and docs/img/early-exit.png.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BENCH, DOCS, ROOT, have_tool, log, machine, markdown_table, median, python,  # noqa: E402
                    run_measured, split_is_current, today, tool, write_doc)

CONFIGS = ("plain", "early exit", "draft model", "lookup")
EXIT_LAYER = 4  # of 16: the shallowest exit trained in models/small-ee (the bundled model's split is at 4 too)


def prompts(n: int) -> list[str]:
    """Openings of held-out documents: code the models never trained on."""
    sys.path.insert(0, str(ROOT))
    from edgelm import corpus

    docs = [d.text for d in corpus.documents("heldout") if len(d.text) > 2000]
    return [d[:600] for d in docs[:n]]


def worker(args) -> None:
    """One configuration in this process: generate for every prompt, print JSON."""
    import edgelm

    options = {"plain": {}, "early exit": {"early_exit": args.k or True}, "draft model": {"draft": args.draft},
               "lookup": {"lookup": True}}[args.config]
    model = edgelm.load(args.model, n_threads=args.threads, n_ctx=1024, **options)
    model.generate("def f():", max_tokens=8, temperature=0)  # warm-up
    out = []
    for p in prompts(args.prompts):
        c = model.generate(p, max_tokens=args.tokens, temperature=0, ignore_eos=True)
        s = c.timings.speculative
        out.append({"tokens": c.tokens, "gen_s": c.timings.gen_s, "n": c.timings.completion_tokens,
                    "drafted": s.drafted if s else 0, "accepted": s.accepted if s else 0, "rounds": s.rounds if s else 0})
    print(json.dumps(out))


def llama_bench_tg(model: Path, threads: int, tokens: int) -> float:
    r = subprocess.run([str(tool("llama-bench")), "-m", str(model), "-p", "0", "-n", str(tokens), "-t", str(threads),
                        "-r", "3", "-o", "json"], capture_output=True, text=True, check=True)
    return float(json.loads(r.stdout)[0]["avg_ts"])


def prepare(threads: int) -> list[tuple[str, Path, int | None]]:
    """(label, single-file GGUF with its split beside it, exit layer) for each benchmarked model."""
    sys.path.insert(0, str(ROOT))
    from edgelm.converters import convert
    from edgelm.converters.early_exit import EXIT_BLOCKS, available_splits, write_early_exit
    from edgelm.runtime.model import default_model_path

    out = []
    bundled = default_model_path()
    out.append(("small (bundled)", bundled, None))
    ee_dir = ROOT / "models" / "small-ee"
    if (ee_dir / "config.json").is_file():
        target = BENCH / "early-exit" / "small-ee-q8_0.gguf"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.is_file() or not available_splits(target):
            convert(ee_dir, target, outtype="q8_0")
        if not split_is_current(target, EXIT_LAYER, exit_norm="trained"):
            write_early_exit(target, EXIT_LAYER, hf_dir=ee_dir, n_threads=threads, exit_block=False)
        out.append(("small-ee (early-exit trained)", target, None))
        if (ee_dir / EXIT_BLOCKS).is_file():  # the same model, drafting through its trained exit block
            block = target.with_name("small-ee-block-q8_0.gguf")
            if not block.is_file():
                shutil.copyfile(target, block)
            if not split_is_current(block, EXIT_LAYER, exit_norm="trained block"):
                write_early_exit(block, EXIT_LAYER, hf_dir=ee_dir, n_threads=threads)
            out.append(("small-ee + exit block", block, None))
    return out


def draft_model() -> Path:
    sys.path.insert(0, str(ROOT))
    from edgelm.converters import convert

    target = BENCH / "early-exit" / "tiny-q8_0.gguf"
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.is_file():
        convert(ROOT / "models" / "tiny", target, outtype="q8_0")
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--worker", dest="config", choices=CONFIGS, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--draft", help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.config:
        worker(args)
        return
    log(machine())
    draft = draft_model()
    results = {}
    for label, path, k in prepare(args.threads):
        runs = {c: [] for c in CONFIGS}
        bench = []
        for r in range(args.rounds):
            order = CONFIGS[r % len(CONFIGS):] + CONFIGS[:r % len(CONFIGS)]
            for config in order:
                cmd = [python(), __file__, "--worker", config, "--model", path, "--draft", draft,
                       "--threads", args.threads, "--tokens", args.tokens, "--prompts", args.prompts]
                run = run_measured(cmd + (["--k", k] if k else [])).check()
                data = json.loads(run.stdout)
                runs[config].append((data, run.peak_rss))
                tps = sum(d["n"] - 1 for d in data) / sum(d["gen_s"] for d in data)
                log(f"{label} round {r + 1} {config}: {tps:.1f} tok/s, peak RSS {run.peak_rss / 2**20:.1f} MiB")
            if have_tool("llama-bench"):
                bench.append(llama_bench_tg(path, args.threads, args.tokens))
        results[label] = (runs, bench)
    report(results, args)


def report(results, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, plot = [], {}
    for label, (runs, bench) in results.items():
        plain_tokens = [d["tokens"] for d in runs["plain"][0][0]]
        plain_tps = [sum(d["n"] - 1 for d in data) / sum(d["gen_s"] for d in data) for data, _ in runs["plain"]]
        plain_rss = median([rss for _, rss in runs["plain"]])
        for config in CONFIGS:
            tps = [sum(d["n"] - 1 for d in data) / sum(d["gen_s"] for d in data) for data, _ in runs[config]]
            speedups = [t / p for t, p in zip(tps, plain_tps)]  # paired by round
            data = runs[config][0][0]
            same = sum(d["tokens"] == t for d, t in zip(data, plain_tokens))
            drafted = sum(d["drafted"] for d in data)
            accepted = sum(d["accepted"] for d in data)
            rounds = sum(d["rounds"] for d in data)
            rss = median([rss for _, rss in runs[config]])
            rows.append([label, config, f"{median(tps):.0f}", f"{median(speedups):.2f}x",
                         f"{accepted / drafted:.1%}" if drafted else "-",
                         f"{(accepted + rounds) / rounds:.2f}" if rounds else "-",
                         f"{rss / 2**20:.1f}", f"{rss / plain_rss - 1:+.1%}", f"{same}/{len(data)}"])
            plot.setdefault(label, {})[config] = median(speedups)
        if bench:
            rows.append([label, "llama-bench tg (reference)", f"{median(bench):.0f}",
                         f"{median(bench) / median(plain_tps):.2f}x of edgelm plain", "-", "-", "-", "-", "-"])
    table = markdown_table(["model", "decoding", "tok/s", "speedup", "acceptance", "tokens/round", "peak RSS MiB",
                            "RSS vs plain", "identical outputs"], rows)
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(1, len(plot))
    for i, (label, values) in enumerate(plot.items()):
        ax.bar([j + i * width for j in range(len(CONFIGS))], [values[c] for c in CONFIGS], width, label=label)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(1.5, color="red", lw=0.8, ls="--", label="goal 1.5x")
    ax.set_xticks([j + width * (len(plot) - 1) / 2 for j in range(len(CONFIGS))], CONFIGS)
    ax.set_ylabel("decode speedup over plain (greedy)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    (DOCS / "img").mkdir(parents=True, exist_ok=True)
    fig.savefig(DOCS / "img" / "early-exit.png", dpi=120)
    text = f"""# Early exit and speculative decoding: benchmark

Measured {today()} by `benchmarks/early_exit_bench.py --rounds {args.rounds} --threads {args.threads} --tokens \
{args.tokens} --prompts {args.prompts}` on {machine()}.

Greedy decoding of {args.tokens} tokens after each of {args.prompts} held-out code prompts; tok/s is generation
after the first token; speedup is the median over rounds of each round's ratio to plain decoding in the same
round; every configuration runs in a fresh process (peak RSS is its own, file-backed weights included).
"identical outputs" compares each prompt's tokens with plain decoding's.

{table}

![speedups](img/early-exit.png)
"""
    doc = DOCS / "early-exit.md"
    write_doc(doc, text)
    print(table)


if __name__ == "__main__":
    main()
