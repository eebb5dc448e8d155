"""Pruning: the `edgelm prune` pipeline stage. A Hugging Face checkpoint in, a smaller standard one out,
with a report of what each step cost.

Steps run in a fixed order, each on statistics calibrated afresh from the model the previous
step left (llama.cpp's eval callback over the calibration text, converters/calibrate.py):
depth (ShortGPT block influence, or measured perplexity impact) → attention heads → FFN channels
(Minitron activation importance) → hidden size (SliceGPT) → tied embeddings → unstructured sparsity.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from edgelm.errors import ConversionError

from .export import check_new_folder
from .surgery import (Weights, attn, drop_layers, fold_norms, keep_ffn_channels, keep_heads, mlp, principal_basis,
                      rotate_hidden, sparsify, tie_embeddings)

if TYPE_CHECKING:
    from .calibrate import Calibration

AUTO = "auto"
WIDTH_MULTIPLE = 32  # llama.cpp's quant blocks: widths stay multiples of 32 so every type applies


@dataclass
class PruneOptions:
    drop_layers: int | str | None = None  # layers to remove, or "auto"
    depth_metric: str = "influence"  # "influence" (ShortGPT) or "perplexity" (measured, one layer at a time)
    ffn_keep: float | str | None = None  # share of FFN channels kept, or "auto"
    heads_keep: float | str | None = None  # share of query heads kept (whole GQA groups), or "auto"
    hidden_keep: float | str | None = None  # share of hidden dimensions kept (SliceGPT), or "auto"
    tie_embeddings: str | None = None  # "auto": tie when perplexity stays within budget; "always"
    target_params: int | None = None  # the "auto" methods share one keep ratio chosen to land at or under this
    sparsity: float | None = None  # unstructured: zeroes weights, does not shrink the GGUF or speed it up
    sparsity_method: str = "wanda"
    trim_vocab: str | None = None  # keep only the tokens this text file ("calib": the calibration text) uses
    trim_min_count: int = 1
    max_ppl_increase: float = 0.10  # the probe-perplexity budget of auto depth (without a target) and auto tying
    report_quant: str = "q8_0"  # the GGUF type the report's bytes, perplexity and speed are measured at
    calib_chunks: int = 16  # calibration chunks of 256 tokens
    n_threads: int | None = None

    def validate(self) -> None:
        for name in ("ffn_keep", "heads_keep", "hidden_keep"):
            value = getattr(self, name)
            if value is not None and value != AUTO and not (isinstance(value, (int, float)) and 0 < value <= 1):
                raise ConversionError(f"--{name.replace('_', '-')} must be in (0, 1] or 'auto', not {value!r}")
        if self.drop_layers is not None and self.drop_layers != AUTO and (
                not isinstance(self.drop_layers, int) or self.drop_layers < 0):
            raise ConversionError(f"--drop-layers must be a count >= 0 or 'auto', not {self.drop_layers!r}")
        if self.tie_embeddings not in (None, AUTO, "always"):
            raise ConversionError(f"--tie-embeddings must be 'auto' or 'always', not {self.tie_embeddings!r}")
        if self.depth_metric not in ("influence", "perplexity"):
            raise ConversionError(f"--depth-metric must be 'influence' or 'perplexity', not {self.depth_metric!r}")
        if self.sparsity is not None and not 0 < self.sparsity < 1:
            raise ConversionError(f"--sparsity must be in (0, 1), not {self.sparsity}")
        if self.target_params is not None and self.target_params <= 0:
            raise ConversionError(f"--target-params must be positive, not {self.target_params}")
        if self.trim_vocab not in (None, "calib") and not Path(self.trim_vocab).is_file():
            raise ConversionError(f"--trim-vocab {self.trim_vocab}: no such text file")
        autos = [n for n in ("ffn_keep", "heads_keep", "hidden_keep") if getattr(self, n) == AUTO]
        if autos and self.target_params is None:
            raise ConversionError(f"--{autos[0].replace('_', '-')} auto needs --target-params")


@dataclass
class Step:
    name: str
    detail: str
    n_params: int
    gguf_bytes: int
    perplexity: float
    tokens_per_second: float


@dataclass
class PruneReport:
    source: str
    output: str
    quant: str
    options: dict
    steps: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # steps asked for but not taken, and why

    def table(self) -> str:
        base = self.steps[0]
        lines = [f"| step | change | parameters | GGUF {self.quant} | held-out ppl | tokens/s |",
                 "|---|---|---:|---:|---:|---:|"]
        for s in self.steps:
            lines.append(f"| {s.name} | {s.detail} | {s.n_params / 1e6:.2f}M ({s.n_params / base.n_params:.0%}) | "
                         f"{s.gguf_bytes / 1e6:.1f} MB | {s.perplexity:.2f} | {s.tokens_per_second:.0f} |")
        return "\n".join(lines + [f"\n{n}" for n in self.notes])

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


class _Workspace:
    """Temporary GGUFs of the model between steps: f32 for calibration, the report type for measuring."""

    def __init__(self, options: PruneOptions, calib: str, heldout: str):
        self.options, self.calib, self.heldout = options, calib, heldout
        self.dir = Path(tempfile.mkdtemp(prefix="edgelm-prune-"))
        self.n = 0
        self.saved: tuple[Weights, Path] | None = None  # the last weights written, and where

    def checkpoint(self, w: Weights) -> Path:
        """`w` written once: measuring and calibrating the same weights convert from one folder."""
        if self.saved is None or self.saved[0] is not w:
            if self.saved is not None:
                shutil.rmtree(self.saved[1])
            self.n += 1
            self.saved = (w, w.save(self.dir / f"ckpt{self.n}"))
        return self.saved[1]

    def gguf(self, w: Weights, outtype: str = "f32") -> Path:
        from .convert import convert

        self.n += 1
        quant = None if outtype in ("f32", "f16", "q8_0") else outtype
        return convert(self.checkpoint(w), self.dir / f"m{self.n}.gguf", outtype="f16" if quant else outtype,
                       quant=quant, progress=False).path

    def calibrate(self, w: Weights) -> "Calibration":
        from .calibrate import compute_calibration

        path = self.gguf(w)
        try:
            return compute_calibration(path, self.calib, max_chunks=self.options.calib_chunks,
                                       n_threads=self.options.n_threads)
        finally:
            path.unlink()

    def perplexity(self, w: Weights, text: str, outtype: str = "f32") -> float:
        from edgelm.commands.perplexity import perplexity

        path = self.gguf(w, outtype)
        try:
            return perplexity(path, text, n_threads=self.options.n_threads)["perplexity"]
        finally:
            path.unlink()

    def measure(self, name: str, detail: str, w: Weights) -> Step:
        path = self.gguf(w, self.options.report_quant)
        try:
            return measure_gguf(name, detail, path, self.heldout, self.options.n_threads)
        finally:
            path.unlink()

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def measure_gguf(name: str, detail: str, path: Path, heldout: str, n_threads: int | None) -> Step:
    """A report row for a GGUF: parameters, bytes, held-out perplexity and decode speed, all from llama.cpp."""
    from edgelm.commands.bench import bench
    from edgelm.commands.perplexity import perplexity

    ppl = perplexity(path, heldout, n_threads=n_threads)["perplexity"]
    speed = bench(str(path), n_prompt=16, n_gen=64, repetitions=2, n_threads=n_threads)
    return Step(name, detail, speed["n_params"], path.stat().st_size, round(ppl, 3), speed["tg64"])


# ---------------------------------------------------------------- choosing what to keep
def _width(n: int, keep: float) -> int:
    """round(n * keep) to a multiple of 32 where n allows it, and at least one."""
    if keep >= 1.0:
        return n
    m = WIDTH_MULTIPLE if n >= 2 * WIDTH_MULTIPLE else 1
    return max(m, int(round(n * keep / m)) * m)


def head_layout(n_head: int, n_kv: int, keep: float) -> tuple[int, int]:
    """(KV groups, query heads per group) for keeping `keep` of the query heads with GQA groups whole:
    fewer heads per group when that divides evenly, else fewer whole groups."""
    group = n_head // n_kv
    want = n_head * keep
    if abs(want - round(want)) > 1e-6:
        raise ConversionError(f"--heads-keep {keep} keeps {want:g} of {n_head} query heads, not a whole number")
    want = int(round(want))
    if want % n_kv == 0:
        return n_kv, want // n_kv
    if want % group == 0:
        return want // group, group
    valid = sorted({n_kv * g for g in range(1, group + 1)} | {k * group for k in range(1, n_kv + 1)})
    raise ConversionError(f"--heads-keep {keep} keeps {want} of {n_head} query heads, which breaks the "
                          f"{n_kv} GQA groups of {group}; valid head counts: {', '.join(map(str, valid))} "
                          f"(--heads-keep {', '.join(f'{v / n_head:g}' for v in valid)})")


def _floor_head_keep(n_head: int, n_kv: int, keep: float) -> float:
    """The largest valid head share at or under `keep` (for auto ratios)."""
    group = n_head // n_kv
    valid = sorted({n_kv * g for g in range(1, group + 1)} | {k * group for k in range(1, n_kv + 1)})
    return max([v for v in valid if v <= n_head * keep + 1e-9] or [valid[0]]) / n_head


def ffn_importance(w: Weights, cal: "Calibration") -> list[np.ndarray]:
    """Per layer, each FFN channel's expected contribution: activation RMS × its down-projection column norm."""
    return [cal.rms(f"blk.{i}.ffn_down.weight") * np.linalg.norm(w.tensors[mlp(i, "down_proj")], axis=0)
            for i in range(w.n_layer)]


