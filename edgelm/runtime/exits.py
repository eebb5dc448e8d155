"""Exit analysis: how often would an exit at each layer agree with the full model, and what would it gain?

For every layer i the hidden state after it (graph node `l_out-{i}`) goes through the exit norm (the
final norm, or a trained one) and the output head, in numpy from the GGUF's own weights; its argmax
is compared with the full model's. The speedup of an early-exit split at k is then predicted from
costs measured on real splits written to a temporary folder: one draft step D(k), and the tail's
verification batch T(k, n) of n positions, against the full model's one-token decode F:

    tokens per round  E(a, g) = (1 - a^(g+1)) / (1 - a)        a: agreement at k, g: drafts per round
    time per round    (g + 1) * D(k) + T(k, g + 1)
    speedup           E * F / time per round, at the best g
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp as lib
import numpy as np

from edgelm.errors import UsageError

from . import ggml
from .context import Context, ContextOptions
from .model import LlamaModel


@dataclass
class ExitReport:
    n_layer: int
    tokens: int
    agreement: list[float]  # per layer i (exit after layer i, i.e. k = i + 1)
    trained: list[bool]  # whether layer i's exit used a trained exit norm
    full_ms: float = 0.0
    draft_ms: dict[int, float] = field(default_factory=dict)  # k -> one draft step
    tail_ms: dict[int, dict[int, float]] = field(default_factory=dict)  # k -> n -> one verify batch of n
    speedup: dict[int, tuple[float, int]] = field(default_factory=dict)  # k -> (predicted speedup, best g)

    def best(self) -> int:
        """The exit layer k with the highest predicted speedup."""
        if not self.speedup:
            raise UsageError("no exit costs were measured")
        return max(self.speedup, key=lambda k: self.speedup[k][0])


def expected_tokens(a: float, g: int) -> float:
    return g + 1.0 if a >= 1.0 else (1.0 - a ** (g + 1)) / (1.0 - a)


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


def _dequantized(model: LlamaModel, name: str) -> np.ndarray:
    import gguf

    reader = gguf.GGUFReader(model.path)
    for t in reader.tensors:
        if t.name == name:
            return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(
                [int(x) for x in reversed(t.shape.tolist())])
    raise UsageError(f"{model.path}: no tensor {name}")


def agreement(model_path, text: str, *, exit_norms: dict[int, np.ndarray] | None = None, max_tokens: int = 2048,
              n_ctx: int = 512, n_threads: int | None = None) -> ExitReport:
    """Per-layer agreement of exits with the full model's argmax over `text` (windows of n_ctx tokens)."""
    model = LlamaModel(model_path)
    try:
        tokens = model.tokenize(text)[:max_tokens]
        if len(tokens) < 2:
            raise UsageError("calibration text too short: it needs at least 2 tokens")
        n_layer = model.n_layer
        exit_norms = exit_norms or {}
        bad = [k for k in exit_norms if not 1 <= k < n_layer]
        if bad:
            raise UsageError(f"exit norms for layers {bad}: exits lie in [1, {n_layer - 1}]")
        head = _dequantized(model, "output.weight") if "output.weight" in _tensor_names(model) else \
            _dequantized(model, "token_embd.weight")
        final_norm = _dequantized(model, "output_norm.weight")
        eps = float(model.gguf.get(f"{model.architecture}.attention.layer_norm_rms_epsilon", 1e-5))
        hidden = _Hidden(n_layer)
        window = min(n_ctx, 512)
        ctx = Context(model, ContextOptions(n_ctx=window, n_batch=window, n_threads=n_threads),
                      eval_callback=hidden.callback)
        agree = np.zeros(n_layer)
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
                    norm = exit_norms.get(i + 1, final_norm)
                    x = h / np.sqrt(np.mean(h * h, axis=1, keepdims=True) + eps) * norm
                    agree[i] += np.count_nonzero((x @ head.T).argmax(axis=1) == target)
                counted += len(chunk)
        finally:
            ctx.close()
        return ExitReport(n_layer, counted, list(agree / counted), [i + 1 in exit_norms for i in range(n_layer)])
    finally:
        model.close()


def _tensor_names(model: LlamaModel) -> set[str]:
    return {t.name for t in model.gguf.tensors}


def _time(fn, repeat: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat * 1e3


def measure_costs(model_path, report: ExitReport, layers: list[int], *, draft_max: int = 8,
                  n_threads: int | None = None, repeat: int = 30, rounds: int = 3) -> None:
    """Time, for each k, a draft step and the tail's verify batches on a split written to a temporary folder,
    alternating with the full model's decode step so that a shared machine's drift falls on both (medians
    over `rounds`); fills report.full_ms (median), draft_ms, tail_ms and speedup (g = 0 is 1.0: no drafts,
    plain decoding)."""
    import statistics

    from edgelm.converters.early_exit import split_model

    from ..native import Capture

    options = ContextOptions(n_ctx=256, n_batch=64, n_threads=n_threads)
    prompt = list(range(1, 33))
    pos = len(prompt)
    fulls = []
    with tempfile.TemporaryDirectory(prefix="edgelm-exits-") as tmp:
        copy = Path(tmp) / "model.gguf"
        copy.symlink_to(Path(model_path).resolve())
        full = LlamaModel(copy)
        ctx = Context(full, options)
        ctx.decode(prompt, 0)

        def full_step():
            ctx.decode_one(5, pos)
            ctx.remove(0, pos)

        try:
            for k in layers:
                paths = split_model(copy, k)
                d = LlamaModel(paths.draft, parts=[paths.shared])
                t = LlamaModel(paths.tail, parts=[paths.shared])
                cap = Capture(f"l_out-{k - 1}", d.n_embd, options.n_batch)
                dc = Context(d, options, eval_callback=cap.callback, eval_user_data=cap.user_data)
                tc = Context(t, options, embd_input=True)
                try:
                    dc.decode(prompt, 0, logits_from=0)
                    tc.decode_embd(cap.take(len(prompt)), 0)
                    rows = np.repeat(cap.take(1), draft_max + 1, axis=0)

                    def draft_step():
                        dc.decode_one(5, pos)
                        dc.remove(0, pos)

                    def verify(n):
                        tc.decode_embd(rows[:n], pos, logits_from=0)
                        tc.remove(0, pos)

                    f_ms, d_ms, t_ms = [], [], {n: [] for n in range(1, draft_max + 2)}
                    for _ in range(rounds):
                        f_ms.append(_time(full_step, repeat))
                        d_ms.append(_time(draft_step, repeat))
                        for n in t_ms:
                            t_ms[n].append(_time(lambda n=n: verify(n), max(5, repeat // 3)))
                finally:
                    dc.close()
                    tc.close()
                    d.close()
                    t.close()
                for p in (paths.draft, paths.tail):
                    p.unlink()
                f = statistics.median(f_ms)
                fulls.append(f)
                report.draft_ms[k] = statistics.median(d_ms)
                report.tail_ms[k] = {n: statistics.median(v) for n, v in t_ms.items()}
                a = report.agreement[k - 1]
                report.speedup[k] = max([(1.0, 0)] + [
                    (expected_tokens(a, g) * f / ((g + 1) * report.draft_ms[k] + report.tail_ms[k][g + 1]), g)
                    for g in range(1, draft_max + 1)], key=lambda x: x[0])
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

