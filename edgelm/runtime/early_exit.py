"""The early-exit pair: both halves of an early-exit split (edgelm.converters.early_exit writes it) as one drafter
and verifier for speculative.speculative_tokens. D (layers 0..k-1 + exit head) drafts and hands the boundary hidden
states it computed to T (layers k..L-1 + the final head), which verifies them, so no weight and no KV position is
held twice.
"""
from __future__ import annotations

import numpy as np

from edgelm import native
from edgelm.errors import ContextOverflowError, UsageError

from .canonical import FA_TILE, prefill_batches, reusable
from .context import Context, warmup_tokens
from .generate import common_prefix
from .speculative import THRESHOLD, Drafter, Verifier, next_draft

# batch of an early-exit split's contexts: 2 x FA_TILE is the least n_batch with which every prompt splits into
# canonical batches (canonical.batch_plan), so the KV stays bit for bit the full model's. A draft without the
# passthrough layer (a split of format 2, or of an architecture without one: see converters.early_exit) asks for
# every prefill position's logits, since its last layer keeps only output rows: n_batch x n_vocab floats in its
# compute buffer and again in its output buffer (2 x 74 MiB for a 151,936-token vocabulary at this n_batch).
EARLY_EXIT_BATCH = 2 * FA_TILE


class EarlyExit(Drafter, Verifier):
    """Both halves of an early-exit split: D (layers 0..k-1 + exit head) drafts and hands the boundary
    hidden states it computed to T (layers k..L-1 + the final head), which verifies them."""

    def __init__(self, draft_ctx: Context, tail_ctx: Context, capture: native.Capture, threshold: float = THRESHOLD,
                 *, passthrough: bool = False):
        self.d, self.t, self.capture, self.threshold = draft_ctx, tail_ctx, capture, threshold
        # the draft ends in a passthrough layer: the captured boundary has every row without their logits
        self._logits_from = None if passthrough else 0
        self.model, self.n_ctx = draft_ctx.model, min(draft_ctx.n_ctx, tail_ctx.n_ctx)
        self.max_batch = min(tail_ctx.n_batch, capture.capacity)
        self.rows = max(draft_ctx.canonical_rows, tail_ctx.canonical_rows)  # a canonical batch's least length
        self._t_held: list[int] = []  # the tokens whose hidden states T's KV holds
        self.caches = None  # (D's PromptCache, T's PromptCache): an entry is used only when both halves have it
        self.reuse = "exact"  # how much of an earlier prompt's KV a request may keep (generate.prefill)

    def _eval_d(self, tokens: list[int], pos: int) -> np.ndarray:
        before = self.capture.head
        self.d.decode(tokens, pos, logits_last=True, logits_from=self._logits_from)
        self.capture.check()
        if self.capture.head - before != len(tokens):
            raise UsageError(f"early exit: captured {self.capture.head - before} hidden states for {len(tokens)} "
                             f"tokens (is {self.capture.target} the draft's last layer?)")
        return self.capture.take(len(tokens))

    # Verifier

    def prefill(self, tokens: list[int]) -> int:
        """Hold `tokens` in both halves, keeping what an earlier request left only where a cold prefill would
        reproduce it bit for bit (canonical.reusable: canonically evaluated positions, `rows` re-evaluated)."""
        shared = min(common_prefix(self.d.seq_tokens(0), tokens), common_prefix(self._t_held, tokens))
        source_exact = self.d.exact_tokens(0)
        n = reusable(shared, source_exact, len(tokens), self.reuse, self.rows)
        if self.caches is not None and self.reuse != "off":
            n, source_exact = self._restore(tokens, n, source_exact)
        if not (self.d.remove(0, n) and self.t.remove(0, n)):
            self.clear()
            n = 0
        del self._t_held[n:]
        # canonical batches (EARLY_EXIT_BATCH) keep the KV bit for bit what the full model's prefill makes
        step = min(self.d.n_batch, self.t.n_batch, self.capture.capacity)
        batches, exact = prefill_batches(n, len(tokens), step, source_exact, self.rows)
        for lo, hi in batches:
            chunk = tokens[lo:hi]
            self.t.decode_embd(self._eval_d(chunk, lo), lo)
            self._t_held.extend(chunk)
        self.d.set_tokens(0, tokens, exact=exact)
        return n

    def _restore(self, tokens: list[int], n: int, source_exact: int) -> tuple[int, int]:
        """Both halves' states of the cached prompt sharing the most with `tokens`, if that beats the live KV's
        `n` positions; returns the positions to keep and how many of them are canonical."""
        (dc, tc) = self.caches
        (sd, ed), (st, et) = dc.lookup(tokens), tc.lookup(tokens)
        if ed is None or et is None:
            return n, source_exact
        exact = min(ed.exact, et.exact)
        m = reusable(min(sd, st), exact, len(tokens), self.reuse, self.rows)
        if m <= n:
            return n, source_exact
        if not (dc.restore(0, ed) and tc.restore(0, et)):  # a restore replaces what the sequence held
            self.clear()
            return 0, 0
        self._t_held = list(et.tokens)
        return m, exact

    def finish(self) -> None:
        """After a generation: keep what a later request may reuse (under reuse "exact" only the canonical prefix:
        nothing past it can be reused exactly) and offer both halves' states to the prompt cache."""
        exact = self.d.exact_tokens(0)
        keep = exact if self.reuse == "exact" else common_prefix(self.d.seq_tokens(0), self._t_held)
        self.rollback(keep)
        if self.caches is not None and self.reuse != "off" and keep:
            self.t.set_tokens(0, self._t_held, exact=min(exact, keep))
            for cache in self.caches:
                cache.store(0)

    def warm_up(self) -> None:
        """Context.warm_up for both halves: D's throw-away step on BOS and EOS, T's on the hidden states D hands
        over. Both caches are empty afterwards."""
        with self.d.warmup_mode():
            rows = self._eval_d(warmup_tokens(self.model), 0)
        self.t.warm_up(rows)
        self.clear()

    def clear(self) -> None:
        self.d.clear()
        self.t.clear()
        self._t_held = []

    def verify(self, tokens: list[int], pos: int) -> np.ndarray:
        # D has just evaluated exactly these tokens while drafting (see draft), so their rows are the last captured
        rows = self.capture.take(len(tokens))
        self.t.decode_embd(rows, pos, logits_from=0)
        del self._t_held[pos:]
        self._t_held.extend(tokens)
        return self.t.all_logits(len(tokens))

    def rollback(self, pos: int) -> None:
        self.d.remove(0, pos)
        self.t.remove(0, pos)
        del self._t_held[pos:]

    @property
    def ctx_ptr(self):
        return self.t.ptr

    # Drafter

    def draft(self, history, n_max, dist, rng):
        """Evaluates the last token and every kept draft in D, so verify() finds all their hidden states."""
        pos = len(history) - 1
        if pos >= self.n_ctx:
            raise ContextOverflowError(f"position {pos} is past the context of {self.n_ctx}")
        token, drafts, qs = history[-1], [], []
        while True:
            before = self.capture.head
            last = len(drafts) >= n_max or pos + len(drafts) + 1 >= self.n_ctx  # no draft follows this step
            # a draft ending in the passthrough layer hands over its boundary row without logits: skip the head
            self.d.decode_one(token, pos + len(drafts), logits=not (last and self._logits_from is None))
            self.capture.check()
            if self.capture.head != before + 1:
                raise UsageError("early exit: the draft's boundary hidden state was not captured")
            if last:
                break
            token = next_draft(self.d.logits(), self.threshold, dist, rng, qs)
            if token is None:
                break
            drafts.append(token)
        return drafts, (np.stack(qs) if qs else None)