def head_importance(w: Weights, cal: "Calibration") -> list[np.ndarray]:
    """Per layer, each query head's output size: √Σ over its channels of (activation RMS × o_proj column norm)²."""
    out = []
    for i in range(w.n_layer):
        contrib = cal.rms(f"blk.{i}.attn_output.weight") * np.linalg.norm(w.tensors[attn(i, "o_proj")], axis=0)
        out.append(np.sqrt((contrib.reshape(w.n_head, w.head_dim) ** 2).sum(axis=1)))
    return out


@dataclass
class Plan:
    n_drop: int = 0
    heads: tuple[int, int] | None = None  # (KV groups, query heads per group)
    ffn: int | None = None
    hidden: int | None = None
    tie: bool = False

    def config(self, w: Weights) -> dict:
        c = dict(w.config, num_hidden_layers=w.n_layer - self.n_drop)
        if self.heads:
            c |= {"num_key_value_heads": self.heads[0], "num_attention_heads": self.heads[0] * self.heads[1],
                  "head_dim": w.head_dim}
        if self.ffn:
            c["intermediate_size"] = self.ffn
        if self.hidden:
            c |= {"hidden_size": self.hidden, "head_dim": w.head_dim, "tie_word_embeddings": False}
        if self.tie:
            c["tie_word_embeddings"] = True
        return c


