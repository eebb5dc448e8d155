"""Log-probabilities of generated tokens (OpenAI's `logprobs`), read from the logits row that produced each token.

They are the model's own distribution: a softmax over the raw logits, before logit bias, penalties,
temperature and truncation, as llama-server reports them by default. So a greedy token's logprob is the
top one, and a sampled token may rank anywhere.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import llama_cpp as lib
import numpy as np

from edgelm.errors import UsageError

MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token, logprob) of the most likely tokens there, most likely first


class LogprobReader:
    """Reads a TokenLogprob from output rows of a context's last decode, with `n_top` alternatives."""

    def __init__(self, n_vocab: int, n_top: int):
        self.n_top = min(n_top, n_vocab)
        self._row = ctypes.c_float * n_vocab

    def read(self, ctx_ptr, index: int, token: int) -> TokenLogprob:
        logits = lib.llama_get_logits_ith(ctx_ptr, index)
        if not logits:
            raise UsageError(f"no logits for output {index} of the last decode")
        row = np.frombuffer(self._row.from_address(ctypes.addressof(logits.contents)), dtype=np.float32)
        return token_logprob(row, token, self.n_top)


def token_logprob(row: np.ndarray, token: int, n_top: int = 0) -> TokenLogprob:
    """`token`'s log-softmax over the logits `row`, and the `n_top` most likely tokens (ties: lower id first)."""
    best = float(row.max())
    log_z = best + float(np.log(np.exp(row - best, dtype=np.float64).sum()))
    top = ()
    if n_top > 0:
        ids = np.argpartition(-row, n_top - 1)[:n_top]
        ids = ids[np.lexsort((ids, -row[ids]))]
        top = tuple((int(t), float(row[t]) - log_z) for t in ids)
    return TokenLogprob(int(token), float(row[token]) - log_z, top)


def prompt_logprobs(ctx, tokens: list[int], n_top: int = 0) -> list[TokenLogprob]:
    """Each prompt token's log-probability after the tokens before it (tokens[1:]: the first has no context), and
    the `n_top` most likely tokens there: `tokens` evaluated from position 0 of a cleared context (sequence 0), in
    chunks of its batch, every row read in place."""
    if len(tokens) > ctx.n_ctx:
        raise UsageError(f"{len(tokens)} prompt tokens do not fit the scoring context of {ctx.n_ctx}")
    ctx.clear()
    out = []
    for lo in range(0, len(tokens), ctx.n_batch):
        chunk = tokens[lo:lo + ctx.n_batch]
        ctx.decode(chunk, lo, logits_last=False, logits_from=0)
        rows = ctx.output_rows(len(chunk))
        for i, target in enumerate(tokens[lo + 1:lo + len(chunk) + 1]):  # row i predicts token lo + i + 1
            out.append(token_logprob(rows[i], target, n_top))
    return out
