"""Aggregate generation speed of `edgelm serve` under 1 to 16 concurrent streams, against llama.cpp's
llama-server and llama-cpp-python's server; and whether greedy output depends on the rest of the batch.

    .venv/bin/python benchmarks/serve_bench.py                 # both models, every server, N = 1..16
    .venv/bin/python benchmarks/serve_bench.py --quick         # the small model, N in 1, 4, 8, one round
    .venv/bin/python benchmarks/serve_bench.py --models q05 --streams 16 --part throughput   # one piece
    .venv/bin/python benchmarks/serve_bench.py --render-only   # the report from the pieces in .bench/serve/

Throughput: for each model and each N, every server is started fresh for N streams (edgelm --parallel N,
llama-server -np N, llama-cpp-python as it is: one request at a time), with the same threads and per-sequence
context, and takes one warm-up request. A round sends N distinct short prompts at once to /v1/completions
(greedy, 128 tokens, every end-of-generation token biased by -100 so each request runs to its 128 tokens);
aggregate t/s = completion tokens / wall time from the first request sent to the last response. Medians over
rounds. Each measurement is saved as JSON under .bench/serve/, so a long run can be made in pieces (--models,
--servers, --streams, --part) and rendered at the end.

Greedy consistency: 8 prompts through `edgelm serve` one at a time on --parallel 1 (the reference), one at a
time on --parallel 8, and all 8 at once on --parallel 8 (64 tokens, every token without text banned so that
each generated token shows); the texts are compared with the reference.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BENCH, DOCS, ROOT, log, machine, markdown_table, median, python, today, tool,  # noqa: E402
                    write_doc)

THREADS = 2
CTX = 512  # per sequence, on every server
N_GEN = 128
N_GREEDY = 64
STREAMS = (1, 2, 4, 8, 16)
MODELS = {"small": "small Q8_0", "q05": "0.5B-shape Q4_K_M"}
OPENINGS = ("Once upon a time", "The weather today", "def parse(line):", "In the beginning",
            "The recipe calls for", "She opened the door and", "import numpy as np", "The meeting started",
            "Dear customer,", "The river ran", "class Node:", "At the end of the war", "The first step is",
            "for i in range(10):", "He looked at the map", "The experiment showed")
PIECES = BENCH / "serve"


@dataclass(frozen=True)
class ServerKind:
    argv: Callable[[Path, int, int], list]  # (model, port, streams) -> command line
    health: str  # GET path that answers 200 once the model is loaded


SERVERS = {
    "edgelm": ServerKind(lambda model, port, n: [
        python(), "-m", "edgelm", "serve", model, "--port", port, "--parallel", n, "--ctx", CTX,
        "--threads", THREADS], "/health"),
    # -np N splits -c over N slots (no unified KV when -np is given): CTX each
    "llama-server": ServerKind(lambda model, port, n: [
        tool("llama-server"), "-m", model, "--host", "127.0.0.1", "--port", port, "-np", n, "-c", CTX * n,
        "-t", THREADS, "-tb", THREADS], "/health"),
    # one request at a time, whatever N is
    "llama-cpp-python": ServerKind(lambda model, port, n: [
        python(), "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1", "--port", port,
        "--n_ctx", CTX, "--n_threads", THREADS, "--n_threads_batch", THREADS], "/v1/models"),
}


def model_paths(keys: list[str]) -> dict[str, Path]:
    from edgelm.runtime.model import default_model_path

    paths = {"small": default_model_path()}
    if "q05" in keys:
        from runtime_bench import models as runtime_models  # builds the 0.5B-shape files once into .bench/

        paths["q05"] = runtime_models(quick=False)["0.5B-shape Q4_K_M"]
    return {k: paths[k] for k in keys}


def biases(path: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Two logit_bias maps: against every end-of-generation token (not only EOS), and against every token
    without text (those, control tokens, and the 0.5B shape's 143,744 padding ids), so that every generated
    token shows in the text."""
    from edgelm.runtime.model import LlamaModel, LoadOptions

    with LlamaModel(path, LoadOptions(vocab_only=True)) as vocab:
        no_eog = {str(t): -100 for t in range(vocab.n_vocab) if vocab.is_eog(t)}
        visible = {str(t): -100 for t in range(vocab.n_vocab) if vocab.is_eog(t) or not vocab.token_bytes(t)}
    return no_eog, visible


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_path(name: str, model: Path, streams: int, purpose: str) -> Path:
    return PIECES / "logs" / f"{purpose}-{name}-{model.stem}-n{streams}.log"


