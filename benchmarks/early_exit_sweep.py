"""Early exit's draft threshold and draft length: speedup over plain greedy decoding for each setting.

    .venv/bin/python benchmarks/early_exit_sweep.py [MODEL] [--threads 2] [--rounds 2]

MODEL (default: the bundled model) must have its early-exit split beside it. One process; every setting runs
next to a plain run on the same held-out prompts (order alternating by round); ratios are medians over rounds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import edgelm  # noqa: E402
from early_exit_bench import prompts  # noqa: E402

SETTINGS = [(threshold, draft_max) for threshold in (0.1, 0.2, 0.3, 0.45, 0.6, 0.8) for draft_max in (3, 6)]


def run(model, texts: list[str]) -> tuple[float, int, int, int]:
    n = drafted = accepted = rounds = 0
    seconds = 0.0
    for text in texts:
        c = model.generate(text, max_tokens=128, temperature=0, ignore_eos=True)
        n += c.timings.completion_tokens - 1
        seconds += c.timings.gen_s
        if c.timings.speculative is not None:
            s = c.timings.speculative
            drafted, accepted, rounds = drafted + s.drafted, accepted + s.accepted, rounds + s.rounds
    return n / seconds, drafted, accepted, rounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model", nargs="?")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    texts = prompts(4)
    plain = edgelm.load(args.model, n_threads=args.threads, n_ctx=1024)
    models = {s: edgelm.load(args.model, n_threads=args.threads, n_ctx=1024, early_exit=True, draft_threshold=s[0],
                             draft_max=s[1]) for s in SETTINGS}
    ratios = {s: [] for s in SETTINGS}
    counts = {}
    for r in range(args.rounds):
        for s, m in models.items():  # each setting paired with a plain run next to it, in rotating order
            first, second = (plain, m) if r % 2 == 0 else (m, plain)
            a, b = run(first, texts), run(second, texts)
            (base, _, _, _), (tps, drafted, accepted, rounds) = (a, b) if first is plain else (b, a)
            ratios[s].append(tps / base)
            counts[s] = (drafted, accepted, rounds)
    print(f"{'threshold':>9} {'draft_max':>9} {'acceptance':>10} {'tokens/round':>12} {'speedup':>8}")
    for s in SETTINGS:
        drafted, accepted, rounds = counts[s]
        print(f"{s[0]:>9} {s[1]:>9} {accepted / max(drafted, 1):>10.1%} {(accepted + rounds) / rounds:>12.2f} "
              f"{statistics.median(ratios[s]):>7.2f}x")


if __name__ == "__main__":
    main()
