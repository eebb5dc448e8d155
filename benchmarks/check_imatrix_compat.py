"""edgelm's importance matrix against llama.cpp's: file compatibility, quantized bytes, values.

    .venv/bin/python benchmarks/check_imatrix_compat.py        # writes docs/imatrix-compat.md

1. llama-quantize --imatrix reads the imatrix GGUF edgelm writes (converters/imatrix.py save_imatrix),
   and its IQ4_XS / Q4_K_M of the small model's f16 GGUF equals, tensor for tensor, what
   `edgelm.converters.convert(..., quant=..., imatrix=that file)` writes.
2. The other way round: edgelm reads llama-imatrix's file and quantizes to the same bytes as
   llama-quantize with it.
3. Values: edgelm's compute_imatrix against llama-imatrix on the same calibration text, context
   and chunk count. Both store the sum of squared activations per input column and the rows seen;
   the quantizer uses their ratio (the mean). llama-imatrix replaces each chunk's first token by
   BOS; a third matrix, edgelm's collector fed exactly those chunks, tells a difference in chunk
   contents apart from one in the arithmetic.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

import gguf_diff
from common import BENCH, DOCS, ROOT, log, machine, markdown_table, run_measured, source_digest, today, tool

HF_DIR = ROOT / "models" / "small"
OUT = BENCH / "imatrix_compat"
CHUNK, N_CHUNKS = 512, 100
QUANTS = {"iq4_xs": "IQ4_XS", "q4_k_m": "Q4_K_M"}  # edgelm name -> llama-quantize name


def compare_values(a, b) -> dict:
    """Per-tensor relative differences of the means (sum / count) of two Imatrix objects."""
    ma, mb = a.means(), b.means()
    per = {}
    for name in sorted(ma.keys() & mb.keys()):
        x, y = ma[name].astype(np.float64), mb[name].astype(np.float64)
        per[name] = {"norm": float(np.linalg.norm(x - y) / np.linalg.norm(y)),
                     "max": float((np.abs(x - y) / np.maximum(np.abs(y), 1e-30)).max()),
                     "counts": (a.counts[name], b.counts[name])}
    norms = np.array([v["norm"] for v in per.values()])
    worst = max(per, key=lambda k: per[k]["norm"])
    return {"n": len(per), "only_a": sorted(ma.keys() - mb.keys()), "only_b": sorted(mb.keys() - ma.keys()),
            "median_norm": float(np.median(norms)), "max_norm": float(norms.max()), "worst": worst,
            "max_elem": max(v["max"] for v in per.values()),
            "counts_equal": all(c[0] == c[1] for c in (v["counts"] for v in per.values())), "per": per}


def llama_quantize(src: Path, out: Path, qtype: str, imatrix: Path, threads: int) -> str:
    r = run_measured([tool("llama-quantize"), "--imatrix", imatrix, src, out, QUANTS[qtype], threads]).check()
    m = re.search(r"loaded (\d+) importance matrix entries from .* computed on (\d+) chunks", r.stdout + r.stderr)
    return f"yes: {m.group(1)} entries, {m.group(2)} chunks" if m else "no message (see its log)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--doc", type=Path, default=DOCS / "imatrix-compat.md")
    p.add_argument("--render-only", action="store_true", help="rewrite the report from .bench/imatrix_compat/results.json")
    p.add_argument("--threads", type=int, help="threads for llama.cpp, both sides (default: every core; results do "
                   "not depend on it)")
    args = p.parse_args(argv)
    if args.render_only:
        saved = json.loads((OUT / "results.json").read_text())
        saved.setdefault("between_files", between_files())  # older results: computed from the files on disk
        (OUT / "results.json").write_text(json.dumps(saved, indent=1))
        args.doc.write_text(render(**saved), encoding="utf-8")
        return 0

    from edgelm import corpus
    from edgelm.converters import convert
    from edgelm.converters.imatrix import compute_imatrix, load_imatrix, save_imatrix
    from edgelm.runtime.context import default_threads

    t0, where = time.perf_counter(), machine()
    threads = args.threads or default_threads()
    OUT.mkdir(parents=True, exist_ok=True)
    f16 = OUT / "small-f16.gguf"
    convert(HF_DIR, f16, outtype="f16", progress=False)
    calib_file = OUT / "calib-train.txt"
    calib_file.write_text(corpus.text("train", max_chars=400_000), encoding="utf-8")
    text = calib_file.read_text(encoding="utf-8")
    text = text[:-1] if text.endswith("\n") else text  # llama.cpp's -f drops one trailing newline

    log("edgelm imatrix")
    t = time.perf_counter()
    edgelm_im = compute_imatrix(f16, text, chunk_size=CHUNK, max_chunks=N_CHUNKS, n_threads=threads,
                                dataset=calib_file.name)
    edgelm_s = time.perf_counter() - t
    edgelm_file = OUT / "imatrix-edgelm.gguf"
    save_imatrix(edgelm_im, edgelm_file)

    log("llama-imatrix")
    llama_file = OUT / "imatrix-llama.gguf"
    r = run_measured([tool("llama-imatrix"), "-m", f16, "-f", calib_file, "-c", CHUNK, "-b", CHUNK,
                      "--chunks", N_CHUNKS, "-o", llama_file, "-t", threads, "--no-ppl"]).check()
    llama_s = r.seconds
    llama_im = load_imatrix(llama_file)  # edgelm reads llama.cpp's file: compatibility the other way

    quant_rows = []
    for qtype in QUANTS:
        # edgelm's file -> llama-quantize, against edgelm's own pipeline with the same file
        ref = OUT / f"llama-quantize-{qtype}-edgelm-imatrix.gguf"
        loaded = llama_quantize(f16, ref, qtype, edgelm_file, threads)
        mine = OUT / f"edgelm-{qtype}-edgelm-imatrix.gguf"
        convert(HF_DIR, mine, outtype="f16", quant=qtype, imatrix=edgelm_file, progress=False)
        quant_rows.append(_quant_row("edgelm's (save_imatrix)", qtype, loaded, compare(mine, ref)))
        # llama-imatrix's file -> both quantizers
        ref = OUT / f"llama-quantize-{qtype}-llama-imatrix.gguf"
        loaded = llama_quantize(f16, ref, qtype, llama_file, threads)
        mine = OUT / f"edgelm-{qtype}-llama-imatrix.gguf"
        convert(HF_DIR, mine, outtype="f16", quant=qtype, imatrix=llama_file, progress=False)
        quant_rows.append(_quant_row("llama-imatrix's", qtype, loaded, compare(mine, ref)))
        for q in quant_rows[-2:]:
            log(f"{q['qtype']} with {q['who']} imatrix: {q['summary']}")

    as_is = compare_values(edgelm_im, llama_im)
    log(f"values: median rel. L2 {as_is['median_norm']:.2e}, max {as_is['max_norm']:.2e} ({as_is['worst']})")

    saved = {"quant_rows": quant_rows, "between_files": between_files(), "as_is": as_is,
             "edgelm_s": edgelm_s, "llama_s": llama_s, "threads": threads, "seconds": time.perf_counter() - t0, "machine": where, "date": today(),
             "code": source_digest("converters")}
    (OUT / "results.json").write_text(json.dumps(saved, indent=1))
    args.doc.write_text(render(**saved), encoding="utf-8")
    log(f"wrote {args.doc} in {saved['seconds'] / 60:.1f} min")
    return 0


def values_conclusion(as_is: dict, tol: float = 1e-3) -> list[str]:
    """What the value comparison says, decided by the numbers (tol: relative L2 of float32 accumulation)."""
    if as_is["max_norm"] < tol:
        return ["edgelm's `compute_imatrix` (converters/imatrix.py) and llama-imatrix agree on every matrix: both start",
                "each chunk with BOS and average the same rows. llama-imatrix sums in float32 and edgelm in float64, so",
                "the two agree to float32 accumulation error, not bit for bit."]
    return ["edgelm's `compute_imatrix` (converters/imatrix.py) differs from llama-imatrix by more than accumulation",
            "error: compare the chunking and the collector in converters/imatrix.py with llama-imatrix."]


def compare(mine: Path, ref: Path) -> gguf_diff.GGUFDiff:
    """Tensors, and every metadata key but edgelm's own provenance (so llama-quantize's additions show)."""
    return gguf_diff.compare(mine, ref, ignore=("edgelm.",))


def between_files() -> list[dict]:
    """edgelm's quantizer given edgelm's imatrix file, then llama-imatrix's: do the two files quantize alike?"""
    return [{"qtype": q, "summary": gguf_diff.compare(OUT / f"edgelm-{q}-edgelm-imatrix.gguf",
                                                      OUT / f"edgelm-{q}-llama-imatrix.gguf").summary()} for q in QUANTS]


