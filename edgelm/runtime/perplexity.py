"""Perplexity from llama.cpp's logits over strided windows (the standard sliding-window definition).

Each window of `window` tokens scores only tokens no earlier window scored, so every
token after the first is scored exactly once, with up to `window - stride` tokens of context.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgelm.errors import UsageError

from .context import Context, ContextOptions
from .model import LlamaModel


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood, nats per token
    n_scored: int
    n_windows: int


def log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(target) per row, in float64 for a stable sum."""
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    return x[np.arange(len(targets)), targets] - lse


def perplexity(llama: LlamaModel, tokens: list[int], *, window: int = 512, stride: int | None = None,
               n_threads: int | None = None) -> PerplexityResult:
    stride = stride or window // 2
    if window < 2 or not 0 < stride <= window:
        raise UsageError(f"need window >= 2 and 0 < stride <= window (window {window}, stride {stride})")
    if len(tokens) < 2:
        raise UsageError("perplexity needs at least two tokens of text")
    ctx = Context(llama, ContextOptions(n_ctx=window, n_batch=window, n_threads=n_threads))
    try:
        total, scored, windows, prev_end = 0.0, 0, 0, 1  # token 0 is never scored
        for begin in range(0, len(tokens) - 1, stride):
            end = min(begin + window, len(tokens))
            first = max(prev_end, begin + 1)  # first token this window scores
            if first >= end:
                break
            ctx.clear()
            # logits at index i predict token begin+i+1
            ctx.decode(tokens[begin:end], 0, logits_last=False, logits_from=first - 1 - begin)
            rows = ctx.all_logits(end - first)
            total -= float(log_softmax_at(rows, np.asarray(tokens[first:end])).sum())
            scored += end - first
            windows += 1
            prev_end = end
            if end == len(tokens):
                break
    finally:
        ctx.close()
    nll = total / scored
    return PerplexityResult(math.exp(nll), nll, scored, windows)
