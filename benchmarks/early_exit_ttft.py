"""Time to first token of early exit vs plain decoding, with the draft's passthrough layer and without it.

Each configuration runs in a fresh process: load the model (plain, its early-exit split, or the same split
written without the passthrough layer, as split format 2 was), warm up on a short prompt, then time three
500-token prompts (held-out text, each from an empty KV cache; no prompt cache) and keep the median. Without the
passthrough layer the draft's prefill asks for every position's logits, so it computes the head for every
prompt token; with it, for the last one only.

    .venv/bin/python benchmarks/early_exit_ttft.py [--out docs/early-exit-ttft.md]

Models: the bundled model split at 4, and the random 0.5B-shape Q4_K_M of runtime_bench.py split at 6 (151,936-
token vocabulary, where the head is a third of the weights).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, DOCS, log, machine, markdown_table, run_worker, split_is_current, today  # noqa: E402

N_PROMPT = 500
WORK = BENCH / "early-exit-ttft"
CONFIGS = ("plain", "early exit, passthrough draft", "early exit, plain draft")


def worker(model: str, k: int) -> float:
    import edgelm
    from edgelm import corpus

    m = edgelm.load(model, n_threads=2, n_ctx=1024, prefix_cache_bytes=0, **({"early_exit": k} if k else {}))
    ids = m.tokenize(corpus.text("heldout", max_chars=8000))
    m.generate(ids[:50], max_tokens=2, temperature=0)
    times = []
    for start in range(3):
        m.reset()
        times.append(m.generate(ids[start:start + N_PROMPT], max_tokens=1, temperature=0).timings.ttft_s)
    return statistics.median(times) * 1000


def models() -> dict[str, tuple[Path, Path, int]]:
    """name: (model with its passthrough split, a link to it with a plain-draft split, k)."""
    from runtime_bench import models as runtime_models  # builds the 0.5B-shape files once into .bench/

    from edgelm.converters.early_exit import split_model
    from edgelm.runtime.model import default_model_path

    out = {}
    for name, source, k in (("small Q8_0, k=4", default_model_path(), 4),
                            ("0.5B-shape Q4_K_M, k=6", runtime_models(quick=False)["0.5B-shape Q4_K_M"], 6)):
        pair = []
        for kind, passthrough in (("passthrough", True), ("plain", False)):
            link = WORK / kind / source.name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(source.resolve())
            if not split_is_current(link, k, passthrough):
                split_model(link, k, passthrough=passthrough)
            pair.append(link)
        out[name] = (pair[0], pair[1], k)
    return out


def measure(model: Path, k: int) -> float:
    return run_worker(__file__, model, k)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DOCS / "early-exit-ttft.md")
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "K"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]))))
        return 0
    rows = []
    for name, (with_pass, without, k) in models().items():
        ms = dict(zip(CONFIGS, (measure(with_pass, 0), measure(with_pass, k), measure(without, k))))
        log(f"{name}: {ms}")
        for config, value in ms.items():
            rows.append([name, config, f"{value:.1f}", f"{(value / ms['plain'] - 1) * 100:+.1f}%"])
    table = markdown_table(["model", "decoding", "TTFT ms (median of 3)", "vs plain"], rows)
    doc = __doc__.split("\n\n")
    args.out.write_text(
        f"# Early exit: time to first token\n\nMeasured {today()} by `benchmarks/early_exit_ttft.py` on {machine()}.\n\n"
        + doc[1] + f"\n\n{table}\n\nModels: {doc[3].split(':', 1)[1].strip()}\n")
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
