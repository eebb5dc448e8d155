"""numpy references for the native kernels in native/*.c.

Each function states in float64 what its C kernel computes, with the same
signature as its wrapper in edgelm.native. tests/test_native.py holds the
kernels to these; they also document the exact semantics (ties, -inf rows,
zero-mass fallbacks) and can stand in where the extension is not built.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Confidence(NamedTuple):
    max_prob: float | np.ndarray  # p1; float32 (n_rows,) for a batch
    entropy: float | np.ndarray  # -sum p log p, natural log
    margin: float | np.ndarray  # p1 - p2
    argmax: int | np.ndarray  # first index of p1; int32 (n_rows,) for a batch


def confidence(logits: np.ndarray) -> Confidence:
    """Softmax confidence of a logits row (n_vocab,) or of each row of (n_rows, n_vocab)."""
    x = np.asarray(logits, dtype=np.float64)
    rows = np.atleast_2d(x)  # (n_rows, n_vocab)
    m = rows.max(axis=1, keepdims=True)
    dead = np.isneginf(m[:, 0])  # all -inf: softmax undefined
    with np.errstate(divide="ignore", invalid="ignore"):  # dead rows become NaN below
        e = np.exp(rows - np.where(dead[:, None], 0.0, m))
        p = e / e.sum(axis=1, keepdims=True)
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    entropy = -plogp.sum(axis=1)
    n_vocab = rows.shape[1]
    if n_vocab > 1:
        top2 = np.partition(p, n_vocab - 2, axis=1)[:, -2:]  # (n_rows, 2): p2, p1
        p1, p2 = top2[:, 1], top2[:, 0]
    else:
        p1, p2 = p[:, 0], np.zeros(len(p))
    margin = p1 - p2
    argmax = rows.argmax(axis=1).astype(np.int32)
    p1, entropy, margin = (np.where(dead, np.nan, v).astype(np.float32) for v in (p1, entropy, margin))
    argmax[dead] = 0
    if x.ndim == 1:
        return Confidence(float(p1[0]), float(entropy[0]), float(margin[0]), int(argmax[0]))
    return Confidence(p1, entropy, margin, argmax)


def greedy_accept(draft: np.ndarray, target: np.ndarray) -> int:
    """Length of the prefix where draft (n,) equals target (n + 1,) argmax ids."""
    n = len(draft)
    mismatch = np.flatnonzero(np.asarray(draft) != np.asarray(target)[:n])
    return int(mismatch[0]) if mismatch.size else n


def speculative_accept(p: np.ndarray, q: np.ndarray, draft: np.ndarray, u: np.ndarray) -> int:
    """Index of the first draft token rejected by u < min(1, p[x] / q[x]); n if none."""
    rows = np.arange(len(draft))
    px = p[rows, draft].astype(np.float64)
    qx = q[rows, draft].astype(np.float64)
    rejected = np.flatnonzero(~(np.asarray(u, dtype=np.float64) * qx < px))
    return int(rejected[0]) if rejected.size else len(draft)


def residual_distribution(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """normalize(max(0, p - q)) in float64, or normalize(p) when the residual is all zero."""
    w = np.maximum(p.astype(np.float64) - q.astype(np.float64), 0.0)
    if not w.sum() > 0:
        w = np.maximum(p.astype(np.float64), 0.0)
    return w / w.sum()


def residual_sample(p: np.ndarray, q: np.ndarray, u: float) -> int:
    """Inverse-CDF draw from residual_distribution(p, q) with one uniform u in [0, 1)."""
    w = np.maximum(p.astype(np.float64) - q.astype(np.float64), 0.0)
    cdf = np.cumsum(w)  # sequential, like the C loop, so the totals match bit for bit
    if not cdf[-1] > 0:
        w = np.maximum(p.astype(np.float64), 0.0)
        cdf = np.cumsum(w)
        if not cdf[-1] > 0:
            raise ValueError("p has no probability mass")
    j = int(np.searchsorted(cdf, u * cdf[-1], side="right"))  # first j with cdf[j] > u * mass
    return j if j < len(w) else int(np.flatnonzero(w > 0)[-1])
