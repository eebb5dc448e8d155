"""Size against quality of every quantization edgelm offers, on the small reference model.

    .venv/bin/python benchmarks/quant_report.py            # writes docs/quantization.md and docs/img/quantization.png

Each variant is made by `edgelm.converters.convert` from models/small. The importance matrix is
computed once, from the training split (the calibration text `--imatrix auto` uses), saved, and
reused by path for every imatrix variant; held-out text never enters it. Perplexity is edgelm's
(`edgelm perplexity MODEL heldout`: windows of 512, stride 256) on the corpus's held-out split.
One number is cross-checked against llama.cpp's llama-perplexity when it is built.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common import BENCH, DOCS, ROOT, have_tool, log, machine, markdown_table, source_digest, today

HF_DIR = ROOT / "models" / "small"
OUT = BENCH / "quant"
WINDOW = 512
# (label, outtype, llama.cpp quant type or None, weighted by the imatrix)
VARIANTS = [("f16", "f16", None, False), ("q8_0", "q8_0", None, False)] + [
    (q, "f16", q, im) for q in ("q6_k", "q5_k_m", "q4_k_m", "q4_0", "q3_k_m", "iq4_xs", "q2_k") for im in (False, True)
] + [(q, "f16", q, True) for q in ("iq3_xxs", "iq2_xs")]  # these two refuse to quantize without an imatrix
CROSS_CHECK = {"f16": True, "q4_k_m+imatrix": False}  # label -> also the --ppl-stride scheme


@dataclass
class Row:
    label: str
    imatrix: bool
    path: str
    file_bytes: int
    tensor_bytes: int
    n_params: int
    types: str  # "q4_K 71%, q6_K 29%" by tensor bytes
    perplexity: float
    convert_s: float
    perplexity_s: float

    @property
    def bpw(self) -> float:
        return 8 * self.tensor_bytes / self.n_params


def make_imatrix(f16: Path, out: Path, threads: int | None = None) -> dict:
    """The same calibration convert(imatrix="auto") uses: 400k characters of the train split, 100 chunks of 512."""
    from edgelm import corpus
    from edgelm.converters.imatrix import compute_imatrix, save_imatrix

    t0 = time.perf_counter()
    im = compute_imatrix(f16, corpus.text("train", max_chars=400_000), chunk_size=512, max_chunks=100,
                         n_threads=threads, dataset="edgelm-corpus:train[:400000]")
    save_imatrix(im, out)
    return {"path": str(out), "chunks": im.chunks, "chunk_size": im.chunk_size, "tensors": len(im.sums),
            "seconds": time.perf_counter() - t0}


def build_and_measure(variants, imatrix_path: Path | None, heldout: str, threads: int | None = None) -> list[Row]:
    from edgelm.commands.perplexity import perplexity
    from edgelm.converters import convert
    from edgelm.gguf_reader import read_gguf

    rows = []
    for label, outtype, quant, weighted in variants:
        name = label + ("+imatrix" if weighted else "")
        path = OUT / f"small-{name}.gguf"
        t0 = time.perf_counter()
        convert(HF_DIR, path, outtype=outtype, quant=quant, imatrix=imatrix_path if weighted else None,
                name=f"edgelm-small-{name}", progress=False)
        convert_s = time.perf_counter() - t0
        g = read_gguf(path)
        total = g.n_tensor_bytes
        types = ", ".join(f"{t} {100 * b / total:.0f}%" for t, b in g.bytes_by_type().items() if b / total >= 0.005)
        t0 = time.perf_counter()
        ppl = perplexity(str(path), heldout, window=WINDOW, n_threads=threads)["perplexity"]
        rows.append(Row(name, weighted, str(path.relative_to(ROOT)), path.stat().st_size, total, g.n_parameters,
                        types, ppl, convert_s, time.perf_counter() - t0))
        log(f"{name:18s} {rows[-1].bpw:5.2f} bpw  ppl {ppl:8.3f}  ({convert_s:.1f} s + {rows[-1].perplexity_s:.1f} s)")
    return rows


def diagnose(rows: list[Row], threads: int | None = None) -> list[dict]:
    """Where the imatrix made held-out perplexity worse: is it the held-out text, or the calibration itself?

    The same GGUFs are scored on the first 120k characters of the calibration text and on 120k
    training characters the imatrix never saw (characters 400k-520k of the train split).
    """
    from edgelm import corpus
    from edgelm.commands.perplexity import perplexity

    train = corpus.text("train", max_chars=520_000)
    texts = {"calibration text (train[:120k])": train[:120_000], "unseen train text (train[400k:520k])": train[400_000:]}
    by_label = {r.label: r for r in rows}
    worse = [r for r in rows if not r.imatrix and r.label + "+imatrix" in by_label
             and by_label[r.label + "+imatrix"].perplexity > r.perplexity * 1.0005]
    if not worse:
        return []
    f16 = by_label["f16"]
    ppl = lambda path, text: perplexity(str(ROOT / path), text, window=WINDOW, n_threads=threads)["perplexity"]  # noqa: E731
    base = {k: ppl(f16.path, t) for k, t in texts.items()}
    out = []
    for r in worse:
        w = by_label[r.label + "+imatrix"]
        for k, t in texts.items():
            out.append({"type": r.label, "text": k,
                        "plain": ppl(r.path, t) / base[k] - 1, "imatrix": ppl(w.path, t) / base[k] - 1})
        out.append({"type": r.label, "text": "held-out", "plain": r.perplexity / f16.perplexity - 1,
                    "imatrix": w.perplexity / f16.perplexity - 1})
        log(f"diagnosis {r.label}: " + ", ".join(f"{d['text']} {100 * d['plain']:+.2f}% -> {100 * d['imatrix']:+.2f}%"
                                                  for d in out[-3:]))
    return out


def _scheme_notes(checks: list[dict], edgelm_scored: int) -> list[str]:
    out = []
    for c in checks:
        if c["model"] != checks[0]["model"]:
            break
        rel = 100 * (c["llama"] / c["edgelm_own"] - 1)
        if "stride" in c["scheme"]:
            out.append(f"- `--ppl-stride` ({rel:+.2f}% against edgelm): the same windows, so every token both score gets "
                       f"the same logits; it scores {c['scored']:,} tokens, edgelm {edgelm_scored:,}. The difference is "
                       "exactly the extra tokens edgelm scores: the first window's first half, read with little context, "
                       "and the tail after the last whole window.")
        else:
            out.append(f"- the chunked default ({rel:+.2f}% against edgelm): only the second half of each chunk, about half "
                       "of the tokens and a different sample of them, each chunk restarted with a BOS inserted in the "
                       "middle of a document.")
    return out


def _diagnosis_conclusion(diagnosis: list[dict]) -> list[str]:
    calib = [d for d in diagnosis if d["text"].startswith("calibration")]
    if all(d["imatrix"] > d["plain"] for d in calib):
        return ["The imatrix loses even on the text it was computed from, so the held-out split is not the cause:",
                "llama.cpp's imatrix-weighted search for these types does not pay off on this model.",
                "`benchmarks/check_imatrix_compat.py` shows that edgelm's imatrix gives byte-identical quantizations",
                "with llama.cpp's own tools, so this is llama.cpp's behaviour at this model size, not edgelm's."]
    return ["The imatrix helps on its own calibration text but not on unseen text: it fits the calibration sample",
            "more than the model's general behaviour; more or more varied calibration text is the remedy."]


def plot(rows: list[Row], path: Path) -> None:
    """Two panels of bits per weight against perplexity over f16: every variant, and the crowded 4-7 bpw range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f16 = next(r for r in rows if r.label == "f16")
    pct = lambda r: 100 * (r.perplexity / f16.perplexity - 1)  # noqa: E731
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), dpi=120, gridspec_kw={"width_ratios": [1, 1.3]})
    zoom = [r for r in rows if 4.0 <= r.bpw <= 7.0]
    for ax, pts_all, title in ((axes[0], rows, "all variants"), (axes[1], zoom, "4 to 7 bits per weight")):
        for weighted, marker, label in ((False, "o", "no imatrix"), (True, "^", "imatrix (train split)")):
            pts = [r for r in pts_all if r.imatrix == weighted]
            ax.scatter([r.bpw for r in pts], [pct(r) for r in pts], marker=marker, s=45, label=label, zorder=3)
            for r in pts:
                if ax is axes[0] and 4.0 <= r.bpw <= 7.0:
                    continue  # labelled in the zoom
                # imatrix labels above right, plain ones below left, so pairs at one size stay readable;
                # a type with no plain twin takes the free side below left
                name = r.label.replace("+imatrix", "")
                alone = weighted and not any(o.label == name for o in rows)
                ax.annotate(name, (r.bpw, pct(r)), textcoords="offset points",
                            xytext=(-4, -13) if alone else (6, 4) if weighted else (-6, -11),
                            ha="left" if weighted and not alone else "right", fontsize=8)
        ax.axhline(0, color="grey", linestyle="--", linewidth=1, label=f"f16 (perplexity {f16.perplexity:.2f})")
        ax.set_xlabel("bits per weight (tensor bytes × 8 / parameters)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("held-out perplexity over f16 (%, lower is better)")
    axes[0].axvspan(4.0, 7.0, color="grey", alpha=0.08)
    axes[0].set_xlim(min(r.bpw for r in rows) - 1.2, max(r.bpw for r in rows) + 0.8)  # room for the edge labels
    axes[1].legend(loc="upper right")
    fig.suptitle(f"edgelm-small ({f16.n_params / 1e6:.1f}M parameters): size against quality")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)

