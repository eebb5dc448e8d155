"""Exit analysis: how often would an exit at each layer agree with the full model, and what would it gain?

For every layer i the hidden state after it (graph node `l_out-{i}`) goes through the exit norm (the
final norm, or a trained one; after a trained exit block's FFN where there is one) and the output head, in
numpy from the GGUF's own weights; its argmax
is compared with the full model's, and its top probability kept. The speedup of an early-exit split at
k is then predicted by replaying the decode loop of edgelm.runtime.speculative over the calibration
positions (draft while the exit's top probability is at least the threshold, up to draft_max drafts;
keep drafts while they agree) with costs measured on real splits written to a temporary folder: R(k, n),
a whole round of n draft steps and the tail verifying n positions, and the full model's step F:

    speedup = tokens * F / sum over rounds of R(k, drafts + 1)

at the best threshold and draft length of a small grid.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp as lib
import numpy as np

from edgelm.errors import UsageError

from edgelm import native

from . import ggml
from .context import Context, ContextOptions
from .model import LlamaModel


@dataclass
class ExitReport:
    n_layer: int
    tokens: int
    agreement: list[float]  # per layer i (exit after layer i, i.e. k = i + 1)
    exits: list[str]  # layer i's exit: "final" (the final norm reused), "norm" (trained) or "block" (trained)
    full_ms: float = 0.0
    draft_ms: dict[int, float] = field(default_factory=dict)  # k -> what one more draft adds to a round
    round_ms: dict[int, dict[int, float]] = field(default_factory=dict)  # k -> n -> a round of n D steps + T(n)
    # k -> (predicted speedup, draft_max, threshold) of the best setting; (1.0, 0, 1.0): no setting gains
    speedup: dict[int, tuple[float, int, float]] = field(default_factory=dict)
    agrees: dict[int, np.ndarray] = field(default_factory=dict, repr=False)  # k -> per position: exit == full
    confidence: dict[int, np.ndarray] = field(default_factory=dict, repr=False)  # k -> per position: exit top p

    def best(self) -> int:
        """The exit layer k with the highest predicted speedup."""
        if not self.speedup:
            raise UsageError("no exit costs were measured")
        return max(self.speedup, key=lambda k: self.speedup[k][0])


THRESHOLDS = (0.3, 0.45, 0.6, 0.8)
DRAFT_MAXES = (2, 4, 8)


def replay(agrees: np.ndarray, confidence: np.ndarray, threshold: float, draft_max: int,
           round_ms: dict[int, float]) -> tuple[int, float]:
    """(tokens, milliseconds) of the gated draft-and-verify loop over a stream of positions, position p
    standing for the exit's prediction of token p + 1 (teacher-forced: the calibration text is the context)."""
    n, p, tokens, ms = len(agrees), 0, 0, 0.0
    while p < n:
        g = 0
        while g < draft_max and p + g < n and confidence[p + g] >= threshold:
            g += 1
        j = 0
        while j < g and agrees[p + j]:
            j += 1
        tokens += j + 1
        ms += round_ms[g + 1]
        p += j + 1
    return tokens, ms


class _Hidden:
    """A Python eval callback collecting every layer's output rows (analysis only, not the decode path)."""

    def __init__(self, n_layer: int):
        ggml.check_layout()
        self.rows: dict[int, list[np.ndarray]] = {i: [] for i in range(n_layer)}
        self.error: BaseException | None = None
        self.callback = lib.ggml_backend_sched_eval_callback(self._on_tensor)

    def _on_tensor(self, address: int, ask: bool, _user_data) -> bool:
        try:
            t = ggml.GGMLTensor.from_address(address)
            name = t.name.decode(errors="replace")
            if not name.startswith("l_out-"):
                return not ask
            if ask:
                return True
            self.rows[int(name[6:])].append(ggml.read_rows(t, address).copy())
            return True
        except BaseException as e:  # never let an exception cross the C boundary
            self.error = self.error or e
            return False


def _head_and_norm(path) -> tuple[np.ndarray, np.ndarray]:
    """The output head (token_embd when tied) and the final norm as float32, from one read of the GGUF."""
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}

    def dense(name: str) -> np.ndarray:
        t = tensors[name]
        return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(
            [int(x) for x in reversed(t.shape.tolist())])

    if "output_norm.weight" not in tensors or not {"output.weight", "token_embd.weight"} & set(tensors):
        raise UsageError(f"{path}: no output head or final norm to exit through")
    return dense("output.weight" if "output.weight" in tensors else "token_embd.weight"), dense("output_norm.weight")