@contextlib.contextmanager
def serving(name: str, model: Path, streams: int, purpose: str, extra: tuple = ()):
    """A fresh server process (with `extra` arguments); yields its base URL and process. Its output goes to
    log_path(...)."""
    kind, port = SERVERS[name], free_port()
    with launched(name, [*kind.argv(model, port, streams), *extra], port, kind.health,
                  log_path(name, model, streams, purpose)) as running:
        yield running


@contextlib.contextmanager
def launched(name: str, argv: list, port: int, health: str, log_file: Path, timeout_s: float = 300):
    """Run `argv` (a server listening on `port`) until `health` answers 200; yields its base URL and process,
    and stops it at the end. Its output goes to `log_file`."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as out:
        proc = subprocess.Popen([str(a) for a in argv], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + timeout_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}: see {out.name}")
                if time.time() > deadline:
                    raise RuntimeError(f"{name} did not come up in {timeout_s:.0f} s: see {out.name}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(base + health, timeout=1).status_code == 200:
                        break
                time.sleep(0.2)
            yield base, proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def complete(client: httpx.Client, base: str, prompt: str, bias: dict, max_tokens: int) -> dict:
    r = client.post(base + "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                                    "logit_bias": bias})
    if r.status_code != 200:
        raise RuntimeError(f"{base}: HTTP {r.status_code}: {r.text[:500]}")
    return r.json()


def in_threads(fn: Callable, items: list) -> list:
    """fn(item) for every item at once, one thread each; the results in order (the first error is raised)."""
    out, errors = [None] * len(items), []

    def one(i: int) -> None:
        try:
            out[i] = fn(items[i])
        except Exception as e:  # re-raised in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def concurrently(base: str, prompts: list[str], bias: dict, max_tokens: int) -> tuple[float, list[dict]]:
    """Send every prompt at once, each on its own connection: (wall seconds, responses in prompt order)."""
    barrier = threading.Barrier(len(prompts), timeout=60)

    def one(prompt: str) -> tuple[float, float, dict]:
        with httpx.Client(timeout=900) as client:
            barrier.wait()
            t0 = time.perf_counter()
            response = complete(client, base, prompt, bias, max_tokens)
            return t0, time.perf_counter(), response

    timed = in_threads(one, prompts)
    return max(t[1] for t in timed) - min(t[0] for t in timed), [t[2] for t in timed]


def throughput(name: str, model: Path, streams: int, rounds: int, bias: dict) -> list[float]:
    """Aggregate t/s of each round on a fresh server."""
    tps = []
    with serving(name, model, streams, "throughput") as (base, _):
        with httpx.Client(timeout=900) as client:
            complete(client, base, "Warm-up:", bias, 16)
        for r in range(rounds):
            prompts = [f"{OPENINGS[i % len(OPENINGS)]} (#{r * streams + i})" for i in range(streams)]
            wall, responses = concurrently(base, prompts, bias, N_GEN)
            tokens = [resp["usage"]["completion_tokens"] for resp in responses]
            if tokens != [N_GEN] * streams:
                raise RuntimeError(f"{name} generated {tokens} tokens, not {N_GEN} each")
            tps.append(sum(tokens) / wall)
    return tps


def completion_events(client: httpx.Client, base: str, prompt: str, bias: dict, max_tokens: int):
    """The Server-Sent Events of a streamed greedy completion (usage in the last), parsed."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logit_bias": bias, "stream": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", base + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{base}: HTTP {r.status_code}: {r.read()[:500]!r}")
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])


