"""Per-request LoRA scales under concurrency: edgelm serve vs llama-server, side by side in one run.

Four streams at once on a server with one LoRA adapter (the cross-check's FIM model and rank-4 adapter,
benchmarks/native_api_crosscheck.py): all four at the server's scale, or two at the server's scale and two at
another (`lora: [{"id": 0, "scale": ...}]`), which neither server batches together. Aggregate generation t/s of
each setting, rounds alternating between the two servers; reported as ratios (edgelm / llama-server, and mixed /
uniform within each server).

    .venv/bin/python benchmarks/lora_mix_bench.py [--rounds 3]      # needs llama-server: build_llama_tools.sh
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, DOCS, log, machine, markdown_table, median, python, today, tool, write_doc  # noqa: E402
from native_api_crosscheck import fim_model  # noqa: E402
from serve_bench import free_port, in_threads, launched  # noqa: E402

import httpx  # noqa: E402

STREAMS, N_GEN, CTX = 4, 96, 512
PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:", "The weather today"]


def servers(model: Path, adapter: Path) -> dict[str, list]:
    return {"edgelm": [sys.executable, "-m", "edgelm", "serve", model, "--parallel", STREAMS, "--ctx", CTX,
                       "--threads", "2", "--lora-scaled", adapter, "2"],
            "llama-server": [tool("llama-server"), "-m", model, "-np", STREAMS, "-c", CTX * STREAMS, "-t", "2",
                             "--lora-scaled", f"{adapter}:2"]}


def aggregate(base: str, mixed: bool) -> float:
    """Generated tokens per second of STREAMS requests sent at once (greedy, ignore_eos)."""
    import time

    def one(i: int) -> tuple[float, float, int]:
        body = {"prompt": PROMPTS[i], "n_predict": N_GEN, "temperature": 0, "ignore_eos": True}
        if mixed and i % 2:
            body["lora"] = [{"id": 0, "scale": 0.5}]
        with httpx.Client(timeout=600) as client:
            t0 = time.perf_counter()
            out = client.post(base + "/completion", json=body).json()
            return t0, time.perf_counter(), out["tokens_predicted"]

    timed = in_threads(one, list(range(STREAMS)))
    return sum(t[2] for t in timed) / (max(t[1] for t in timed) - min(t[0] for t in timed))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=DOCS / "lora-mix.md")
    args = p.parse_args(argv)
    model, adapter = fim_model()
    runs: dict[tuple[str, bool], list[float]] = {}
    for r in range(args.rounds):
        for name, argv in servers(model, adapter).items():
            port = free_port()
            with launched(name, [*argv, "--host", "127.0.0.1", "--port", port], port, "/health",
                          BENCH / "native" / f"mix-{name}.log") as (base, _):
                aggregate(base, False)  # warm-up
                for mixed in (False, True):
                    runs.setdefault((name, mixed), []).append(aggregate(base, mixed))
            log(f"round {r + 1}: {name} uniform {runs[(name, False)][-1]:.0f} t/s, "
                f"mixed {runs[(name, True)][-1]:.0f} t/s")
    med = {k: median(v) for k, v in runs.items()}
    rows = [[setting, f"{med[('edgelm', mixed)]:.0f}", f"{med[('llama-server', mixed)]:.0f}",
             f"{med[('edgelm', mixed)] / med[('llama-server', mixed)]:.2f}"]
            for setting, mixed in (("4 streams at the server's scale", False),
                                   ("2 at the server's scale + 2 at another", True))]
    within = {name: med[(name, True)] / med[(name, False)] for name in ("edgelm", "llama-server")}
    write_doc(args.out, f"""# Per-request LoRA scales under concurrency

Measured {today()} by `benchmarks/lora_mix_bench.py`: {STREAMS} greedy streams of {N_GEN} tokens at once on the
cross-check's model (the tiny reference model with FIM tokens, f32) with a rank-4 LoRA adapter at scale 2; in the
mixed setting two of the streams ask for scale 0.5 (`lora: [{{"id": 0, "scale": 0.5}}]`). Neither server batches
requests of other scales together: edgelm decodes one set of scales per step, a set keeping the context for up to
16 steps while another waits (each switch makes llama.cpp reserve its graphs again); llama-server runs the set of
its lowest-numbered busy slot until that slot's request ends. Medians of
{args.rounds} rounds, each on fresh servers, alternating. {machine()}; {python()}.

{markdown_table(["setting", "edgelm t/s", "llama-server t/s", "edgelm / llama-server"], rows)}

Mixed over uniform, within each server: edgelm {within['edgelm']:.2f}, llama-server {within['llama-server']:.2f}.
""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
