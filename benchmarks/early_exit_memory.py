"""Memory of early-exit decoding vs plain decoding: peak RSS, and what the process holds physically (PSS).

Each configuration runs in a fresh process: load the model (plain, or its early-exit split; no in-memory prompt
cache, whose budget is its own), generate 16 greedy tokens after a prompt, then read /proc/self/status (VmHWM:
peak RSS; RssAnon, RssFile) and smaps_rollup (Pss).

RSS counts a file page once per mapping: both halves of a split map its shared file (token_embd and the head),
so its pages count twice in RSS though they exist once. PSS divides each page among its mappings, so it
counts them once. Anonymous memory (RssAnon: KV cache, compute and output buffers) is where real overhead shows.

    .venv/bin/python benchmarks/early_exit_memory.py [--out docs/early-exit-memory.md]

Models: the bundled default model and its split at 4 (18 MB, 8,192-token vocabulary, untied head), and the
random-weight 0.5B-shape Q4_K_M of runtime_bench.py split at 6 of 24 (395 MB, 151,936-token vocabulary, tied).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, DOCS, log, machine, markdown_table, run_worker, split_is_current, today  # noqa: E402

PROMPTS = {"short (60 tokens)": 60, "long (500 tokens)": 500}
N_CTX = 1024


def worker(model: str, k: int, n_prompt: int) -> dict:
    import edgelm
    from edgelm import corpus

    # no in-memory prompt cache: its states would count too, and its budget is set apart from either mode
    m = edgelm.load(model, n_threads=2, n_ctx=N_CTX, prefix_cache_bytes=0, **({"early_exit": k} if k else {}))
    ids = m.tokenize(corpus.text("heldout", max_chars=8000))[:n_prompt]
    m.generate(ids, max_tokens=16, temperature=0, ignore_eos=True)
    status = {line.split(":")[0]: int(line.split()[1]) / 1024 for line in open("/proc/self/status")
              if line.startswith(("VmHWM", "VmRSS", "RssAnon", "RssFile"))}
    pss = next(int(line.split()[1]) / 1024 for line in open("/proc/self/smaps_rollup") if line.startswith("Pss:"))
    return {"peak_rss": status["VmHWM"], "rss": status["VmRSS"], "anon": status["RssAnon"],
            "file": status["RssFile"], "pss": pss}


def models() -> dict[str, tuple[Path, int]]:
    from runtime_bench import models as runtime_models  # builds the 0.5B-shape files once into .bench/

    from edgelm.converters.early_exit import split_model
    from edgelm.runtime.model import default_model_path

    q05 = BENCH / "early-exit" / "q05-q4_k_m.gguf"
    if not q05.exists():
        q05.parent.mkdir(parents=True, exist_ok=True)
        q05.symlink_to(runtime_models(quick=False)["0.5B-shape Q4_K_M"])
    if not split_is_current(q05, 6):
        split_model(q05, 6)
    return {"small Q8_0, k=4": (default_model_path(), 4), "0.5B-shape Q4_K_M, k=6": (q05, 6)}


def measure(model: Path, k: int, n_prompt: int) -> dict:
    return run_worker(__file__, model, k, n_prompt)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DOCS / "early-exit-memory.md")
    p.add_argument("--worker", nargs=3, metavar=("MODEL", "K", "N_PROMPT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), int(args.worker[2]))))
        return 0
    rows = []
    for name, (path, k) in models().items():
        for prompt, n in PROMPTS.items():
            plain, ee = measure(path, 0, n), measure(path, k, n)
            log(f"{name}, {prompt}: plain {plain}, early exit {ee}")
            for what, r in (("plain", plain), ("early exit", ee)):
                rows.append([name, prompt, what] + [f"{r[key]:.1f}" for key in ("peak_rss", "anon", "file", "pss")]
                            + [f"{(r['peak_rss'] / plain['peak_rss'] - 1) * 100:+.1f}%",
                               f"{(r['pss'] / plain['pss'] - 1) * 100:+.1f}%"])
    table = markdown_table(["model", "prompt", "decoding", "peak RSS MiB", "anon MiB", "file MiB", "PSS MiB",
                            "peak RSS vs plain", "PSS vs plain"], rows)
    doc = __doc__.split("\n\n")
    args.out.write_text(
        f"# Early exit: memory\n\nMeasured {today()} by `benchmarks/early_exit_memory.py` on {machine()}.\n\n"
        + "\n\n".join(doc[1:3]) + f"\n\n{table}\n\nModels: {doc[4].split(':', 1)[1].strip()}\n")
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
