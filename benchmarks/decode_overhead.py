"""What edgelm's generation loop adds to llama.cpp's decoding, measured inside one process.

    .venv/bin/python benchmarks/decode_overhead.py [MODEL.gguf] [--rounds 8] [--tokens 64]

Alternates Model.generate (greedy, ignore_eos) with a bare llama_decode loop written the way llama-bench's
tg test is (one token per call, nothing read back), so that a shared machine's noise falls on both alike,
and prints the median paired ratio; then profiles one generation to split the time between llama_decode
and the rest, and times the loop with llama_decode a no-op (Python alone). Default model: the 0.5B-shape
Q4_K_M built by runtime_bench.py.
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, alternate, decode_seconds  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=str(BENCH / "q05-q4_k_m.gguf"))
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import llama_cpp as lib
    import numpy as np

    import edgelm

    n = args.tokens
    with edgelm.load(args.model, n_ctx=n + 64, n_threads=args.threads, prefix_cache_bytes=0) as m:
        token = (lib.llama_token * 1)(m.llama.bos if m.llama.bos >= 0 else 1)

        def bare() -> float:
            m.reset()
            t0 = time.perf_counter()
            for _ in range(n):
                lib.llama_decode(m.ctx.ptr, lib.llama_batch_get_one(token, 1))
            lib.llama_synchronize(m.ctx.ptr)
            return n / (time.perf_counter() - t0)

        def edgelm_tg() -> float:
            m.reset()
            return m.generate([token[0]], max_tokens=n + 1, temperature=0, ignore_eos=True).timings.gen_tps

        row_type = ctypes.c_float * m.llama.n_vocab

        def bare_reading_logits() -> float:
            """The bare loop plus what any sampler must do and llama-bench never does: read the logits (in place,
            as edgelm's greedy path does) and take their argmax."""
            m.reset()
            t0 = time.perf_counter()
            for _ in range(n):
                lib.llama_decode(m.ctx.ptr, lib.llama_batch_get_one(token, 1))
                logits = lib.llama_get_logits_ith(m.ctx.ptr, -1)
                int(np.frombuffer(row_type.from_address(ctypes.addressof(logits.contents)), np.float32).argmax())
            return n / (time.perf_counter() - t0)

        pairs = alternate(edgelm_tg, bare, args.rounds)  # (edgelm, bare)
        ratio = statistics.median(e / b for e, b in pairs)
        print(f"{Path(args.model).name}, {args.threads} threads, {n} tokens, {args.rounds} alternating rounds")
        print(f"  edgelm t/s: {[round(e, 1) for e, _ in pairs]}")
        print(f"  bare   t/s: {[round(b, 1) for _, b in pairs]}")
        print(f"  median paired ratio edgelm / bare: {ratio:.3f}")
        reading = alternate(bare_reading_logits, bare, args.rounds)
        print(f"  median paired ratio bare loop reading the logits (argmax) / bare: "
              f"{statistics.median(r / b for r, b in reading):.3f}")

        with decode_seconds() as spent:
            m.reset()
            t0 = time.perf_counter()
            out = m.generate([token[0]], max_tokens=n + 1, temperature=0, ignore_eos=True)
            total = time.perf_counter() - t0
        k = out.timings.completion_tokens
        print(f"  one generation of {k} tokens: {total * 1000:.1f} ms, {spent[0] * 1000:.1f} ms in llama_decode, "
              f"{(total - spent[0]) / k * 1000:.3f} ms per token elsewhere (Python, sampling, text)")

        # the generation loop with llama_decode a no-op (the logits stay those of the last real step): the
        # Python side alone, without the ctypes call and what llama.cpp does around the graph
        per_token = []
        with decode_seconds(lambda ctx, batch: 0):
            for _ in range(5):
                m.reset()
                t0 = time.perf_counter()
                out = m.generate([token[0]], max_tokens=2000, temperature=0, ignore_eos=True)
                per_token.append((time.perf_counter() - t0) / out.timings.completion_tokens)
        print(f"  the loop with llama_decode a no-op: {statistics.median(per_token) * 1e6:.1f} µs per token "
              f"(median of 5 generations of 2,000 tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