def reading(rows: list[Row]) -> list[str]:
    """A few sentences computed from the rows, so that a rerun cannot leave the prose behind."""
    f16 = next(r for r in rows if r.label == "f16")
    cost = lambda r: 100 * (r.perplexity / f16.perplexity - 1)  # noqa: E731
    above4 = [r for r in rows if r.label != "f16" and r.bpw >= 4.5]
    worst4 = max(above4, key=cost)
    pairs = [(r, next((w for w in rows if w.label == r.label + "+imatrix"), None)) for r in rows if not r.imatrix]
    pairs = [(a, b) for a, b in pairs if b is not None]
    out = [f"- Down to 4.5 bits per weight every variant stays within {cost(worst4):+.2f}% of f16's perplexity "
           f"(worst: {worst4.label}). These percentages belong to this 16.8M-parameter model trained for about one "
           "epoch; they are not what a production model loses at the same bits."]
    if pairs:
        effect = {a.label: 100 * (b.perplexity / a.perplexity - 1) for a, b in pairs}
        out.append("- Effect of the imatrix on held-out perplexity, same type (negative is better): "
                   + ", ".join(f"{k} {v:+.2f}%" for k, v in effect.items()) + ".")
        small = [k for k, v in effect.items() if abs(v) < 0.05]
        worse = [k for k, v in effect.items() if v >= 0.05]
        better = [k for k, v in effect.items() if v <= -0.05]
        if small:
            out.append(f"  Within ±0.05% ({', '.join(small)}) the effect is smaller than what a single rounding choice "
                       "moves and its sign means little.")
        if better:
            out.append(f"  It helps {', '.join(better)}.")
        if worse:
            out.append(f"  It hurts {', '.join(worse)}; see the next section for whether that is the calibration.")
    low = [r for r in rows if r.bpw < 4.0]
    if low:
        out.append("- Below 4 bits: " + ", ".join(f"{r.label} {r.bpw:.2f} bpw {cost(r):+.1f}%" for r in low) + ".")
    return out


