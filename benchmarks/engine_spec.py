"""Speculative decoding in the batching engine, measured inside one process: plain decoding, prompt lookup and a
draft model on the same loaded model, round by round, so that a shared machine's drift falls on all of them alike.

    .venv/bin/python benchmarks/engine_spec.py [--streams 1 4] [--rounds 5]

`benchmarks/serve_spec.py` compares fresh servers, whose speed moves by ±15% or more between two starts here;
this script keeps one process and one copy of the weights, with one engine per configuration (each its own
context), and rotates their order every round. Prompts: serve_spec.py's eight self-copying standard-library
functions, N at a time, greedy, 128 tokens each. Generation t/s of a group = its tokens after each first token /
(its last token's time - its first first token's), summed over the groups; each configuration's figure is the
median over rounds of its ratio to plain decoding in the same round.

Configurations: plain; lookup with the cost model as it runs (start-up timing, then fitted to the engine's own
steps); lookup with the start-up timing alone (the engine's step timings ignored, as before the fit existed);
lookup drafting up to draft_max (no cost model); the tiny reference model as draft model, with and without the
cost model.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DOCS, log, machine, markdown_table, today, write_doc  # noqa: E402
from serve_spec import N_GEN, prompts, tiny_draft  # noqa: E402

CTX = 1536  # per stream


def configurations(model, draft):
    from edgelm.engine import Engine, EngineOptions

    def engine(n: int, draft_model=None, **options) -> Engine:
        return Engine(model, EngineOptions(n_parallel=n, n_ctx=CTX, n_threads=2, **options), threaded=False,
                      draft_model=draft_model)

    def start_up_only(n: int) -> Engine:
        e = engine(n, lookup=True)
        e.speculation.observe = lambda rows, seconds: None  # the fit never moves from the start-up timing
        return e

    return {"plain": lambda n: engine(n),
            "lookup": lambda n: engine(n, lookup=True),
            "lookup, start-up costs only": start_up_only,
            "lookup, no cost model": lambda n: engine(n, lookup=True, draft_cost_model=False),
            "draft model": lambda n: engine(n, draft_model=draft),
            "draft model, no cost model": lambda n: engine(n, draft_model=draft, draft_cost_model=False)}


def generation_tps(engine, tokens: list[list[int]], n: int) -> tuple[float, int, int]:
    """(generation t/s over the prompts, N at a time; drafts made; drafts kept) of one round."""
    from edgelm.runtime.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=N_GEN, ignore_eos=True)
    before = engine.stats["drafted"], engine.stats["draft_accepted"]
    generated = seconds = 0.0
    for g in range(0, len(tokens), n):
        reqs = engine.submit_many([(t, params) for t in tokens[g:g + n]])
        engine.run_until_idle()
        timings = [r.result().timings for r in reqs]
        generated += sum(t.completion_tokens - 1 for t in timings)
        seconds += max(t.ttft_s + t.gen_s for t in timings) - min(t.ttft_s for t in timings)
    return generated / seconds, engine.stats["drafted"] - before[0], engine.stats["draft_accepted"] - before[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", nargs="+", type=int, default=[1, 4])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=DOCS / "engine-speculative.md")
    args = p.parse_args(argv)
    from edgelm.runtime.model import LlamaModel, LoadOptions, default_model_path

    rows = []
    with LlamaModel(default_model_path(), LoadOptions()) as model, \
            LlamaModel(tiny_draft(), LoadOptions()) as draft:
        tokens = [model.tokenize(text) for text in prompts()]
        for n in args.streams:
            made = {name: make(n) for name, make in configurations(model, draft).items()}
            names = list(made)
            for e in made.values():  # warm-up: one group each
                generation_tps(e, tokens[:n], n)
            ratios = {name: [] for name in names}
            tps = {name: [] for name in names}
            drafts = {name: [0, 0] for name in names}
            for r in range(args.rounds):
                order = names[r % len(names):] + names[:r % len(names)]
                got = {}
                for name in order:
                    got[name], d, k = generation_tps(made[name], tokens, n)
                    drafts[name][0] += d
                    drafts[name][1] += k
                for name in names:
                    ratios[name].append(got[name] / got["plain"])
                    tps[name].append(got[name])
                log(f"N={n} round {r + 1}: " + ", ".join(f"{k} {v:.0f}" for k, v in got.items()))
            for name in names:
                made_, kept = drafts[name]
                rows.append([n, name, f"{statistics.median(tps[name]):.1f}",
                             f"{statistics.median(ratios[name]):.3f}x",
                             f"{min(ratios[name]):.2f}-{max(ratios[name]):.2f}",
                             f"{kept / made_:.0%} of {made_:,}" if made_ else "-"])
            for e in made.values():
                e.close()
    text = (f"# Speculative decoding in the batching engine, in one process\n\nGenerated by "
            f"`benchmarks/engine_spec.py --rounds {args.rounds}` on {today()}, {machine()}; the bundled small model "
            f"(Q8_0), 2 threads.\n\n" + __doc__.split("\n\n", 2)[2].strip() + "\n\n"
            + markdown_table(["streams N", "configuration", "generation t/s", "vs plain (median)",
                              "vs plain (range)", "drafts kept"], rows, "rlrrrr") + "\n")
    write_doc(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
