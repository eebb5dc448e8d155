"""`edgelm run [MODEL] -p PROMPT`: one-shot generation, streamed to stdout, with a stats line."""
from __future__ import annotations

import argparse
import json
import resource
import sys
from typing import TextIO

from edgelm.runtime.generate import Timings


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def stats_line(t: Timings) -> str:
    return (
        f"prompt {t.prompt_tokens} tok, {t.prompt_tps:.1f} tok/s | "
        f"generation {t.completion_tokens} tok, {t.gen_tps:.1f} tok/s | "
        f"ttft {t.ttft_s * 1000:.1f} ms | peak RSS {peak_rss_mb():.0f} MB"
    )


def run(model: str | None, prompt: str, *, out: TextIO = sys.stdout, load_options: dict | None = None,
        **sampling) -> dict:
    """Generate from `prompt`, streaming text to `out`; returns the --json record."""
    import edgelm
    from edgelm.runtime.sampling import SamplingParams

    SamplingParams.from_kwargs(**sampling)  # bad values fail before the model loads
    parts, last = [], None
    with edgelm.load(model, **(load_options or {})) as m:
        for last in m.stream(prompt, **sampling):
            parts.append(last.text)
            if out is not None and last.text:
                out.write(last.text)
                out.flush()
    timings, reason = last.timings, last.finish_reason
    return {
        "text": "".join(parts),
        "prompt_tokens": timings.prompt_tokens,
        "completion_tokens": timings.completion_tokens,
        "prompt_tps": round(timings.prompt_tps, 2),
        "gen_tps": round(timings.gen_tps, 2),
        "ttft_ms": round(timings.ttft_s * 1000, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "finish_reason": reason,
        "_timings": timings,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgelm run", description=__doc__)
    p.add_argument("model", nargs="?", help="GGUF file (default: the bundled model)")
    p.add_argument("-p", "--prompt", help="prompt text (default: read from stdin)")
    p.add_argument("-n", "--max-tokens", type=int, default=128)
    p.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ctx", type=int, default=2048, help="context size in tokens")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-text (benchmarks)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's log")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        from edgelm.runtime.backend import set_verbose

        set_verbose(True)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    record = run(
        args.model, prompt,
        out=None if args.json else sys.stdout,
        load_options={"n_ctx": args.ctx, "n_threads": args.threads},
        max_tokens=args.max_tokens, temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos,
    )
    timings = record.pop("_timings")
    if args.json:
        print(json.dumps(record, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        print(stats_line(timings), file=sys.stderr)
    return 0