def make_plan(w: Weights, o: PruneOptions) -> Plan:
    """Concrete sizes for every step; "auto" methods share the largest keep ratio that meets --target-params."""
    o.validate()
    auto = {n for n in ("drop_layers", "ffn_keep", "heads_keep", "hidden_keep") if getattr(o, n) == AUTO}
    if o.target_params is not None and not auto:
        if any(getattr(o, n) is not None for n in ("drop_layers", "ffn_keep", "heads_keep", "hidden_keep")):
            raise ConversionError("--target-params needs at least one method set to auto (or none given)")
        auto = {"ffn_keep", "hidden_keep"}  # width before depth, as Minitron found

    def plan_for(r: float | None) -> Plan:
        def pick(name):
            return r if name in auto else getattr(o, name)

        p = Plan(tie=o.tie_embeddings == "always")
        drop = pick("drop_layers")
        if isinstance(drop, float):
            drop = w.n_layer - max(1, int(round(drop * w.n_layer)))
        p.n_drop = 0 if drop in (None, AUTO) else drop
        if (h := pick("heads_keep")) is not None and h < 1:
            keep = _floor_head_keep(w.n_head, w.n_head_kv, h) if "heads_keep" in auto else h
            p.heads = head_layout(w.n_head, w.n_head_kv, keep)
        if (f := pick("ffn_keep")) is not None and f < 1:
            p.ffn = _width(w.config["intermediate_size"], f)
        if (k := pick("hidden_keep")) is not None and k < 1:
            p.hidden = _width(w.config["hidden_size"], k)
        return p

    if o.target_params is None:
        plan = plan_for(None)
    else:
        if o.target_params >= w.n_params:
            raise ConversionError(f"--target-params {o.target_params:,} is not below the model's {w.n_params:,}")
        lo, hi = 0.0, 1.0  # bisect the shared keep ratio: parameters grow with it
        if w.predicted_params(plan_for(1e-6).config(w)) > o.target_params:
            smallest = w.predicted_params(plan_for(1e-6).config(w))
            raise ConversionError(f"--target-params {o.target_params:,} is out of reach with "
                                  f"{', '.join(sorted(auto))}: the smallest such model has {smallest:,}")
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if w.predicted_params(plan_for(mid).config(w)) <= o.target_params else (lo, mid)
        plan = plan_for(max(lo, 1e-6))
    if plan.n_drop >= w.n_layer:
        raise ConversionError(f"--drop-layers {plan.n_drop} would remove every one of the {w.n_layer} layers")
    return plan