def _quant_row(who: str, qtype: str, loaded: str, d: gguf_diff.GGUFDiff) -> dict:
    return {"who": who, "qtype": qtype, "loaded": loaded, "summary": d.summary(), "equal": d.tensors_equal,
            "metadata_only_llama": d.metadata_only_b}


def render(quant_rows, between_files, as_is, edgelm_s, llama_s, seconds, machine, date, code,
           threads: int = 2) -> str:
    q_table = markdown_table(
        ["imatrix file", "type", "llama-quantize read it", "tensors, edgelm vs llama-quantize",
         "metadata only in llama-quantize's file"],
        [[q["who"], q["qtype"], q["loaded"], q["summary"], ", ".join(f"`{k}`" for k in q["metadata_only_llama"]) or "none"]
         for q in quant_rows], "lllll")
    layers = sorted({n.split(".")[1] for n in as_is["per"]}, key=int)
    by_layer = []
    for layer in (layers[0], layers[1], layers[len(layers) // 2], layers[-1]):
        names = [n for n in as_is["per"] if n.split(".")[1] == layer]
        by_layer.append([f"blk.{layer}.*", f"{np.median([as_is['per'][n]['norm'] for n in names]):.2e}"])
    v_table = markdown_table(
        ["comparison with llama-imatrix", "tensors", "counts equal", "median rel. L2", "worst rel. L2 (tensor)",
         "worst element rel."],
        [[label, c["n"], "yes" if c["counts_equal"] else "no", f"{c['median_norm']:.2e}",
          f"{c['max_norm']:.2e} ({c['worst']})", f"{c['max_elem']:.2e}"]
         for label, c in (("edgelm compute_imatrix", as_is),)], "lrrrrr")
    return "\n".join([
        "# Importance matrix: compatibility with llama.cpp",
        "",
        "On the small reference model's f16 GGUF, with the calibration `--imatrix auto` uses (the first 400,000",
        f"characters of the training split, {N_CHUNKS} chunks of {CHUNK} tokens).",
        "",
        "## The file and the quantized bytes",
        "",
        "Each row quantizes the same f16 GGUF twice with the same imatrix file: once with `llama-quantize --imatrix`,",
        "once with `edgelm.converters.convert(..., quant=..., imatrix=FILE)`; then compares the two outputs tensor",
        "by tensor (`benchmarks/gguf_diff.py`).",
        "",
        q_table,
        "",
        "llama-quantize adds `quantize.imatrix.*` keys naming the imatrix file, dataset, entries and chunks;",
        "edgelm's quantize does not write them (its `edgelm.pipeline` key records an `imatrix` step instead).",
        "",
        "## The values",
        "",
        "Relative L2 difference per weight matrix of the per-column means (sum of squared activations / rows),",
        "‖edgelm − llama‖ / ‖llama‖; the worst single column is in the last column.",
        "",
        v_table,
        "",
        "By layer (median over the layer's 7 matrices):",
        "",
        markdown_table(["layers", "median rel. L2"], by_layer),
        "",
        *values_conclusion(as_is),
        "",
        "Differences that small still tip a few rounding decisions. The same quantizer (edgelm's), given edgelm's",
        "imatrix file and then llama-imatrix's:",
        "",
        *[f"- {b['qtype']}: {b['summary']}." for b in between_files],
        "",
        "## Machine and run",
        "",
        f"- {machine}",
        f"- {date}; edgelm's imatrix {edgelm_s:.1f} s, llama-imatrix {llama_s:.1f} s: one run each on {threads} thread(s)",
        f"  of a shared machine, not a speed comparison. Script wall time {seconds / 60:.1f} min.",
        f"- Code measured: `converters/*.py` sha256 {code}… (`common.source_digest`).",
        "",
        "## Regenerate",
        "",
        "```bash",
        "scripts/build_llama_tools.sh                      # llama-quantize and llama-imatrix, once",
        ".venv/bin/python benchmarks/check_imatrix_compat.py",
        "```",
        "",
    ])


if __name__ == "__main__":
    sys.exit(main())