def stream_tokens(base: str, prompt: str, bias: dict) -> dict:
    """A streamed greedy completion: its text, one piece per SSE event, and the generated token count."""
    pieces, n_tokens = [], None
    with httpx.Client(timeout=900) as client:
        for event in completion_events(client, base, prompt, bias, N_GREEDY):
            if event["choices"] and event["choices"][0]["text"]:
                pieces.append(event["choices"][0]["text"])
            if event.get("usage"):
                n_tokens = event["usage"]["completion_tokens"]
    if n_tokens != N_GREEDY:
        raise RuntimeError(f"{base}: a streamed completion of {n_tokens} tokens, not {N_GREEDY}")
    return {"pieces": pieces, "tokens": n_tokens}


def greedy(model: Path, bias: dict) -> dict:
    prompts = list(OPENINGS[:8])
    with serving("edgelm", model, 1, "greedy") as (base, _):
        reference = [stream_tokens(base, p, bias) for p in prompts]
    with serving("edgelm", model, 8, "greedy") as (base, _):
        alone = [stream_tokens(base, p, bias) for p in prompts]
        together = in_threads(lambda p: stream_tokens(base, p, bias), prompts)
    return {"prompts": prompts, "reference": reference, "alone on --parallel 8": alone,
            "8 at once on --parallel 8": together}


def first_difference(a: dict, b: dict) -> tuple[int, int] | None:
    """(character, SSE event) position where two streamed completions part, or None if they are equal."""
    text_a, text_b = "".join(a["pieces"]), "".join(b["pieces"])
    if text_a == text_b:
        return None
    char = next((i for i, (x, y) in enumerate(zip(text_a, text_b)) if x != y), min(len(text_a), len(text_b)))
    event = next((i for i, (x, y) in enumerate(zip(a["pieces"], b["pieces"])) if x != y),
                 min(len(a["pieces"]), len(b["pieces"])))
    return char, event


def save(piece: Path, data: dict) -> None:
    piece.parent.mkdir(parents=True, exist_ok=True)
    piece.write_text(json.dumps({**data, "date": today(), "machine": machine()}, indent=1))


def measure(args, pieces: Path) -> None:
    for key, path in model_paths(args.models).items():
        no_eog, visible = biases(path)
        if args.part in ("all", "throughput"):
            for j, n in enumerate(args.streams):
                k = j % len(args.servers)  # rotate who goes first
                for name in args.servers[k:] + args.servers[:k]:
                    tps = throughput(name, path, n, args.rounds, no_eog)
                    log(f"{MODELS[key]}, {name}, {n} streams: {', '.join(f'{x:.1f}' for x in tps)} t/s")
                    save(pieces / "throughput" / f"{key}-{name}-n{n}.json",
                         {"model": key, "server": name, "streams": n, "tps": tps})
        if args.part in ("all", "greedy"):
            save(pieces / "greedy" / f"{key}.json", {"model": key, **greedy(path, visible)})
            log(f"{MODELS[key]}: greedy consistency measured")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the small model, N in 1, 4, 8, one round")
    p.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS), help="small,q05")
    p.add_argument("--servers", type=lambda s: s.split(","), default=list(SERVERS), help=",".join(SERVERS))
    p.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",")], default=list(STREAMS))
    p.add_argument("--part", choices=("all", "throughput", "greedy"), default="all")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--render-only", action="store_true", help="render the report from the saved pieces")
    p.add_argument("--out", type=Path, default=DOCS / "serving.md")
    args = p.parse_args(argv)
    if set(args.models) - set(MODELS) or set(args.servers) - set(SERVERS):
        p.error(f"--models takes {','.join(MODELS)}; --servers takes {','.join(SERVERS)}")
    pieces = PIECES / "quick" if args.quick else PIECES
    if args.quick:
        args.models, args.streams, args.rounds = ["small"], [1, 4, 8], 1
    if not args.render_only:
        measure(args, pieces)
    write_report(pieces, args.out)
    return 0