# ---------------------------------------------------------------- the stage
def prune(hf_dir: str | Path, out_dir: str | Path, *, calib: str | None = None, heldout: str | None = None,
          options: PruneOptions | None = None, log: Callable[[str], None] | None = None) -> PruneReport:
    """Prune the checkpoint at `hf_dir` into a new checkpoint folder `out_dir` (with prune_report.json/.md).

    `calib` is calibration text (default: the reference corpus's training split), `heldout` the text
    the report measures perplexity on (default: its held-out split).
    """
    from edgelm import corpus

    o = options or PruneOptions()
    log = log or (lambda s: None)
    out = Path(out_dir)
    check_new_folder(out)  # before any long work
    o.validate()  # before the weights load
    w = Weights.load(hf_dir)
    plan = make_plan(w, o)
    calib = calib if calib is not None else corpus.text("train", max_chars=300_000)
    heldout = heldout if heldout is not None else corpus.text("heldout", max_chars=40_000)
    report = PruneReport(str(hf_dir), str(out), o.report_quant, asdict(o))
    ws = _Workspace(o, calib, heldout)
    try:
        def step(name: str, detail: str, new: Weights) -> Weights:
            report.steps.append(ws.measure(name, detail, new))
            log(f"{name}: {detail}: {report.steps[-1].n_params / 1e6:.2f}M parameters, "
                f"held-out ppl {report.steps[-1].perplexity:.2f}")
            return new

        step("original", f"{w.n_layer} layers, hidden {w.config['hidden_size']}", w)
        if plan.n_drop or o.drop_layers == AUTO:
            w = step("depth", *_prune_depth(w, plan.n_drop, o, ws))
        if plan.heads:
            kv, per = plan.heads
            cal = ws.calibrate(w)
            w = step("heads", f"{w.n_head}→{kv * per} query heads, {w.n_head_kv}→{kv} KV groups",
                     _prune_heads(w, cal, kv, per))
        if plan.ffn:
            cal = ws.calibrate(w)
            keep = [np.argsort(s)[::-1][:plan.ffn] for s in ffn_importance(w, cal)]
            w = step("ffn", f"FFN {w.config['intermediate_size']}→{plan.ffn} channels", keep_ffn_channels(w, keep))
        if plan.hidden:
            cal = ws.calibrate(w)
            basis = principal_basis(cal.covariance)[:, :plan.hidden]
            kept = np.linalg.eigvalsh(cal.covariance)[::-1][:plan.hidden].sum() / np.trace(cal.covariance)
            w = step("hidden", f"hidden {w.config['hidden_size']}→{plan.hidden} ({kept:.1%} of the variance)",
                     rotate_hidden(fold_norms(w), basis))
        if o.tie_embeddings and not w.tied:
            detail, tied = _tie(w, ws, o)
            w = step("tie", detail, tied) if tied is not None else w
            if tied is None:
                report.notes.append(f"tie: skipped, {detail}")
                log(report.notes[-1])
        if o.trim_vocab:
            from .vocab_trim import trim_vocab

            domain = calib if o.trim_vocab == "calib" else _read_text(o.trim_vocab)
            n_vocab = w.config["vocab_size"]
            trimmed, files = trim_vocab(w, domain, min_count=o.trim_min_count)
            trimmed.files = files
            w = step("vocab", f"vocabulary {n_vocab}→{trimmed.config['vocab_size']} tokens (those the domain text "
                     f"uses, the byte alphabet, specials and merge ancestors)", trimmed)
            report.notes.append("vocab: perplexity is per token of the trimmed tokenizer; text outside the domain "
                                "takes more, shorter tokens, so compare it with care")
        if o.sparsity:
            cal = ws.calibrate(w)
            rms = {n: cal.rms(g) for n, g in _linear_names(w).items()}
            w = step("sparsity", f"{o.sparsity:.0%} zeros ({o.sparsity_method}; same GGUF size and speed)",
                     sparsify(w, o.sparsity, o.sparsity_method, rms))
    finally:
        ws.close()
    w.save(out, extra_files={"prune_report.json": report.to_json(), "prune_report.md": report.table() + "\n"})
    return report


