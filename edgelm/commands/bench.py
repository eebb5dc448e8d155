"""`edgelm bench [MODEL]`: prompt (pp) and generation (tg) tokens/s, measured as llama-bench does.

pp: one batch of N random tokens into an empty cache; tg: N single-token decodes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def bench(model: str | None = None, *, n_prompt: int = 512, n_gen: int = 128, repetitions: int = 3,
          n_threads: int | None = None, seed: int = 0, lora=None) -> dict:
    from edgelm.runtime.context import Context, ContextOptions
    from edgelm.runtime.model import LlamaModel

    llama = LlamaModel(model, lora=lora)
    ctx = Context(llama, ContextOptions(n_ctx=n_prompt + n_gen + 16, n_batch=max(n_prompt, 1), n_threads=n_threads))
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, llama.n_vocab, n_prompt + n_gen).tolist()

    def pp() -> float:
        ctx.clear()
        t0 = time.perf_counter()
        ctx.decode(tokens[:n_prompt], 0)
        return n_prompt / (time.perf_counter() - t0)

    def tg() -> float:
        ctx.clear()
        ctx.decode_one(tokens[0], 0)  # as llama-bench: tg starts from an empty cache after one token
        t0 = time.perf_counter()
        for i in range(n_gen):
            ctx.decode_one(tokens[i + 1], i + 1)
            ctx.logits()
        return n_gen / (time.perf_counter() - t0)

    pp(), tg()  # warm-up
    pp_runs = [pp() for _ in range(repetitions)] if n_prompt else []
    tg_runs = [tg() for _ in range(repetitions)] if n_gen else []
    result = {
        "model": str(llama.path),
        "n_params": llama.n_params,
        "threads": ctx.options.n_threads or "all",
        f"pp{n_prompt}": round(statistics.mean(pp_runs), 2) if pp_runs else None,
        f"tg{n_gen}": round(statistics.mean(tg_runs), 2) if tg_runs else None,
        "pp_std": round(statistics.pstdev(pp_runs), 2) if pp_runs else None,
        "tg_std": round(statistics.pstdev(tg_runs), 2) if tg_runs else None,
    }
    ctx.close()
    llama.close()
    return result


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="edgelm bench", description=__doc__)
    p.add_argument("model", nargs="?", help="GGUF file (default: the bundled model)")
    p.add_argument("-p", "--n-prompt", type=int, default=512)
    p.add_argument("-n", "--n-gen", type=int, default=128)
    p.add_argument("-r", "--repetitions", type=int, default=3)
    p.add_argument("-t", "--threads", type=int)
    p.add_argument("--json", action="store_true")
    from .run import add_lora_arguments, lora_from_args

    add_lora_arguments(p)
    args = p.parse_args(argv)
    if args.n_prompt < 1 or args.n_gen < 1 or args.repetitions < 1:
        p.error("-p, -n and -r must be positive")
    r = bench(args.model, n_prompt=args.n_prompt, n_gen=args.n_gen, repetitions=args.repetitions,
              n_threads=args.threads, lora=lora_from_args(args))
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['model']}  threads={r['threads']}")
        print(f"pp{args.n_prompt}: {r[f'pp{args.n_prompt}']:.1f} ± {r['pp_std']:.1f} tok/s")
        print(f"tg{args.n_gen}: {r[f'tg{args.n_gen}']:.1f} ± {r['tg_std']:.1f} tok/s")
    return 0
