"""The least batch length at which llama.cpp's logits stop depending on how a prompt is cut, on this machine.

    .venv/bin/python benchmarks/canonical_rows.py [MODEL.gguf ...] [--flash-attn auto|off] [--rows 1,2,4,8,16,64]

Exact prefix reuse (edgelm/runtime/canonical.py) rests on it: a prompt evaluated in batches of at
least R rows, each starting at a multiple of 4, must give bit-identical logits however it is cut. For each R this
evaluates prompts of three lengths cut at several points (batches planned as canonical.batch_plan does) and
compares the last position's logits with those of an uncut prefill. It prints, per model and setting, the cuts that
differ and the least R from which none does. Run it on a new CPU or a new llama.cpp before trusting
Context.canonical_rows there (64 with flash attention, 8 without, measured on x86-64 with AVX2).
Default models: the bundled one and the 0.5B-shape Q4_K_M of runtime_bench.py, if built.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH  # noqa: E402

LENGTHS = (1064, 1070, 777)


def mismatches(path: str | None, flash_attn: bool | None, rows: int) -> list[tuple[int, list[int]]]:
    import numpy as np

    import edgelm
    from edgelm import corpus
    from edgelm.runtime.canonical import batch_plan

    with edgelm.load(path, n_ctx=2048, n_threads=2, n_batch=512, prefix_cache_bytes=0, flash_attn=flash_attn,
                     kv_reuse="off") as m:
        ids_all = m.tokenize(corpus.text("heldout", max_chars=14_000), add_special=False)
        ctx = m.ctx
        bad = []
        for length in LENGTHS:
            n = length - (length - rows) % 4  # so that a cut at a multiple of 4 leaves exactly `rows` positions
            ids = ids_all[:n]

            def logits(points: list[int]) -> np.ndarray:
                ctx.clear()
                for i, start in enumerate(points):
                    end = points[i + 1] if i + 1 < len(points) else n
                    for lo, hi in batch_plan(start, end, ctx.n_batch, rows):
                        ctx.decode(ids[lo:hi], lo, logits_last=hi == n)
                return ctx.logits().copy()

            cold = logits([0])
            last = n - rows  # the latest cut: a last batch of exactly `rows`
            for points in ([0, last], [0, last - 4], [0, 300, last], [0, 16 * rows, 512, last - 8],
                           [0, last - 4 * (rows // 4 + 1)]):
                if all(b - a >= rows and a % 4 == 0 for a, b in zip(points, points[1:] + [n])):
                    if not np.array_equal(logits(points), cold):
                        bad.append((n, points))
        return bad


def main(argv: list[str] | None = None) -> int:
    from edgelm.runtime.model import default_model_path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    q05 = BENCH / "q05-q4_k_m.gguf"
    p.add_argument("models", nargs="*", default=[str(default_model_path())] + ([str(q05)] if q05.exists() else []))
    p.add_argument("--flash-attn", choices=("auto", "off"), nargs="+", default=["auto", "off"])
    p.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16, 64])
    args = p.parse_args(argv)
    for model in args.models:
        for fa in args.flash_attn:
            results = {rows: mismatches(model, None if fa == "auto" else False, rows) for rows in args.rows}
            for rows, bad in results.items():
                print(f"{Path(model).name}, flash attention {fa}, batches of >= {rows:2d} rows: "
                      + ("identical" if not bad else f"{len(bad)} cuts differ, e.g. {bad[0]}"))
            least = next((r for r in args.rows if all(not results[s] for s in args.rows if s >= r)), None)
            print(f"  least rows from which every cut is identical: {least}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
