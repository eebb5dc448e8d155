"""Prompts that arrive together behind one prefix: the engine prefilling it once (share_prefill) or once per request.

    .venv/bin/python benchmarks/shared_prefill.py [MODEL.gguf] [--requests 4] [--prefix-chars 2400] [--rounds 5]

N greedy requests whose prompts share a long prefix (a system prompt, a document, or the `n` choices of one
request) are submitted at once to the continuous-batching engine, decoded in the calling thread. Without sharing,
each slot evaluates the whole prompt, as llama-server's slots do; with it, one slot evaluates the prefix and the
others wait a step and copy its KV. The two alternate, each round in a fresh engine; the report gives the median
time to the last request's first token and to the end of all of them, the tokens llama_decode evaluated, and
whether each waiting request's output equals that prompt generated alone. Writes docs/shared-prefill.md.
Default model: the bundled small model.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, alternate, machine, markdown_table, median, today, write_doc  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--requests", type=int, default=4, help="at least 2")
    p.add_argument("--prefix-chars", type=int, default=2400)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-doc", action="store_true", help="print only")
    args = p.parse_args(argv)
    import edgelm
    from edgelm import corpus
    from edgelm.cache.prefix import common_prefix
    from edgelm.engine import Engine, EngineOptions
    from edgelm.runtime.sampling import SamplingParams

    m = edgelm.load(args.model, n_ctx=2048, n_threads=args.threads, prefix_cache_bytes=0)
    prefix = corpus.text("heldout", max_chars=args.prefix_chars)
    prompts = [m.tokenize(f"{prefix}\nQuestion {i}: what happens next?") for i in range(args.requests)]
    params = SamplingParams(temperature=0, max_tokens=args.tokens)
    runs: dict[bool, list[dict]] = {True: [], False: []}

    def run(share: bool):
        def once() -> float:
            options = EngineOptions(n_parallel=len(prompts), n_ctx=2048, n_threads=args.threads, share_prefill=share)
            with Engine(m.llama, options, threaded=False) as engine:
                t0 = time.perf_counter()
                reqs = engine.submit_many([(t, params) for t in prompts])
                engine.run_until_idle()
                total = time.perf_counter() - t0
                outs = [r.result() for r in reqs]
                runs[share].append({"total": total, "ttft": max(o.timings.ttft_s for o in outs),
                                    "tokens": engine.stats["batch_tokens"], "hits": engine.stats["shared_prefix_hits"],
                                    "texts": [o.tokens for o in outs]})
            return total
        return once

    alternate(run(True), run(False), args.rounds)
    alone = [m.generate(t, max_tokens=args.tokens, temperature=0).tokens for t in prompts]
    rows = []
    for share in (False, True):
        rs = runs[share][1:]  # the first of each is alternate()'s warm-up
        same = sum(a == b for a, b in zip(rs[-1]["texts"], alone))
        rows.append(["once per request" if not share else "shared (waits, copies KV)",
                     f"{median([r['ttft'] for r in rs]) * 1e3:.0f}", f"{median([r['total'] for r in rs]) * 1e3:.0f}",
                     rs[-1]["tokens"], rs[-1]["hits"], f"{same}/{len(prompts)}"])
    ratio = median([a["total"] for a in runs[False][1:]]) / median([a["total"] for a in runs[True][1:]])
    ttft = median([a["ttft"] for a in runs[False][1:]]) / median([a["ttft"] for a in runs[True][1:]])
    table = markdown_table(["prefill", "last first token ms", "all done ms", "tokens evaluated", "KV copies",
                            "outputs as alone"], rows)
    text = (f"# Shared prefill: prompts arriving together behind one prefix\n\n"
            f"Measured {today()} by `benchmarks/shared_prefill.py --requests {args.requests} --prefix-chars "
            f"{args.prefix_chars} --tokens {args.tokens} --rounds {args.rounds}` on {machine()}.\n\n"
            f"{Path(m.path).name}, {args.threads} threads; {len(prompts)} greedy requests of {len(prompts[0])} "
            f"prompt tokens, the first {common_prefix(prompts[0], prompts[1])} shared, {args.tokens} generated each, "
            f"submitted at once; "
            f"medians of {args.rounds} alternating rounds, each in a fresh engine.\n\n{table}\n\n"
            f"Sharing: **{ratio:.2f}x** faster to finish all requests, **{ttft:.2f}x** to the last first token. "
            f"\"outputs as alone\" counts the requests whose tokens equal the prompt generated alone; a request "
            f"decoding beside another's prompt chunk goes through llama.cpp's batched kernels, which may round "
            f"differently (docs/ARCHITECTURE.md).\n")
    print(text)
    if not args.no_doc:
        write_doc(ROOT / "docs" / "shared-prefill.md", text)
    m.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