def _read_text(path: str) -> str:
    if not Path(path).is_file():
        raise ConversionError(f"--trim-vocab {path}: no such text file")
    return Path(path).read_text(encoding="utf-8", errors="replace")


def _prune_depth(w: Weights, n_drop: int, o: PruneOptions, ws: _Workspace) -> tuple[str, Weights]:
    """Drop the `n_drop` least important layers; with "auto" and no target, as many as the budget allows."""
    probe = ws.calib[:20_000]  # the perplexity probe: a few thousand tokens
    if o.depth_metric == "influence":
        order = list(np.argsort(ws.calibrate(w).influence))
        how = "lowest block influence"
    else:
        impact = [ws.perplexity(drop_layers(w, [i]), probe) for i in range(w.n_layer)]
        order = list(np.argsort(impact))
        how = "lowest perplexity impact"
    if o.drop_layers == AUTO and o.target_params is None:
        budget = ws.perplexity(w, probe) * (1 + o.max_ppl_increase)
        n_drop = 0
        while n_drop + 1 < w.n_layer and ws.perplexity(drop_layers(w, order[:n_drop + 1]), probe) <= budget:
            n_drop += 1
    dropped = sorted(int(i) for i in order[:n_drop])
    return f"dropped {n_drop} layers {dropped} ({how})", drop_layers(w, dropped)


def _prune_heads(w: Weights, cal: "Calibration", kv: int, per: int) -> Weights:
    group = w.n_head // w.n_head_kv
    kv_keep, q_keep = [], []
    for score in head_importance(w, cal):
        by_group = score.reshape(w.n_head_kv, group)
        groups = np.sort(np.argsort(by_group.sum(axis=1))[::-1][:kv])
        kv_keep.append(groups)
        q_keep.append([np.argsort(by_group[g])[::-1][:per] for g in groups])
    return keep_heads(w, kv_keep, q_keep)


def _tie(w: Weights, ws: _Workspace, o: PruneOptions) -> tuple[str, Weights | None]:
    """Tie with whichever matrix (embedding or head) leaves the lower probe perplexity; with "auto", only
    when that stays within the budget (an untied model trained apart rarely does before distillation)."""
    probe = ws.calib[:20_000]
    before = ws.perplexity(w, probe)
    tried = {src: tie_embeddings(w, src) for src in ("embedding", "head")}
    ppl = {src: ws.perplexity(t, probe) for src, t in tried.items()}
    best = min(ppl, key=ppl.get)
    worst = max(ppl, key=ppl.get)
    detail = f"tied to the {best}: probe ppl {before:.2f}→{ppl[best]:.2f} (the {worst}: {ppl[worst]:.2f})"
    if o.tie_embeddings == AUTO and ppl[best] > before * (1 + o.max_ppl_increase):
        return f"does not pay off: {detail}", None
    return detail, tried[best]


def _linear_names(w: Weights) -> dict[str, str]:
    """HF names of every layer's linear -> the GGUF weight names calibration keys them by."""
    gguf = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
            "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    out = {}
    for i in range(w.n_layer):
        for hf, g in gguf.items():
            out[attn(i, hf) if hf.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else mlp(i, hf)] = \
                f"blk.{i}.{g}.weight"
    return out

