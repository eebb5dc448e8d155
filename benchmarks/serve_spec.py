"""Speculative decoding in the server: `edgelm serve --lookup` and `--draft` against llama-server's n-gram and
draft-model speculation, on prompts whose continuations repeat text from the prompt (editing and quoting code).

    .venv/bin/python benchmarks/serve_spec.py                  # small model and 0.5B shape, N = 1 and 4
    .venv/bin/python benchmarks/serve_spec.py --models small --rounds 1

Prompts: Python standard-library functions, each followed by its first line again, so that a greedy continuation
copies much of the function (what prompt lookup is for). For each model, server, drafter and N, a fresh server
takes a warm-up request, then rounds that stream all 8 prompts, N at a time (greedy, 128 tokens each, every
end-of-generation token and every token without text biased by -100). Generation t/s = tokens after each first token / time from a group's
first token to its last response, summed over the groups (the prompts are long, so prefill is left out); medians of rounds;
speedup against the same server without drafts in the same run. Draft acceptance comes from each server's own
counters (edgelm's /metrics, llama-server's per-response timings). "identical" counts completions whose text
equals edgelm's plain decoding of the same prompt at the same N (llama.cpp's kernels round a row of a verify batch
differently from a lone row, so near ties can go the other way; see runtime/speculative.py).
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, DOCS, log, machine, markdown_table, median, today, write_doc  # noqa: E402
from serve_bench import biases, complete, completion_events, in_threads, model_paths, serving  # noqa: E402

N_GEN = 128
CTX = 1536  # per sequence: the longest prompt is about 710 tokens
OUT = BENCH / "serve-spec"


def prompts() -> list[str]:
    import argparse as a
    import json as j
    import shlex
    import string
    import textwrap

    out = []
    for fn in (textwrap.dedent, shlex.split, j.dumps, a.ArgumentParser.add_argument_group, string.capwords,
               textwrap.wrap, shlex.quote, j.loads):
        src = inspect.getsource(fn)
        out.append(src + "\n\n" + src.splitlines()[0] + "\n")
    return out


def tiny_draft() -> Path:
    """The tiny reference model (the small model's tokenizer) at Q8_0, converted once."""
    from edgelm.converters import convert

    path = OUT / "tiny-q8_0.gguf"
    if not path.is_file():
        OUT.mkdir(parents=True, exist_ok=True)
        convert(Path(__file__).resolve().parents[1] / "models" / "tiny", path, outtype="q8_0")
    return path


def configs(model_key: str) -> list[tuple[str, str, tuple]]:
    """(server, drafter, extra arguments); drafts from a model only where one shares the vocabulary."""
    rows = [("edgelm", "none", ()), ("edgelm", "lookup", ("--lookup",)),
            ("llama-server", "none", ()), ("llama-server", "ngram-simple", ("--spec-type", "ngram-simple"))]
    if model_key == "small":
        draft = tiny_draft()
        rows += [("edgelm", "draft model", ("--draft", draft)), ("llama-server", "draft model", ("-md", draft))]
    return rows


def streamed(base: str, prompt: str, bias: dict, barrier) -> tuple[float, float, str, int, dict]:
    """(time of the first token, time of the last, text, completion tokens, timings if the server sends them)."""
    text, first, usage, timings = [], None, None, {}
    with httpx.Client(timeout=900) as client:
        barrier.wait()
        for event in completion_events(client, base, prompt, bias, N_GEN):
            if event.get("choices") and event["choices"][0].get("text"):
                first = first or time.perf_counter()
                text.append(event["choices"][0]["text"])
            usage = event.get("usage") or usage
            timings = event.get("timings") or timings
    return first, time.perf_counter(), "".join(text), usage["completion_tokens"], timings


def measure(model_key: str, model: Path, server: str, drafter: str, extra: tuple, n: int, rounds: int,
            texts: list[str], bias: dict) -> dict:
    """Each round streams every prompt, n at a time; generation t/s = tokens after the first / time from the first
    token of a group to its last response (prefill is left out: the prompts are long, the outputs short)."""
    tps, accepted, drafted, outputs = [], 0, 0, []
    ctx = ("--ctx", CTX) if server == "edgelm" else ("-c", CTX * n)  # overrides serve_bench's 512 per sequence
    with serving(server, model, n, f"spec-{drafter.replace(' ', '-')}", (*ctx, *extra)) as (base, _):
        with httpx.Client(timeout=900) as client:
            complete(client, base, "Warm-up:", bias, 16)
            before = metrics(client, base) if server == "edgelm" else None
        for _ in range(rounds):
            tokens = seconds = 0.0
            for g in range(0, len(texts), n):
                group = texts[g:g + n]
                barrier = threading.Barrier(len(group), timeout=60)
                done = in_threads(lambda prompt: streamed(base, prompt, bias, barrier), group)
                if [d[3] for d in done] != [N_GEN] * len(group):
                    raise RuntimeError(f"{server} {drafter}: not {N_GEN} tokens each")
                tokens += sum(d[3] - 1 for d in done)
                seconds += max(d[1] for d in done) - min(d[0] for d in done)
                outputs += [(prompt, d[2]) for prompt, d in zip(group, done)]
                drafted += sum(d[4].get("draft_n", 0) for d in done)  # llama-server's own count, per response
                accepted += sum(d[4].get("draft_n_accepted", 0) for d in done)
            tps.append(tokens / seconds)
        if server == "edgelm":
            with httpx.Client(timeout=60) as client:
                after = metrics(client, base)
            drafted = after["edgelm_draft_tokens_total"] - before["edgelm_draft_tokens_total"]
            accepted = after["edgelm_draft_tokens_accepted_total"] - before["edgelm_draft_tokens_accepted_total"]
    return {"model": model_key, "server": server, "drafter": drafter, "n": n, "tps": tps, "drafted": int(drafted),
            "accepted": int(accepted), "outputs": outputs}


def metrics(client: httpx.Client, base: str) -> dict[str, float]:
    out = {}
    for line in client.get(base + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["small", "q05"], choices=["small", "q05"])
    p.add_argument("--streams", nargs="+", type=int, default=[1, 4])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=DOCS / "serve-speculative.md")
    args = p.parse_args(argv)
    texts = prompts()
    results = []
    for key, model in model_paths(args.models).items():
        bias = biases(model)[1]  # every token without text banned too: each token shows, so its time does
        for n in args.streams:
            for server, drafter, extra in configs(key):
                log(f"{key} N={n} {server} {drafter}")
                results.append(measure(key, model, server, drafter, extra, n, args.rounds, texts, bias))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    write_report(results, args)
    return 0