def block_output(h: np.ndarray, block: dict[str, np.ndarray], eps: float) -> np.ndarray:
    """An exit block (converters.early_exit.EXIT_BLOCK_TENSORS) on hidden states h (n, n_embd): h + FFN(norm(h)),
    the residual SwiGLU FFN of a Llama block, before the block's exit norm."""
    x = _rms(h, eps) * block["ffn_norm"]
    gate, up = x @ block["ffn_gate"].T.astype(np.float32), x @ block["ffn_up"].T.astype(np.float32)
    return h + (gate / (1 + np.exp(-gate)) * up) @ block["ffn_down"].T.astype(np.float32)


def _rms(h: np.ndarray, eps: float) -> np.ndarray:
    return h / np.sqrt(np.mean(h * h, axis=1, keepdims=True) + eps)


def agreement(model_path, text: str, *, exit_norms: dict[int, np.ndarray] | None = None,
              exit_blocks: dict[int, dict[str, np.ndarray]] | None = None, max_tokens: int = 2048,
              n_ctx: int = 512, n_threads: int | None = None) -> ExitReport:
    """Per-layer agreement of exits with the full model's argmax over `text` (windows of n_ctx tokens); a layer
    with an exit block uses it (and its exit norm), else its trained exit norm, else the final norm."""
    model = LlamaModel(model_path)
    try:
        tokens = model.tokenize(text)[:max_tokens]
        if len(tokens) < 2:
            raise UsageError("calibration text too short: it needs at least 2 tokens")
        n_layer = model.n_layer
        exit_norms, exit_blocks = exit_norms or {}, exit_blocks or {}
        bad = [k for k in (*exit_norms, *exit_blocks) if not 1 <= k < n_layer]
        if bad:
            raise UsageError(f"exits for layers {bad}: exits lie in [1, {n_layer - 1}]")
        head, final_norm = _head_and_norm(model.path)
        eps = float(model.gguf.get(f"{model.architecture}.attention.layer_norm_rms_epsilon", 1e-5))
        hidden = _Hidden(n_layer)
        window = min(n_ctx, 512)
        ctx = Context(model, ContextOptions(n_ctx=window, n_batch=window, n_threads=n_threads),
                      eval_callback=hidden.callback)
        agree = np.zeros(n_layer)
        agrees = {i: [] for i in range(n_layer)}
        confidence = {i: [] for i in range(n_layer)}
        counted = 0
        try:
            for lo in range(0, len(tokens), window):
                chunk = tokens[lo:lo + window]
                ctx.clear()
                for rows in hidden.rows.values():
                    rows.clear()
                ctx.decode(chunk, 0, logits_from=0)
                if hidden.error is not None:
                    raise hidden.error
                target = ctx.all_logits(len(chunk)).argmax(axis=1)
                for i in range(n_layer):
                    h = np.concatenate(hidden.rows[i])[-len(chunk):]
                    block = exit_blocks.get(i + 1)
                    if block is not None:
                        h, norm = block_output(h, block, eps), block["output_norm"]
                    else:
                        norm = exit_norms.get(i + 1, final_norm)
                    logits = (_rms(h, eps) * norm) @ head.T
                    hit = logits.argmax(axis=1) == target
                    agree[i] += np.count_nonzero(hit)
                    agrees[i].append(hit)
                    confidence[i].append(native.confidence(np.ascontiguousarray(logits, np.float32)).max_prob)
                counted += len(chunk)
        finally:
            ctx.close()
        kinds = ["block" if k in exit_blocks else "norm" if k in exit_norms else "final" for k in range(1, n_layer + 1)]
        return ExitReport(n_layer, counted, list(agree / counted), kinds,
                          agrees={i + 1: np.concatenate(v) for i, v in agrees.items()},
                          confidence={i + 1: np.concatenate(v) for i, v in confidence.items()})
    finally:
        model.close()


