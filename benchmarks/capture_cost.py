"""Cost of capturing the early-exit boundary hidden state per decode step: none vs edgelm's C eval callback
(native/capture.c) vs the same capture written as a Python ctypes callback, on the bundled model's draft.

    .venv/bin/python benchmarks/capture_cost.py [--threads 1] [--k 4] [--steps 400] [--rounds 5]

Alternating rounds, medians; prints ms per one-token decode of the draft model and the overhead of each
callback over no callback.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import llama_cpp as lib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edgelm.converters.early_exit import split_model  # noqa: E402
from edgelm.native import Capture  # noqa: E402
from edgelm.runtime import ggml  # noqa: E402
from edgelm.runtime.context import Context, ContextOptions  # noqa: E402
from edgelm.runtime.model import LlamaModel, default_model_path  # noqa: E402


class PythonCapture:
    """The capture in Python: the node's rows copied with numpy in a ctypes callback."""

    def __init__(self, target: str, n_embd: int):
        self.target, self.rows = target.encode(), []
        self.callback = lib.ggml_backend_sched_eval_callback(self._on_tensor)

    def _on_tensor(self, address, ask, _user_data):
        t = ggml.GGMLTensor.from_address(address)
        if t.name != self.target:
            return not ask
        if not ask:
            self.rows.append(ggml.read_rows(t, address).copy())
            del self.rows[:-8]
        return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model.gguf"
        model.symlink_to(default_model_path())
        paths = split_model(model, args.k)
        d = LlamaModel(paths.draft, parts=[paths.shared])
        options = ContextOptions(n_ctx=args.steps + 64, n_batch=64, n_threads=args.threads)
        c_cap = Capture(f"l_out-{args.k - 1}", d.n_embd, 64)
        py_cap = PythonCapture(f"l_out-{args.k - 1}", d.n_embd)
        contexts = {"none": Context(d, options),
                    "C callback": Context(d, options, eval_callback=c_cap.callback, eval_user_data=c_cap.user_data),
                    "Python callback": Context(d, options, eval_callback=py_cap.callback)}
        times = {name: [] for name in contexts}
        for _ in range(args.rounds):
            for name, ctx in contexts.items():
                ctx.clear()
                ctx.decode([1, 2, 3, 4], 0)
                t0 = time.perf_counter()
                for i in range(args.steps):
                    ctx.decode_one(5 + i % 100, 4 + i)
                times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
        assert np.array_equal(c_cap.take(1)[0], py_cap.rows[-1][0])  # the same hidden state either way
        base = statistics.median(times["none"])
        print(f"draft of the bundled model, k={args.k}, {args.threads} thread(s), {args.steps} one-token decodes "
              f"x {args.rounds} rounds (medians)")
        for name, values in times.items():
            m = statistics.median(values)
            print(f"{name:<16} {m:.4f} ms/step  overhead {m - base:+.4f} ms")


if __name__ == "__main__":
    main()