def render(rows: list[Row], imatrix: dict, checks: list[dict], meta: dict, diagnosis: list[dict] | None = None) -> str:
    f16 = next(r for r in rows if r.label == "f16")
    table = markdown_table(
        ["variant", "imatrix", "file bytes", "bits/weight", "held-out PPL", "PPL / f16", "tensor types (by bytes)"],
        [[r.label.replace("+imatrix", ""), "yes" if r.imatrix else "no", f"{r.file_bytes:,}", f"{r.bpw:.2f}",
          f"{r.perplexity:.3f}", f"{r.perplexity / f16.perplexity:.4f}", r.types] for r in rows],
        "llrrrrl")
    out = [
        "# Quantization: size against quality",
        "",
        f"Every quantization of the small reference model (`models/small`, {f16.n_params:,} parameters), made by",
        "`edgelm.converters.convert` and measured by edgelm's own perplexity on the corpus's held-out split.",
        "",
        "![bits per weight against held-out perplexity](img/quantization.png)",
        "",
        table,
        "",
        "## Method",
        "",
        "- **Conversion**: `convert(\"models/small\", out, outtype=..., quant=..., imatrix=PATH or None)`. f16 and q8_0",
        "  are written by edgelm's exporter; every other type by llama.cpp's `llama_model_quantize` from the f16 GGUF",
        "  (k-quant mixes such as `_m` are llama.cpp's choice of per-tensor types, listed in the last column). That",
        "  choice depends on whether an imatrix is given (llama.cpp src/llama-quant.cpp): with one, q4_0 keeps the",
        "  first eighth of the layers' `ffn_down` in q4_1; without one, iq4_xs puts them in q5_K. Hence the slightly",
        "  different sizes of those pairs.",
        f"- **Importance matrix**: computed once ({imatrix['chunks']} chunks of {imatrix['chunk_size']} tokens, "
        f"{imatrix['tensors']} weight matrices) from",
        "  the first 400,000 characters of the *training* split, the calibration `--imatrix auto` uses, on the f16",
        "  GGUF; saved with `save_imatrix` and passed by path to every `+imatrix` variant. The held-out text never",
        "  enters it.",
        "- **Bits per weight**: tensor bytes × 8 / all parameters in the file (norms and embeddings included); the",
        "  file size adds the header, metadata and vocabulary.",
        f"- **Perplexity**: `edgelm perplexity MODEL heldout` (edgelm/runtime/perplexity.py): windows of {WINDOW} tokens",
        f"  every {WINDOW // 2}, every held-out token after the first scored exactly once "
        f"({meta['heldout_tokens']:,} tokens). Deterministic: a rerun gives the same digits.",
        "- **Lower is better**; the ratio is to f16 on the same text and windows.",
        "",
        "## Reading the table",
        "",
        *reading(rows),
        "",
    ]
    if diagnosis:
        out += ["### Where the imatrix made things worse", "",
                "The same files scored on the calibration text itself and on training text the imatrix never saw",
                "(the script's diagnosis step): change of perplexity against f16 on the same text.", "",
                markdown_table(["type", "text", "no imatrix", "imatrix"],
                               [[d["type"], d["text"], f"{100 * d['plain']:+.2f}%", f"{100 * d['imatrix']:+.2f}%"]
                                for d in diagnosis], "llrr"), "",
                *_diagnosis_conclusion(diagnosis), ""]
    if checks:
        out += ["## Cross-check against llama.cpp's llama-perplexity", "",
                "llama-perplexity scores other tokens than edgelm does (see `benchmarks/ppl_crosscheck.py`): by default",
                "non-overlapping 512-token chunks whose first token is replaced by BOS, only the second half of each",
                "scored, the tail dropped; with `--ppl-stride` windows every S tokens scoring their last S. So each",
                "scheme is also computed from edgelm's own llama.cpp context; matching digits there mean the logits",
                "agree and the headline difference is the scheme alone.", "",
                markdown_table(["model", "scheme", "tokens scored", "llama-perplexity", "edgelm, same scheme",
                                "difference", "edgelm's own scheme"],
                               [[c["model"], c["scheme"], f"{c['scored']:,}", f"{c['llama']:.4f}",
                                 f"{c['edgelm_same_scheme']:.4f}",
                                 f"{100 * (c['edgelm_same_scheme'] / c['llama'] - 1):+.3f}%", f"{c['edgelm_own']:.4f}"]
                                for c in checks], "llrrrrr"), "",
                "llama-perplexity prints 4 decimals (a ±0.00005 rounding); the edgelm runtime reproduces both of its",
                "schemes to every printed digit. The headline numbers differ by which tokens are scored and with what context:",
                *_scheme_notes(checks, meta["heldout_tokens"] - 1), "",
                "Commands (cwd: repository root):", "", "```bash",
                *dict.fromkeys(c["cmd"] for c in checks), "```", ""]
    else:
        out += ["(llama-perplexity is not built, so the cross-check was skipped: run scripts/build_llama_tools.sh.)", ""]
    out += [
        "## Machine and run",
        "",
        f"- {meta['machine']}",
        f"- {meta['date']}, llama-cpp-python {meta['llama_cpp_python']}, script wall time {meta['seconds'] / 60:.1f} min "
        f"(imatrix {imatrix['seconds']:.0f} s), {meta.get('threads', 2)} llama.cpp thread(s). Sizes and perplexities depend",
        "  neither on load nor on the thread count (f16 gives 71.6565 on 1 and on 2 threads); times would.",
        f"- Code measured: `converters/*.py` + `edgelm/runtime/*.py` sha256 {meta['code']}… (`common.source_digest`).",
        "",
        "## Regenerate",
        "",
        "```bash",
        f".venv/bin/python {meta.get('command', 'benchmarks/quant_report.py')}   # files under .bench/quant/",
        "```",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-cross-check", action="store_true", help="skip llama-perplexity")
    p.add_argument("--threads", type=int, help="threads for llama.cpp (default: every core; 1 is faster on a busy "
                   "machine, where spinning threads wait for each other; results do not depend on it)")
    p.add_argument("--doc", type=Path, default=DOCS / "quantization.md")
    p.add_argument("--img", type=Path, default=DOCS / "img" / "quantization.png")
    p.add_argument("--no-diagnose", dest="diagnose", action="store_false",
                   help="skip scoring, where the imatrix made perplexity worse, those files on training text")
    p.add_argument("--render-only", action="store_true",
                   help="rewrite the report and plot from .bench/quant/results.json without measuring again")
    args = p.parse_args(argv)
    if args.render_only:
        saved = json.loads((OUT / "results.json").read_text())
        saved["meta"].setdefault("command", f"benchmarks/quant_report.py --threads {saved['meta']['threads']}")
        rows = [Row(**{k: v for k, v in r.items() if k != "bpw"}) for r in saved["rows"]]
        if args.diagnose:
            saved["diagnosis"] = diagnose(rows, args.threads)
            (OUT / "results.json").write_text(json.dumps(saved, indent=1))
        plot(rows, args.img)
        args.doc.write_text(render(rows, saved["imatrix"], saved["cross_check"], saved["meta"], saved.get("diagnosis")),
                            encoding="utf-8")
        return 0

    import llama_cpp

    from edgelm import corpus
    from edgelm.runtime.context import default_threads

    t_start = time.perf_counter()
    meta = {"machine": machine(), "date": today(), "llama_cpp_python": llama_cpp.__version__,
            "code": source_digest("converters", "edgelm/runtime"), "threads": args.threads or default_threads(),
            "command": " ".join(["benchmarks/quant_report.py", *(sys.argv[1:] if argv is None else argv)])}
    OUT.mkdir(parents=True, exist_ok=True)
    heldout = corpus.text("heldout")
    heldout_file = OUT / "heldout.txt"
    heldout_file.write_text(heldout, encoding="utf-8")

    rows = build_and_measure(VARIANTS[:1], None, heldout, args.threads)  # f16 first: the imatrix runs on it
    imatrix = make_imatrix(OUT / "small-f16.gguf", OUT / "imatrix-train.gguf", args.threads)
    log(f"imatrix: {imatrix['chunks']} chunks, {imatrix['tensors']} tensors, {imatrix['seconds']:.1f} s")
    rows += build_and_measure(VARIANTS[1:], Path(imatrix["path"]), heldout, args.threads)

    from edgelm.runtime.model import LlamaModel

    with LlamaModel(OUT / "small-f16.gguf") as llama:
        meta["heldout_tokens"] = len(llama.tokenize(heldout))
    checks = []
    if not args.no_cross_check and have_tool("llama-perplexity"):
        from ppl_crosscheck import cross_check

        for label, strided in CROSS_CHECK.items():
            row = next(r for r in rows if r.label == label)
            for c in cross_check(ROOT / row.path, heldout, heldout_file, row.perplexity, WINDOW, strided, args.threads):
                checks.append({"model": label, **c})
                log(f"cross-check {label}: {c['scheme']}: llama {c['llama']:.4f}, edgelm {c['edgelm_same_scheme']:.4f}")
    diagnosis = diagnose(rows, args.threads) if args.diagnose else None
    meta["seconds"] = time.perf_counter() - t_start
    plot(rows, args.img)
    args.doc.write_text(render(rows, imatrix, checks, meta, diagnosis), encoding="utf-8")
    (OUT / "results.json").write_text(json.dumps(
        {"meta": meta, "imatrix": imatrix, "rows": [asdict(r) | {"bpw": r.bpw} for r in rows], "cross_check": checks,
         "diagnosis": diagnosis}, indent=1))
    log(f"wrote {args.doc} and {args.img} in {meta['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