def _time(fn, repeat: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat * 1e3


def measure_costs(model_path, report: ExitReport, layers: list[int], *, draft_max: int = 8,
                  n_threads: int | None = None, repeat: int = 40, rounds: int = 3,
                  exit_blocks: dict[int, dict[str, np.ndarray]] | None = None) -> None:
    """Time, for each k, whole rounds of the decode loop on a split written to a temporary folder: n draft
    steps, the tail verifying the n positions, the cut back to one new position (so positions advance as in
    decoding, past a 200-token prompt), for n = 1..draft_max + 1; alternating with the full model's decode
    step so that a shared machine's drift falls on both (medians over `rounds`); a layer with one of
    `exit_blocks` is timed with the block in its draft. Fills report.full_ms,
    draft_ms, round_ms and speedup (replay over the calibration positions; 1.0 when no setting gains)."""
    import statistics

    from edgelm.converters.early_exit import split_model

    from ..native import Capture
    from .splits import check_split

    prompt = [1 + i % 200 for i in range(200)]
    options = ContextOptions(n_ctx=len(prompt) + repeat + draft_max + 8, n_batch=128, n_threads=n_threads)
    start = len(prompt)
    fulls = []
    with tempfile.TemporaryDirectory(prefix="edgelm-exits-") as tmp:
        copy = Path(tmp) / "model.gguf"
        copy.symlink_to(Path(model_path).resolve())
        full = LlamaModel(copy)
        ctx = Context(full, options)
        ctx.decode(prompt, 0)

        def full_steps() -> float:
            t0 = time.perf_counter()
            for i in range(repeat):
                ctx.decode_one(5, start + i)
            ctx.remove(0, start)
            return (time.perf_counter() - t0) / repeat * 1e3

        try:
            for k in layers:
                paths = split_model(copy, k, exit_block=(exit_blocks or {}).get(k))
                # as the runtime reads it; the split was just written from `copy`, so no fingerprint check of it
                passthrough = check_split(None, paths).passthrough
                d = LlamaModel(paths.draft, parts=[paths.shared])
                t = LlamaModel(paths.tail, parts=[paths.shared])
                cap = Capture(f"l_out-{k - 1}", d.n_embd, options.n_batch)
                dc = Context(d, options, eval_callback=cap.callback, eval_user_data=cap.user_data)
                tc = Context(t, options, embd_input=True)
                try:
                    for lo in range(0, len(prompt), options.n_batch):
                        chunk = prompt[lo:lo + options.n_batch]
                        dc.decode(chunk, lo, logits_from=None if passthrough else 0)
                        tc.decode_embd(cap.take(len(chunk)), lo)

                    def rounds_of(n: int) -> float:
                        t0 = time.perf_counter()
                        for i in range(repeat):
                            pos = start + i
                            for j in range(n):
                                dc.decode_one(5, pos + j)
                                dc.logits()  # the loop reads each draft's exit logits
                            tc.decode_embd(cap.take(n), pos, logits_from=0)
                            tc.all_logits(n)
                            dc.remove(0, pos + 1)
                            tc.remove(0, pos + 1)
                        dc.remove(0, start)
                        tc.remove(0, start)
                        return (time.perf_counter() - t0) / repeat * 1e3

                    f_ms, r_ms = [], {n: [] for n in range(1, draft_max + 2)}
                    for _ in range(rounds):
                        f_ms.append(full_steps())
                        for n in r_ms:
                            r_ms[n].append(rounds_of(n))
                finally:
                    dc.close()
                    tc.close()
                    d.close()
                    t.close()
                for p in (paths.draft, paths.tail):
                    p.unlink()
                f = statistics.median(f_ms)
                fulls.append(f)
                report.round_ms[k] = {n: statistics.median(v) for n, v in r_ms.items()}
                report.draft_ms[k] = report.round_ms[k][2] - report.round_ms[k][1]  # one more draft step and row
                best = (1.0, 0, 1.0)
                for threshold in THRESHOLDS:
                    for g in (g for g in DRAFT_MAXES if g <= draft_max):
                        tokens, ms = replay(report.agrees[k], report.confidence[k], threshold, g, report.round_ms[k])
                        best = max(best, (tokens * f / ms, g, threshold))
                report.speedup[k] = best
        finally:
            ctx.close()
            full.close()
    report.full_ms = statistics.median(fulls) if fulls else 0.0


def load_exit_norms(path) -> dict[int, np.ndarray]:
    """Trained exit norms from a safetensors file: tensors `exit_norm.{k}.weight`."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such exit-heads file")
    out = {}
    for name, value in load_file(str(path)).items():
        parts = name.split(".")
        if len(parts) == 3 and parts[0] == "exit_norm" and parts[2] == "weight" and parts[1].isdigit():
            out[int(parts[1])] = np.asarray(value, dtype=np.float32)
    if not out:
        raise UsageError(f"{path}: holds no exit_norm.K.weight tensors")
    return out