def load(folder: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))]


def write_report(pieces: Path, out: Path) -> None:
    runs = load(pieces / "throughput")
    greedy_runs = load(pieces / "greedy")
    if not runs and not greedy_runs:
        raise SystemExit(f"no measurements under {pieces}")
    tps = {(r["model"], r["server"], r["streams"]): r["tps"] for r in runs}
    models = [k for k in MODELS if any(r["model"] == k for r in runs + greedy_runs)]
    servers = [s for s in SERVERS if any(r["server"] == s for r in runs)]
    streams = sorted({r["streams"] for r in runs})

    def cell(key) -> str:
        return f"{median(tps[key]):.1f} ({min(tps[key]):.0f}–{max(tps[key]):.0f})" if key in tps else "—"

    def ratio(model: str, n: int) -> float | None:
        a, b = (model, "edgelm", n), (model, "llama-server", n)
        return median(tps[a]) / median(tps[b]) if a in tps and b in tps else None

    sections, goals = [], []
    for model in models:
        rows = [[n] + [cell((model, s, n)) for s in servers]
                + [f"{ratio(model, n):.2f}" if ratio(model, n) else "—"] for n in streams]
        sections.append(f"### {MODELS[model]}\n\n"
                        + markdown_table(["streams N"] + [f"{s} t/s" for s in servers] + ["edgelm / llama-server"],
                                         rows))
        scaling = {s: median(tps[(model, s, 8)]) / median(tps[(model, s, 1)]) for s in servers
                   if (model, s, 8) in tps and (model, s, 1) in tps}
        if scaling:
            sections.append("Scaling, aggregate at 8 streams / at 1 stream: "
                            + ", ".join(f"{s} **{x:.2f}×**" for s, x in scaling.items()) + ".")
        if "edgelm" in scaling:
            met = scaling["edgelm"] >= 3
            goals.append(f"- {MODELS[model]}, 8 streams ≥ 3 × 1 stream: **{'met' if met else 'not met'}** "
                         f"({median(tps[(model, 'edgelm', 8)]):.1f} vs {median(tps[(model, 'edgelm', 1)]):.1f} t/s, "
                         f"{scaling['edgelm']:.2f}×)")
        ratios = {n: ratio(model, n) for n in streams if ratio(model, n)}
        if ratios:
            behind = [f"N={n}: {x:.2f}" for n, x in ratios.items() if x < 1]
            goals.append(f"- {MODELS[model]}, edgelm ≥ llama-server at every N: "
                         f"**{'not met' if behind else 'met'}** "
                         + (f"(behind at {'; '.join(behind)})" if behind else
                            f"(lowest ratio {min(ratios.values()):.2f})"))
    img = out.parent / "img" / "serving.png"
    if runs:
        _plot(tps, models, servers, streams, img)
    first = (runs or greedy_runs)[0]
    loads = [float(r["machine"].split("load average at start ")[1].split(",")[0]) for r in runs + greedy_runs]
    rounds = sorted({len(r["tps"]) for r in runs}) or [0]
    write_doc(out,
        "# Serving: aggregate generation speed with concurrent streams\n\n"
        f"Generated by `benchmarks/serve_bench.py` on {', '.join(sorted({r['date'] for r in runs + greedy_runs}))}, "
        f"{first['machine'].split('; load')[0]}, from {len(runs) + len(greedy_runs)} saved measurements (1-minute "
        f"load average {min(loads):.2f}–{max(loads):.2f} at their starts; shared machine). {THREADS} threads and a "
        f"context of {CTX} tokens per sequence on every server.\n\n"
        f"Each cell: aggregate generation t/s, median of {'/'.join(map(str, rounds))} rounds (min–max). A round "
        "sends N distinct short prompts at once to `/v1/completions` (non-streaming, temperature 0, max_tokens "
        f"{N_GEN}, every end-of-generation token biased by −100, so every request generates exactly {N_GEN} "
        "tokens, which is checked); aggregate = completion tokens / wall time from the first request sent to the "
        "last response. Each server is started fresh for each model and N (`edgelm serve --parallel N`, "
        f"`llama-server -np N -c {CTX}×N`, `python -m llama_cpp.server --n_ctx {CTX}`, which serves one request "
        "at a time) and takes one warm-up request before the rounds.\n\n"
        + "\n\n".join(sections)
        + (f"\n\n![aggregate t/s]({img.relative_to(out.parent)})" if runs else "")
        + "\n\n## Goals\n\n" + ("\n".join(goals) or "(no edgelm / llama-server pairs measured)") + "\n"
        + greedy_section(greedy_runs)
        + "\nSoak test of `edgelm serve` (2,000 mixed requests, disconnects, memory): [soak.md](soak.md).\n"
    )
    print(out.read_text())


