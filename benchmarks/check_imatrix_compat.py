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


def imatrix_with_bos_chunks(model_path: Path, text: str, n_chunks: int, threads: int | None = None):
    """compute_imatrix's collection over llama-imatrix's chunks (first token of each chunk -> BOS).

    Uses edgelm's private collector on purpose: only the chunk contents change.
    """
    from edgelm.converters.imatrix import Imatrix, _Collector
    from edgelm.runtime.context import Context, ContextOptions
    from edgelm.runtime.model import LlamaModel

    im = Imatrix(chunk_size=CHUNK, datasets=["bos-chunks"])
    collector = _Collector(im, include_output=False)
    with LlamaModel(model_path) as llama:
        tokens = llama.tokenize(text)
        ctx = Context(llama, ContextOptions(n_ctx=CHUNK, n_batch=CHUNK, n_threads=threads),
                      eval_callback=collector.callback)
        try:
            for i in range(min(n_chunks, len(tokens) // CHUNK)):
                chunk = tokens[i * CHUNK:(i + 1) * CHUNK]
                chunk[0] = llama.bos
                ctx.clear()
                ctx.decode(chunk, 0, logits_last=False, logits_from=0)
                if collector.error:
                    raise collector.error
                im.chunks += 1
        finally:
            ctx.close()
    return im


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

    log("edgelm collector on BOS chunks")
    bos_im = imatrix_with_bos_chunks(f16, text, N_CHUNKS, threads)
    as_is = compare_values(edgelm_im, llama_im)
    same_chunks = compare_values(bos_im, llama_im)
    for label, c in (("as is", as_is), ("same chunks", same_chunks)):
        log(f"values {label}: median rel. L2 {c['median_norm']:.2e}, max {c['max_norm']:.2e} ({c['worst']})")

    saved = {"quant_rows": quant_rows, "between_files": between_files(), "as_is": as_is, "same_chunks": same_chunks,
             "edgelm_s": edgelm_s, "llama_s": llama_s, "threads": threads, "seconds": time.perf_counter() - t0, "machine": where, "date": today(),
             "code": source_digest("converters")}
    (OUT / "results.json").write_text(json.dumps(saved, indent=1))
    args.doc.write_text(render(**saved), encoding="utf-8")
    log(f"wrote {args.doc} in {saved['seconds'] / 60:.1f} min")
    return 0


def values_conclusion(as_is: dict, same_chunks: dict, tol: float = 1e-3) -> list[str]:
    """What the two value comparisons say, decided by the numbers (tol: relative L2 of float32 accumulation)."""
    arithmetic = ("llama-imatrix sums in float32 and edgelm in float64, so the two agree to float32 accumulation "
                  "error, not bit for bit.")
    if as_is["max_norm"] < tol:
        return ["edgelm's `compute_imatrix` (converters/imatrix.py) and llama-imatrix agree on every matrix: both start",
                "each chunk with BOS and average the same rows. " + arithmetic]
    out = ["edgelm's `compute_imatrix` (converters/imatrix.py), as measured here, differs from llama-imatrix by more",
           "than accumulation error."]
    if same_chunks["max_norm"] < tol:
        out += ["Fed llama-imatrix's chunks (each chunk's first token replaced by BOS), edgelm's collector agrees with",
                "it, so the difference is the chunk contents: llama-imatrix restarts every chunk with BOS, edgelm's",
                "`compute_imatrix` decoded the token stream as it is. " + arithmetic]
    else:
        out += ["Even on llama-imatrix's chunks the values differ: look at the collector in converters/imatrix.py."]
    return out


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


def render(quant_rows, between_files, as_is, same_chunks, edgelm_s, llama_s, seconds, machine, date, code,
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
        by_layer.append([f"blk.{layer}.*", f"{np.median([as_is['per'][n]['norm'] for n in names]):.2e}",
                         f"{np.median([same_chunks['per'][n]['norm'] for n in names]):.2e}"])
    v_table = markdown_table(
        ["comparison with llama-imatrix", "tensors", "counts equal", "median rel. L2", "worst rel. L2 (tensor)",
         "worst element rel."],
        [[label, c["n"], "yes" if c["counts_equal"] else "no", f"{c['median_norm']:.2e}",
          f"{c['max_norm']:.2e} ({c['worst']})", f"{c['max_elem']:.2e}"]
         for label, c in (("edgelm compute_imatrix, as shipped", as_is),
                          ("edgelm collector, llama-imatrix's chunks (BOS first)", same_chunks))], "lrrrrr")
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
        markdown_table(["layers", "as shipped", "same chunks"], by_layer),
        "",
        *values_conclusion(as_is, same_chunks),
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
