"""Router mode: what switching between models costs, `edgelm serve --models-dir` against llama-server's router
mode (`llama-server --models-dir`), side by side in one run.

    .venv/bin/python benchmarks/router_bench.py            # small Q8_0 and the 0.5B-shape Q4_K_M, 3 rounds
    .venv/bin/python benchmarks/router_bench.py --quick    # small Q8_0 and tiny Q8_0, 1 round, logged only

Both servers get a folder holding the two models, 2 threads, one slot of 512 tokens per model, and requests
that name the model they want. A round sends 8 requests one after the other, alternating between the models
(greedy, 16 tokens, end-of-generation tokens banned so each runs to its 16 tokens), twice: with --models-max 1,
so every request after the first unloads one model and loads the other, and with --models-max 2, so both stay
loaded after their first request. Per request: wall time from sending it to the whole response. The report
gives, per model, the median over rounds of its first request (a cold start with the server up), of its
requests that switch models (all but the first, at --models-max 1) and of its requests with both models loaded
(all but each model's first, at --models-max 2). Raw times go to .bench/router.json (--render-only re-renders).
llama-server's router starts a llama-server process per model and forwards requests to it; edgelm loads each
model into its own process.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, DOCS, log, machine, markdown_table, median, python, today, tool, write_doc  # noqa: E402
from serve_bench import biases, free_port, launched  # noqa: E402

THREADS, CTX, N_GEN, N_REQUESTS = 2, 512, 16, 8
PROMPTS = ("Once upon a time", "def parse(line):", "The weather today", "class Node:")
REPORT = DOCS / "router.md"
RAW = BENCH / "router.json"


def argv(server: str, folder: Path, port: int, models_max: int) -> list:
    if server == "edgelm":
        return [python(), "-m", "edgelm", "serve", "--models-dir", folder, "--models-max", models_max, "--port", port,
                "--parallel", 1, "--ctx", CTX, "--threads", THREADS, "--keep-alive", "-1"]
    return [tool("llama-server"), "--models-dir", folder, "--models-max", models_max, "--host", "127.0.0.1",
            "--port", port, "-np", 1, "-c", CTX, "-t", THREADS, "-tb", THREADS]


@contextlib.contextmanager
def serving(server: str, folder: Path, models_max: int):
    port = free_port()
    log_file = BENCH / "router" / f"{server}-{models_max}.log"  # kept: the models' folder is a temporary one
    with launched(server, argv(server, folder, port, models_max), port, "/models", log_file, timeout_s=120) as (base, _):
        yield base


def model_ids(base: str, stems: list[str]) -> list[str]:
    """The router's names for the folder's models, in the order of `stems` (each server names them its way)."""
    ids = [m["id"] for m in httpx.get(base + "/models", timeout=30).json()["data"]]
    return [next(i for i in ids if stem in i) for stem in stems]


def one_round(server: str, folder: Path, stems: list[str], bans: list[dict], models_max: int) -> list[float]:
    """Seconds per request, alternating between the models."""
    with serving(server, folder, models_max) as base:
        names = model_ids(base, stems)
        times = []
        for i in range(N_REQUESTS):
            k = i % 2
            body = {"model": names[k], "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": N_GEN, "temperature": 0,
                    "logit_bias": bans[k]}
            t0 = time.perf_counter()
            r = httpx.post(base + "/v1/completions", json=body, timeout=300)  # a connection each: llama-server's
            # router may close one when it stops a model's process
            times.append(time.perf_counter() - t0)
            r.raise_for_status()
            got = r.json()["usage"]["completion_tokens"]
            if got != N_GEN:
                raise RuntimeError(f"{server}: {got} tokens instead of {N_GEN}")
        return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--render-only", action="store_true")
    args = p.parse_args()
    if args.render_only:
        render(json.loads(RAW.read_text()))
        return
    from runtime_bench import models

    built = models(quick=args.quick)
    pair = [built["small Q8_0"], built["tiny Q8_0" if args.quick else "0.5B-shape Q4_K_M"]]
    labels = ["small Q8_0", "tiny Q8_0" if args.quick else "0.5B-shape Q4_K_M"]
    rounds = args.rounds or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        stems = []
        for i, path in enumerate(pair):
            stems.append(f"m{i}-{path.stem}")
            (folder / f"{stems[-1]}.gguf").symlink_to(path.resolve())
        bans = [biases(path)[0] for path in pair]
        results = {"labels": labels, "rounds": rounds, "machine": machine(), "date": today(), "times": {}}
        for r in range(rounds):
            for models_max in (1, 2):
                for server in ("edgelm", "llama-server"):  # alternated within each round
                    times = one_round(server, folder, stems, bans, models_max)
                    results["times"].setdefault(f"{server} {models_max}", []).append(times)
                    log(f"round {r + 1}, {server}, --models-max {models_max}: "
                        + " ".join(f"{t * 1000:.0f}" for t in times) + " ms")
    if args.quick:  # a smoke run: the report and its raw times stay those of the full run
        log(f"quick run: {json.dumps(results['times'])}")
        return
    RAW.parent.mkdir(exist_ok=True)
    RAW.write_text(json.dumps(results, indent=1))
    render(results)


def render(results: dict) -> None:
    labels, rounds = results["labels"], results["rounds"]

    def stat(server: str, models_max: int, k: int, first: bool) -> float:
        """Median over rounds of model k's requests: its first one, or the others."""
        return median([median(times[k:k + 1] if first else times[k + 2::2])
                       for times in results["times"][f"{server} {models_max}"]])

    rows, ratios = [], {}
    for what, models_max, first in (("first request (load + 16 tokens)", 1, True),
                                    ("switching to it (unload the other + load + 16 tokens)", 1, False),
                                    ("both loaded (16 tokens)", 2, False)):
        for k, label in enumerate(labels):
            e, ls = stat("edgelm", models_max, k, first), stat("llama-server", models_max, k, first)
            ratios[f"{label}, {what}"] = ls / e
            rows.append([label, what, f"{e * 1000:.0f} ms", f"{ls * 1000:.0f} ms", f"{ls / e:.2f}×"])
    table = markdown_table(["model", "request, median", "edgelm serve --models-dir", "llama-server --models-dir",
                            "edgelm faster by"], rows, "llrrr")
    text = f"""# Router mode: switching models

`benchmarks/router_bench.py`, {results["date"]}, {results["machine"]}. Models: {labels[0]} and {labels[1]}, alternating
request by request; {rounds} round(s), each server started fresh for each setting; {THREADS} threads, one
{CTX}-token slot per model, greedy, {N_GEN} tokens per request.

{table}

How each serves a model it has not loaded: llama-server's router starts a child llama-server process for the
model and forwards the request to it (stopping another child where `--models-max` is reached); edgelm loads the
model in its own process, with an engine and slots of its own, after unloading the least recently used idle
model. Both keep a loaded model for later requests; requests to a loaded model differ only by the router's
forwarding.
"""
    write_doc(REPORT, text)
    log(f"wrote {REPORT}: " + ", ".join(f"{k}: {v:.2f}×" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