def write_report(results: list[dict], args) -> None:
    names = {"small": "small Q8_0", "q05": "0.5B-shape Q4_K_M (random weights)"}
    plain = {(r["model"], r["server"], r["n"]): r for r in results if r["drafter"] == "none"}
    reference = {(r["model"], r["n"], p): text for r in results if r["drafter"] == "none" and r["server"] == "edgelm"
                 for p, text in r["outputs"]}
    rows = []
    for r in results:
        base = plain[(r["model"], r["server"], r["n"])]
        same = sum(text == reference[(r["model"], r["n"], p)] for p, text in r["outputs"])
        acceptance = f"{r['accepted'] / r['drafted']:.0%} of {r['drafted']:,}" if r["drafted"] else "-"
        rows.append([names[r["model"]], r["n"], r["server"], r["drafter"], f"{median(r['tps']):.1f}",
                     f"{median(r['tps']) / median(base['tps']):.2f}x", acceptance,
                     f"{same}/{len(r['outputs'])}"])
    text = (f"# Speculative decoding in the server\n\nGenerated by `benchmarks/serve_spec.py --rounds {args.rounds}` on "
            f"{today()}, {machine()}.\n\n" + __doc__.split("\n\n", 2)[2].strip() + "\n\n"
            + markdown_table(["model", "streams N", "server", "drafter", "generation t/s", "vs no drafts",
                              "drafts kept", "identical to edgelm plain"], rows, "lrllrrrr") + "\n")
    write_doc(args.out, text)


if __name__ == "__main__":
    sys.exit(main())
