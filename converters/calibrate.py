"""Activation statistics for pruning, collected from llama.cpp itself over calibration text.

One pass of the eval callback gathers what every pruning method ranks by:
- the importance matrix (mean x² per input column of each matmul): FFN channels are `ffn_down`'s
  input columns, attention heads are groups of `attn_output`'s (Minitron's activation importance);
- block influence, the mean of 1 − cos(h_in, h_out) over tokens per layer (ShortGPT);
- the covariance of the RMS-normalized residual stream entering every layer's linears (SliceGPT's PCA).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgelm.errors import ConversionError

from .imatrix import Collector, Imatrix, run_chunks

_LAYER_OUT = re.compile(r"l_out-(\d+)")


@dataclass
class Calibration:
    imatrix: Imatrix
    influence: np.ndarray  # (n_layer,) mean 1 - cos(h_in, h_out)
    covariance: np.ndarray  # (n_embd, n_embd) sum of x xᵀ over normalized rows (before the norm's weight)
    n_tokens: int

    def rms(self, weight: str) -> np.ndarray:
        """Root mean square of each input column of the GGUF weight `weight` (e.g. blk.3.ffn_down.weight)."""
        if weight not in self.imatrix.sums:
            raise ConversionError(f"calibration saw no activations entering {weight}")
        return np.sqrt(self.imatrix.sums[weight] / self.imatrix.counts[weight])


class _Statistics(Collector):
    """The importance-matrix collector plus the residual stream's named nodes."""

    def __init__(self, imatrix: Imatrix):
        super().__init__(imatrix, include_output=False)
        self.influence_sum: dict[int, float] = {}
        self.influence_rows: dict[int, int] = {}
        self.covariance: np.ndarray | None = None
        self.previous: np.ndarray | None = None  # the residual stream entering the next layer

    @staticmethod
    def _node(t) -> str:
        name = t.name.decode(errors="replace")
        # "embd": the token embeddings, layer 0's input; "l_out-i": layer i's output; "norm-i"/"norm": normalized rows
        return name if name in ("embd", "norm") or name.startswith(("l_out-", "norm-")) else ""

    def wants(self, t) -> bool:
        return bool(self._node(t)) or super().wants(t)

    def collect(self, t, address: int) -> None:
        node = self._node(t)
        if not node:
            return super().collect(t, address)
        x = self.ggml.read_rows(t, address)
        if not np.isfinite(x).all():
            raise ConversionError(f"non-finite activations at {node}")
        if node == "embd":
            self.previous = x.copy()  # a view of ggml's buffer, which the scheduler reuses
        elif m := _LAYER_OUT.fullmatch(node):
            if self.previous is None or self.previous.shape != x.shape:
                raise ConversionError(f"calibration: {node} has no matching input rows")
            il = int(m.group(1))
            cos = np.einsum("ij,ij->i", self.previous, x) / (
                np.linalg.norm(self.previous, axis=1) * np.linalg.norm(x, axis=1) + 1e-12)
            self.influence_sum[il] = self.influence_sum.get(il, 0.0) + float((1.0 - cos).sum())
            self.influence_rows[il] = self.influence_rows.get(il, 0) + len(cos)
            self.previous = x.copy()
        else:  # norm-i (before attention and before the FFN) and the final norm
            x64 = x.astype(np.float64)
            gram = x64.T @ x64
            self.covariance = gram if self.covariance is None else self.covariance + gram


def compute_calibration(model_path: str | Path, text: str, *, chunk_size: int = 256, max_chunks: int = 32,
                        n_threads: int | None = None) -> Calibration:
    """Run the GGUF at `model_path` over `text` and gather every statistic pruning ranks by."""
    stats = _Statistics(Imatrix(chunk_size=chunk_size))
    run_chunks(model_path, text, stats, chunk_size=chunk_size, max_chunks=max_chunks, n_threads=n_threads)
    n_layer = len(stats.influence_rows)
    if not n_layer or stats.covariance is None or sorted(stats.influence_rows) != list(range(n_layer)):
        raise ConversionError(f"{model_path}: the graph did not expose l_out-N / norm-N nodes to calibrate from")
    influence = np.array([stats.influence_sum[i] / stats.influence_rows[i] for i in range(n_layer)])
    return Calibration(stats.imatrix, influence, stats.covariance, stats.influence_rows[0])