def greedy_section(runs: list[dict]) -> str:
    if not runs:
        return ""
    rows, notes = [], []
    for run in runs:
        for kind in ("alone on --parallel 8", "8 at once on --parallel 8"):
            diffs = [(i, first_difference(run["reference"][i], got)) for i, got in enumerate(run[kind])]
            diffs = [(i, d) for i, d in diffs if d is not None]
            rows.append([MODELS[run["model"]], kind, f"{len(run[kind]) - len(diffs)} of {len(run[kind])}",
                         "; ".join(f"#{i + 1} at char {c}, token {t}" for i, (c, t) in diffs) or "—"])
        inexact = sum(len(r["pieces"]) != r["tokens"] for kind in ("reference", "alone on --parallel 8",
                                                                    "8 at once on --parallel 8") for r in run[kind])
        if inexact:
            notes.append(f"{MODELS[run['model']]}: {inexact} completion(s) have tokens that end inside a UTF-8 "
                         "character (no SSE event of their own), so token positions there count events and may be "
                         "low")
    prompts = ", ".join(f"#{i + 1} `{p}`" for i, p in enumerate(runs[0]["prompts"]))
    return (
        "\n## Greedy consistency across batch sizes\n\n"
        f"Prompts {prompts}; each streamed through `edgelm serve` with temperature 0, max_tokens {N_GREEDY} and "
        "every token without text biased by −100 (end-of-generation and control tokens, and the 0.5B shape's "
        "143,744 padding ids, which its random weights would otherwise pick most of the time), so that every "
        "generated token shows in the text. The reference is each prompt alone on `--parallel 1`; the rows "
        "compare each prompt alone on `--parallel 8`, and all 8 sent at once on `--parallel 8`, with it. Positions "
        "are where the text first differs: the character, and the token (SSE event) of the completion, from 0.\n\n"
        + markdown_table(["model", "run", "identical to the reference", "first difference"], rows, align="llrl")
        + ("\n\n" + "; ".join(notes) + "." if notes else "")
        + "\n\nDifferences are expected from llama.cpp, not a bug of edgelm: its CPU kernels round differently "
        "for different batch shapes. Flash attention switches to a tiled kernel at 64 queries per batch, and "
        "repacked quantized weights are multiplied by a 4-row gemm for several rows but a 1-row gemv for one, so a "
        "token decoded in a batch of 8 can differ in the last bits of its logits from the same token decoded alone. "
        "Where two candidates are nearly tied, greedy decoding then picks the other one, and the texts part from "
        "there on. A random-weight model, with its flat logits, has many near ties.\n"
    )


def _plot(tps: dict, models: list[str], servers: list[str], streams: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        for s in servers:
            ns = [n for n in streams if (model, s, n) in tps]
            ax.plot(ns, [median(tps[(model, s, n)]) for n in ns], marker="o", label=s)
        ax.set_xscale("log", base=2)
        ax.set_xticks(streams, [str(n) for n in streams])
        ax.set_xlabel("concurrent streams N")
        ax.set_ylabel("aggregate generation t/s")
        ax.set_title(MODELS[model])
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
