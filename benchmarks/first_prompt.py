"""The first prompt of a fresh process against the next ones: what faulting in memory-mapped weights costs.

    .venv/bin/python benchmarks/first_prompt.py [MODEL.gguf ...]

Each model is loaded in a fresh process, which then evaluates the same 512-token prompt three times from an
empty KV cache and prints the three pp512 rates. llama-bench hides the first one behind a warm-up run; a
one-shot `edgelm run` cannot. Default models: the 0.5B-shape Q8_0 and Q4_K_M built by runtime_bench.py.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, ROOT  # noqa: E402

CHILD = """
import sys
import edgelm
from edgelm import corpus
with edgelm.load(sys.argv[1], n_ctx=640, n_threads=2, prefix_cache_bytes=0) as m:
    ids = m.tokenize(corpus.text("heldout", max_chars=20000))[:512]
    rates = []
    for _ in range(3):
        m.reset()
        rates.append(m.generate(ids, max_tokens=1, temperature=0).timings.prompt_tps)
print(" ".join(f"{r:.1f}" for r in rates))
"""


def main(argv: list[str]) -> int:
    models = argv or [str(BENCH / "q05-q8_0.gguf"), str(BENCH / "q05-q4_k_m.gguf")]
    for model in models:
        r = subprocess.run([sys.executable, "-c", CHILD, model], capture_output=True, text=True, check=True, cwd=ROOT)
        first, *rest = r.stdout.split()
        print(f"{Path(model).name}: pp512 first {first} t/s, then {', '.join(rest)} t/s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
