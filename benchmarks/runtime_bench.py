"""Prompt and generation speed of edgelm (Python API and CLI) vs llama.cpp's llama-bench, side by side.

    .venv/bin/python benchmarks/runtime_bench.py            # all models, writes docs/runtime-benchmark.md
    .venv/bin/python benchmarks/runtime_bench.py --quick    # the small and tiny models only

Same GGUF, threads, batch and flash-attention setting for all three; rounds alternate
the tools so machine noise falls on each alike; medians over rounds. pp512 is a
512-token prompt in one batch; tg128 is 128 tokens generated one at a time (edgelm
also samples greedily each step, which llama-bench does not: that cost counts against us).
The Python overhead per generated token is measured on the tiny model, where it dominates:
1/edgelm_tg - 1/llamabench_tg.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH as BENCH_DIR, machine, markdown_table, median, today, tool, write_doc  # noqa: E402

THREADS = 2
N_PROMPT, N_GEN = 512, 128


def models(quick: bool) -> dict[str, Path]:
    """name -> GGUF, built once into .bench/ (random-weight 0.5B shape, the reference models)."""
    from edgelm.converters import convert
    from edgelm.converters.quantize import quantize
    from edgelm.runtime.model import default_model_path

    BENCH_DIR.mkdir(exist_ok=True)
    out = {"small Q8_0": default_model_path()}
    tiny = BENCH_DIR / "tiny-q8_0.gguf"
    if not tiny.exists():
        convert(ROOT / "models" / "tiny", tiny, outtype="q8_0")
    out["tiny Q8_0"] = tiny
    if quick:
        return out
    ckpt = BENCH_DIR / "ckpt-qwen2.5-0.5b"
    if not (ckpt / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_random_checkpoint.py"), "qwen2.5-0.5b",
                        str(ckpt)], check=True)
    f16 = BENCH_DIR / "q05-f16.gguf"
    if not f16.exists():
        convert(ckpt, f16, outtype="f16")
    for quant in ("q8_0", "q4_k_m"):
        path = BENCH_DIR / f"q05-{quant}.gguf"
        if not path.exists():
            quantize(f16, path, quant)
        out[f"0.5B-shape {quant.upper()}"] = path
    return out


def llama_bench(model: Path) -> dict[str, float]:
    r = subprocess.run([str(tool("llama-bench")), "-m", str(model), "-p", str(N_PROMPT), "-n", str(N_GEN),
                        "-t", str(THREADS), "-r", "3", "-o", "json"], capture_output=True, text=True, check=True)
    rows = json.loads(r.stdout)
    return {("pp" if row["n_prompt"] else "tg"): row["avg_ts"] for row in rows}


def prompt_tokens(m) -> list[int]:
    """N_PROMPT real tokens of held-out text (a random-weight model does not care which)."""
    from edgelm import corpus

    ids = m.tokenize(corpus.text("heldout", max_chars=20_000))
    return ids[:N_PROMPT]


def edgelm_api(model: Path) -> dict[str, float]:
    import edgelm

    with edgelm.load(model, n_ctx=N_PROMPT + N_GEN, n_batch=N_PROMPT, n_threads=THREADS) as m:
        prompt = prompt_tokens(m)
        m.generate(prompt, max_tokens=2, temperature=0)  # warm-up: a full prompt and a step, as llama-bench's
        pp, tg = [], []
        for _ in range(3):  # each run starts from an empty KV cache, as llama-bench's do
            m.reset()
            pp.append(m.generate(prompt, max_tokens=1, temperature=0).timings.prompt_tps)
        for _ in range(3):
            m.reset()
            tg.append(m.generate(prompt[:1], max_tokens=N_GEN + 1, temperature=0, ignore_eos=True).timings.gen_tps)
    return {"pp": statistics.mean(pp), "tg": statistics.mean(tg)}


def edgelm_cli(model: Path, prompt_text: str) -> dict[str, float]:
    def run(*args: str) -> dict:
        r = subprocess.run([sys.executable, "-m", "edgelm", "run", str(model), "--threads", str(THREADS),
                            "--ctx", str(N_PROMPT + N_GEN), "--temp", "0", "--json", *args],
                           capture_output=True, text=True, check=True)
        return json.loads(r.stdout)

    # three runs of each, as llama-bench -r 3 and edgelm_api average three
    pp = statistics.mean(run("-p", prompt_text, "-n", "1")["prompt_tps"] for _ in range(3))
    tg = statistics.mean(run("-p", "", "-n", str(N_GEN + 1), "--ignore-eos")["gen_tps"] for _ in range(3))
    return {"pp": pp, "tg": tg}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small and tiny models only")
    p.add_argument("--only", metavar="TEXT", help="only the models whose name contains TEXT (e.g. 0.5B)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="threads for every tool")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "runtime-benchmark.md")
    args = p.parse_args(argv)
    global THREADS
    THREADS = args.threads

    import edgelm

    results: dict[str, dict[str, list[dict]]] = {}
    chosen = {k: v for k, v in models(args.quick).items() if args.only is None or args.only in k}
    for name, path in chosen.items():
        with edgelm.load(path, n_ctx=N_PROMPT + N_GEN, n_threads=THREADS) as m:
            text = m.detokenize(prompt_tokens(m)[1:])
        runs = results[name] = {"llama-bench": [], "edgelm API": [], "edgelm CLI": []}
        for r in range(args.rounds):
            order = [("llama-bench", lambda: llama_bench(path)), ("edgelm API", lambda: edgelm_api(path)),
                     ("edgelm CLI", lambda: edgelm_cli(path, text))]
            for tool_name, fn in order[r % 3:] + order[:r % 3]:  # rotate who goes first
                runs[tool_name].append(fn())
            print(name, f"round {r + 1}:", {k: v[-1] for k, v in runs.items()}, file=sys.stderr)
    write_report(results, args.out)
    return 0


def med(rows: list[dict], key: str) -> float:
    return median([row[key] for row in rows])


def write_report(results: dict, out: Path) -> None:
    rows, plot = [], {}
    for name, runs in results.items():
        for tool_name, rs in runs.items():
            pp, tg = med(rs, "pp"), med(rs, "tg")
            # ratios pair each round with llama-bench's in the same round, so slow drifts of a shared
            # machine fall on both sides; the median of those paired ratios is reported
            r_pp = median([r["pp"] / b["pp"] for r, b in zip(rs, runs["llama-bench"])])
            r_tg = median([r["tg"] / b["tg"] for r, b in zip(rs, runs["llama-bench"])])
            rows.append([name, tool_name, f"{pp:.1f}", f"{tg:.1f}",
                         "1.00" if tool_name == "llama-bench" else f"{r_pp:.3f}",
                         "1.00" if tool_name == "llama-bench" else f"{r_tg:.3f}"])
            plot.setdefault(name, {})[tool_name] = (r_pp, r_tg)
    tiny = results.get("tiny Q8_0")
    overhead = ""
    if tiny:
        ms = 1000 / med(tiny["edgelm API"], "tg") - 1000 / med(tiny["llama-bench"], "tg")
        overhead = (f"\nPython overhead per generated token (tiny model, API): **{ms:.3f} ms** "
                    f"(1/edgelm tg128 − 1/llama-bench tg128; includes greedy sampling, which llama-bench skips).\n")
    table = markdown_table(["model", "tool", "pp512 t/s", "tg128 t/s", "pp ratio", "tg ratio"], rows)
    img = out.parent / "img" / "runtime-benchmark.png"
    _plot(plot, img)
    write_doc(out, (
        f"# Runtime speed: edgelm vs llama-bench\n\n"
        f"Generated by `benchmarks/runtime_bench.py` on {today()}, {machine()}, "
        f"{THREADS} threads, medians of rounds (each round: llama-bench `-r 3`, edgelm 3 runs).\n\n"
        f"{table}\n{overhead}\n![ratios]({img.relative_to(out.parent)})\n\n"
        "Ratios are edgelm / llama-bench on the same GGUF, paired round by round (each round runs the three tools "
        "back to back, in rotating order) and the median of those paired ratios taken; t/s columns are medians "
        "over rounds. The goal is ≥ 0.97. "
        "The 0.5B-shape models have random weights (scripts/make_random_checkpoint.py qwen2.5-0.5b, Llama layout, "
        "151,936-token vocabulary): speed depends on shapes, not on what the weights say.\n"
    ))
    print(out.read_text())


def _plot(plot: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
    names = list(plot)
    for ax, k, title in ((axes[0], 0, "pp512"), (axes[1], 1, "tg128")):
        for j, tool_name in enumerate(("edgelm API", "edgelm CLI")):
            ax.bar([i + 0.4 * j for i in range(len(names))], [plot[n][tool_name][k] for n in names], 0.4,
                   label=tool_name)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(0.97, color="r", lw=0.8, ls="--")
        ax.set_xticks([i + 0.2 for i in range(len(names))], names, rotation=15, fontsize=8)
        ax.set_title(f"{title}: edgelm / llama-bench")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
