"""What an early-exit round costs on this machine: the full model's one-token decode, the draft D's step,
the tail T's verify batch of n positions, and D and T alternating as the decode loop runs them.

    .venv/bin/python benchmarks/split_costs.py [--model GGUF] [--k 4] [--threads 2] [--rounds 3]

The model defaults to the bundled one (its split at k is written to a temporary folder). Medians over rounds,
milliseconds per call, at a context position past a 200-token prompt.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edgelm.converters.early_exit import split_model  # noqa: E402
from edgelm.native import Capture  # noqa: E402
from edgelm.runtime.context import Context, ContextOptions  # noqa: E402
from edgelm.runtime.model import LlamaModel, default_model_path  # noqa: E402

PROMPT = 200


def per_call(fn, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(default_model_path()))
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model.gguf"
        model.symlink_to(Path(args.model).resolve())
        paths = split_model(model, args.k)
        full, d, t = LlamaModel(model), LlamaModel(paths.draft, parts=[paths.shared]), \
            LlamaModel(paths.tail, parts=[paths.shared])
        options = ContextOptions(n_ctx=PROMPT + args.steps + 16, n_batch=128, n_threads=args.threads)
        cap = Capture(f"l_out-{args.k - 1}", d.n_embd, 128)
        cf = Context(full, options)
        cd = Context(d, options, eval_callback=cap.callback, eval_user_data=cap.user_data)
        ct = Context(t, options, embd_input=True)
        prompt = [1 + i % 200 for i in range(PROMPT)]
        cf.decode(prompt, 0)
        for lo in range(0, PROMPT, 128):
            chunk = prompt[lo:lo + 128]
            cd.decode(chunk, lo, logits_from=0)
            ct.decode_embd(cap.take(len(chunk)), lo)
        rows = np.repeat(cap.take(1), 9, axis=0)
        results: dict[str, list[float]] = {}

        def record(name, fn, n, reset):
            results.setdefault(name, []).append(per_call(fn, n))
            for ctx in reset:
                ctx.remove(0, PROMPT)

        for _ in range(args.rounds):
            record("full model, 1 token", lambda i: cf.decode_one(5, PROMPT + i), args.steps, [cf])
            record("D step", lambda i: cd.decode_one(5, PROMPT + i), args.steps, [cd])
            for n in (1, 2, 3, 5, 9):
                def verify(i, n=n):
                    ct.decode_embd(rows[:n], PROMPT, logits_from=0)
                    ct.remove(0, PROMPT)
                record(f"T verify, {n} positions", verify, max(20, args.steps // 4), [])
            record("T verify 1, positions advancing", lambda i: ct.decode_embd(rows[:1], PROMPT + i), args.steps, [ct])
            record("D step + T verify 1, alternating",
                   lambda i: (cd.decode_one(5, PROMPT + i), ct.decode_embd(cap.take(1), PROMPT + i)),
                   args.steps, [cd, ct])
    print(f"{Path(args.model).name}, k={args.k}, {args.threads} threads, context position {PROMPT}: "
          f"ms per call, median of {args.rounds} rounds")
    for name, values in results.items():
        print(f"  {name:<34} {statistics.median(values):.3f}")


if __name__ == "__main__":
    main()
