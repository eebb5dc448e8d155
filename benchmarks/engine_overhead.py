"""What the continuous-batching engine adds to llama.cpp's batched decoding, measured inside one process.

    .venv/bin/python benchmarks/engine_overhead.py [MODEL.gguf] [--streams 16] [--rounds 6] [--tokens 128]

Alternates the engine (N greedy requests submitted at once, decoded in the calling thread) with a bare loop
of the same shape: one batch holding every prompt, then one `llama_decode` per step with one token per
sequence, nothing sampled or read back. Prints the median paired ratio of aggregate tokens/s, then times one
engine run and one bare run with `llama_decode` wrapped, to split the engine's time between llama.cpp and
its own work per step (scheduling, sampling, text, streaming to the request objects).
Default model: the bundled small model.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, decode_seconds  # noqa: E402

PROMPTS = ("Once upon a time", "The weather today", "def parse(line):", "In the beginning", "The recipe calls for",
           "She opened the door and", "import numpy as np", "The meeting started")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import llama_cpp as lib

    import edgelm
    from edgelm.engine import Engine, EngineOptions
    from edgelm.runtime.sampling import SamplingParams

    n, streams = args.tokens, args.streams
    m = edgelm.load(args.model, n_ctx=512, n_threads=args.threads, prefix_cache_bytes=0)
    prompts = [m.tokenize(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS))) for i in range(streams)]
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    eng = Engine(m.llama, EngineOptions(n_parallel=streams, n_ctx=512, n_batch=512, n_threads=args.threads),
                 threaded=False)
    ctx, b = eng.ctx, eng.ctx._batch

    def engine() -> float:
        for s in eng._slots:
            ctx.remove(s.seq)
            s.held, s.exact = [], 0
        t0 = time.perf_counter()
        reqs = eng.submit_many([(tokens, params) for tokens in prompts])
        eng.run_until_idle()
        return sum(r.result().timings.completion_tokens for r in reqs) / (time.perf_counter() - t0)

    def bare() -> float:
        for s in range(streams):
            ctx.remove(s)
        t0 = time.perf_counter()
        k = 0
        for s, tokens in enumerate(prompts):
            for i, t in enumerate(tokens):
                b.token[k], b.pos[k], b.n_seq_id[k], b.seq_id[k][0] = t, i, 1, s
                b.logits[k] = i == len(tokens) - 1
                k += 1
        b.n_tokens = k
        lib.llama_decode(ctx.ptr, b)
        pos = [len(tokens) for tokens in prompts]
        for _ in range(n - 1):
            for s in range(streams):
                b.token[s], b.pos[s], b.n_seq_id[s], b.seq_id[s][0], b.logits[s] = 1, pos[s], 1, s, True
                pos[s] += 1
            b.n_tokens = streams
            lib.llama_decode(ctx.ptr, b)
        lib.llama_synchronize(ctx.ptr)
        return streams * n / (time.perf_counter() - t0)

    pairs = alternate(engine, bare, args.rounds)  # (engine, bare)
    print(f"{Path(m.llama.path).name}, {args.threads} threads, {streams} streams x {n} tokens, {args.rounds} rounds")
    print(f"  engine t/s: {[round(e) for e, _ in pairs]}")
    print(f"  bare   t/s: {[round(x) for _, x in pairs]}")
    print(f"  median paired ratio engine / bare: {statistics.median(e / x for e, x in pairs):.3f}")

    for run in (engine, bare):
        with decode_seconds() as spent:  # every llama_decode call, the engine's and the bare loop's
            t0 = time.perf_counter()
            run()
            total = time.perf_counter() - t0
        print(f"  {run.__name__}: {total * 1000:.1f} ms, {spent[0] * 1000:.1f} ms in llama_decode, "
              f"{(total - spent[0]) / (streams * n) * 1e6:.1f} µs per generated token outside it")
    eng.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
