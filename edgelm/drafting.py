"""Speculative decoding inside the continuous-batching engine: decoding streams bring drafts to the shared step.

A stream's pending token and its drafts d1..dm go into the engine's batch at consecutive positions, each with a
logits row, beside the other streams' tokens and prompt chunks, so one llama_decode verifies every stream's drafts.
The stream keeps the drafts its own sampling agrees with, then one token of the model's: greedy compares each row's
choice (logit bias included) with the next draft; sampling keeps the full model's distribution by speculative
rejection sampling (runtime/speculative.py). Rejected positions leave the stream's KV before the next step.

Drafters: prompt lookup (n-grams of the stream's own prompt and output), or a draft model sharing the vocabulary,
whose context holds one sequence per slot.

How many drafts a step takes is a cost model's choice (Speculation.allot): a draft row pays off when the tokens
it is expected to add (the stream's acceptance rate, to the power of its place in the draft) outweigh what it adds
to the step's time, at the step's current tokens per second. Row and step costs are timed at start-up, then fitted
to the engine's own decode-only steps as it serves (StepCosts: the whole step, with verifying drafts and dropping
rejected ones from the KV), and a draft model's token to its own calls. On a CPU,
where a small model's step grows with every row, this drafts little beside other streams and more alone; where
rows are nearly free (a larger, memory-bound model) it drafts more. Grammars and samplers with state (penalties,
DRY, mirostat, XTC) decode plainly (a rejected draft would have advanced their state), as in `Model.generate` with
a drafter.
"""
from __future__ import annotations

import heapq
import statistics
import time
from typing import TYPE_CHECKING

import numpy as np

from .errors import ModelLoadError, UsageError
from .runtime.context import Context, ContextOptions
from .runtime.model import LlamaModel
from .runtime.sampling import SamplerChain, SamplingParams
from .runtime.speculative import (DRAFT_MAX, THRESHOLD, Distribution, DraftModel, Lookup, _accept, next_draft,
                                  same_vocabulary, speculative_mode)

import llama_cpp as lib

if TYPE_CHECKING:
    from .engine import _Slot


def check_draft_options(lookup: bool, draft_model, draft_max: int, threshold: float) -> None:
    if lookup and draft_model is not None:
        raise UsageError("choose one drafter, not lookup and a draft model")
    if isinstance(draft_max, bool) or not isinstance(draft_max, int) or not 1 <= draft_max <= 64:
        raise UsageError(f"draft_max must be an integer in [1, 64], not {draft_max!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise UsageError(f"draft threshold must be in [0, 1], not {threshold!r}")


DECAY = 0.98  # each new timing's weight against the ones before it: about the last 50 count
PROBE = 32  # a stream the cost model keeps from drafting drafts one token after this many steps
HOPEFUL = 0.9  # the acceptance rate at which a probe could show drafting to pay


class StepCosts:
    """A step's seconds as a fixed cost plus a cost per row, fitted to the engine's own decode-only steps.

    Weighted least squares over (rows, seconds), older steps counting less (DECAY), with two points from the
    start-up calibration (1 and 9 rows) that hold the line's shape until steps of several widths have been seen
    (their weight falls as the observed widths' spread grows).
    Those points are scaled by how much slower or faster the observed steps ran than the calibrated line says,
    so a machine that slows down (another process, a clock change) keeps the shape and moves the line, instead of
    tilting it through the points of one width.
    """

    PRIOR = 4.0  # weight of each calibration point: worth a few steps

    def __init__(self, step_s: float = 1.0, row_s: float = 0.0):
        self.base = (step_s, row_s)
        self.scale = 1.0  # observed seconds / the calibrated line's, decayed
        self.w = self.x = self.y = self.xx = self.xy = 0.0  # decayed sums over the observed steps
        self.seen = 0  # steps observed
        self._fit = None

    def calibrated(self, one: float, nine: float) -> None:
        """Steps of 1 and 9 rows took `one` and `nine` seconds."""
        row = max((nine - one) / 8, 0.0)
        self.base = (max(one - row, 1e-6), row)
        self._fit = None

    def observe(self, rows: int, seconds: float) -> None:
        step, row = self.base
        calibrated = step + row * rows
        # an outlier (a finished request's prompt cache write, the OS taking the core) counts as 4x the expected
        seconds = min(seconds, 4 * self.scale * calibrated)
        self.scale = DECAY * self.scale + (1 - DECAY) * seconds / calibrated
        self.w, self.x, self.y = DECAY * self.w + 1, DECAY * self.x + rows, DECAY * self.y + seconds
        self.xx, self.xy = DECAY * self.xx + rows * rows, DECAY * self.xy + rows * seconds
        self.seen += 1
        self._fit = None

    def fit(self) -> tuple[float, float]:
        """(a step's fixed seconds, seconds per row)."""
        if self._fit is None:
            step, row = self.base
            w, x, y, xx, xy = self.w, self.x, self.y, self.xx, self.xy
            # the calibration's points, on the observed scale, count for less the more the observed widths spread
            prior = self.PRIOR / (1 + (xx - x * x / w if w else 0.0))
            for rows in (1, 9):
                t = self.scale * (step + row * rows)
                w, x, y, xx, xy = w + prior, x + prior * rows, y + prior * t, xx + prior * rows * rows, \
                    xy + prior * rows * t
            slope = max((w * xy - x * y) / (w * xx - x * x), 0.0)
            self._fit = (max((y - slope * x) / w, 1e-6), slope)
        return self._fit


class Speculation:
    """The engine's drafting set-up, shared by its slots: which drafter, the draft model's context, the counts."""

    def __init__(self, model: LlamaModel, ctx_options: ContextOptions, *, lookup: bool = False,
                 draft_model: LlamaModel | None = None, draft_max: int = DRAFT_MAX, threshold: float = THRESHOLD,
                 stats: dict | None = None):
        check_draft_options(lookup, draft_model, draft_max, threshold)
        if lib.llama_model_is_recurrent(model.ptr) or lib.llama_model_is_hybrid(model.ptr):
            # rejected drafts must leave the KV, and a recurrent state cannot forget its last positions
            raise UsageError(f"{model.path.name}: speculative decoding needs a KV cache that can drop positions; "
                             "this model's recurrent state cannot")
        if draft_model is not None and not same_vocabulary(model, draft_model):
            raise UsageError(f"{draft_model.path}: its vocabulary differs from {model.path}'s; "
                             "a draft model must share the target's tokenizer")
        self.model, self.draft_max, self.threshold = model, draft_max, threshold
        self.ctx = Context(draft_model, ctx_options) if draft_model is not None else None
        # seconds: a step's fixed cost and each row's (calibrate(), then the engine's steps), each draft model
        # token's; until calibrate() every draft looks free and streams draft up to their limits
        self.costs, self.draft_cost = StepCosts(), 0.0
        self._drafting = 0.0  # the draft model's seconds in the current step
        self.stats = stats if stats is not None else {}  # counts: draft_rounds, drafted, draft_accepted
        for key in ("draft_rounds", "drafted", "draft_accepted"):
            self.stats.setdefault(key, 0)

    def start(self, seq: int, params: SamplingParams, sampler: SamplerChain) -> "StreamDrafts | None":
        """The drafts of one request in slot `seq`; None when its sampling cannot take drafts."""
        if sampler.stateless_greedy:
            mode = "greedy"
        elif speculative_mode(params) == "sample":
            mode = "sample"
        else:
            return None
        drafter = Lookup() if self.ctx is None else DraftModel(self.ctx, self.threshold, seq)
        return StreamDrafts(self, drafter, mode, params)

    def warm_up(self) -> None:
        if self.ctx is not None:
            self.ctx.warm_up()

    def calibrate(self, ctx: Context, seq: int = 0) -> None:
        """Time steps of 1 and 9 rows in `ctx` (sequence `seq`, empty, and left empty), and one draft model token:
        the costs the cost model starts from, until the engine's own steps say more (observe())."""
        token = self.model.bos if self.model.bos >= 0 else 0

        def timed(c: Context, rows: int, repeat: int) -> float:
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                c.decode([token] * rows, 0, seq, logits_from=0)
                times.append(time.perf_counter() - t0)
                c.remove(seq)
            return statistics.median(times)

        self.costs.calibrated(timed(ctx, 1, 5), timed(ctx, 9, 3))
        if self.ctx is not None:
            self.draft_cost = timed(self.ctx, 1, 5)

    def observe(self, rows: int, seconds: float) -> None:
        """The engine's step of `rows` rows, every one a decoding stream's (no prompt chunk), took `seconds`, the
        draft model's calls in it included."""
        self.costs.observe(rows, max(seconds - self._drafting, 1e-6))
        self._drafting = 0.0

    def observe_draft(self, seconds: float, decodes: int) -> None:
        """The draft model took `seconds` for a round of `decodes` tokens (and the catch-up before them)."""
        self._drafting += seconds
        if decodes > 0:  # a first catch-up over a whole prompt counts as 4x the expected, as StepCosts' outliers
            per_token = min(seconds / decodes, 4 * self.draft_cost) if self.draft_cost > 0 else seconds / decodes
            self.draft_cost = DECAY * self.draft_cost + (1 - DECAY) * per_token

    def allot(self, wants: list[tuple["StreamDrafts", int]]) -> list[int]:
        """Drafts for each decoding stream this step, given (its drafts, how many fit) for each: greedily the most
        likely kept rows first, while one's expected tokens per its cost beat the step's tokens per second."""
        step_s, row_s = self.costs.fit()
        tokens, seconds = float(len(wants)), step_s + row_s * len(wants)
        cost = row_s + self.draft_cost
        could_pay = HOPEFUL * seconds > cost * tokens  # a draft that is nearly always kept would pay for itself
        counts = [0] * len(wants)
        heap = [(-d.alpha, i) for i, (d, room) in enumerate(wants) if room > 0]
        heapq.heapify(heap)
        while heap:
            value, i = heapq.heappop(heap)
            value = -value
            if value * seconds <= cost * tokens:
                break
            counts[i] += 1
            tokens += value
            seconds += cost
            if counts[i] < wants[i][1]:
                heapq.heappush(heap, (-value * wants[i][0].alpha, i))
        for i, (d, room) in enumerate(wants):
            # a stream that has not drafted for PROBE steps tries one draft, so that its acceptance rate follows
            # what its drafter would do now (and a good drafter is found out), at one row in PROBE steps; only
            # where a good drafter's drafts would pay at all (not beside many streams on a CPU)
            d.idle = 0 if counts[i] else d.idle + 1
            if d.idle >= PROBE and room > 0 and could_pay:
                counts[i], d.idle = 1, 0
        return counts

    def draft_many(self, wants: list[tuple["StreamDrafts", list[int], int]]) -> list[tuple[list[int], object]]:
        """(drafts, their draft probabilities or None) for each (stream, history ending with its pending token,
        drafts allotted). A draft model drafts for every stream at once: one decode per draft position, with a
        row for each stream still drafting, after one batch that catches every stream's sequence up."""
        if self.ctx is None:
            return [d.draft(history, n) for d, history, n in wants]
        out: list[tuple[list[int], object]] = [([], None)] * len(wants)
        ctx, t0 = self.ctx, time.perf_counter()
        rows, owners = [], []  # the batch, and (want, its logits row) for each stream in it
        for i, (d, history, n) in enumerate(wants):
            if min(n, self.draft_max) <= 0 or len(history) + 1 >= ctx.n_ctx:
                continue
            seq = d.drafter.seq
            have = d.drafter.keep_prefix(history, len(history) - 1)  # the pending token is decoded for its logits
            if len(rows) + len(history) - have > ctx.n_batch:  # a long catch-up (a new prompt) goes on its own
                if len(rows) == ctx.n_batch:  # no row left in this step's batch: this stream drafts next step
                    continue
                ctx.decode(history[have:-1], have, seq, logits_last=False)
                have = len(history) - 1
            rows += [(t, p, seq, p == len(history) - 1) for p, t in enumerate(history[have:], have)]
            owners.append((i, len(rows) - 1))
        drafts = {i: ([], []) for i, _ in owners}  # want -> (its drafts, their q rows)
        decodes = 0
        while rows:
            ctx.decode_rows(rows)
            decodes += len(owners)
            rows, going = [], []
            for i, j in owners:
                d, history, n = wants[i]
                kept, qs = drafts[i]
                token = next_draft(ctx.logits(j), self.threshold, d.dist, d.rng, qs)
                if token is None:
                    continue
                kept.append(token)
                pos = len(history) - 1 + len(kept)
                if len(kept) < min(n, self.draft_max) and pos + 1 < ctx.n_ctx:
                    rows.append((token, pos, d.drafter.seq, True))
                    going.append((i, len(rows) - 1))
            owners = going
        self.observe_draft(time.perf_counter() - t0, decodes)
        for i, (kept, qs) in drafts.items():
            if not kept:  # the draft model paid a row and was not confident: a miss
                wants[i][0].rejected = 0.9 * wants[i][0].rejected + 1
            out[i] = (kept, np.stack(qs) if qs else None)
        return out

    def close(self) -> None:
        if self.ctx is not None:  # the draft model stays open: it is its owner's
            self.ctx.close()


class StreamDrafts:
    """One request's drafter and, when it samples, its distribution and random stream."""

    def __init__(self, owner: Speculation, drafter, mode: str, params: SamplingParams):
        self.owner, self.drafter, self.mode = owner, drafter, mode
        self.dist = Distribution(params, owner.model) if mode == "sample" else None
        self.rng = np.random.default_rng(params.seed) if mode == "sample" else None
        # a draft is kept, given the one before it was, with probability alpha: the stream's kept drafts against
        # its rejections, from one of each, with older rounds counting less
        self.kept, self.rejected = 1.0, 1.0
        self.idle = 0  # steps since the cost model last gave this stream a draft

    @property
    def alpha(self) -> float:
        return self.kept / (self.kept + self.rejected)

    def draft(self, history: list[int], n_max: int) -> tuple[list[int], np.ndarray | None]:
        """Up to n_max prompt-lookup drafts to follow `history`, whose last token is the stream's pending one
        (a draft model drafts for all streams at once: Speculation.draft_many)."""
        if n_max <= 0:
            return [], None
        return self.drafter.draft(history, min(n_max, self.owner.draft_max), self.dist, self.rng)

    def verify(self, ctx: Context, index: int, drafts: list[int], q, choose) -> list[int | None]:
        """The tokens the stream emits after a step that evaluated its pending token at batch `index` and `drafts`
        after it: the drafts kept, then the model's own next token. `choose(j)` is the greedy choice of row j."""
        if self.mode == "greedy":
            kept = 0
            while kept < len(drafts):
                token = choose(kept)
                if token != drafts[kept]:
                    break
                kept += 1
            else:
                token = choose(kept)
            tokens = [*drafts[:kept], token]
        else:
            rows = np.stack([ctx.logits(index + j) for j in range(len(drafts) + 1)])
            accepted, token = _accept(drafts, rows, q, self.dist, self.rng, "sample")
            tokens = [*accepted, token]
        if drafts:
            kept = len(tokens) - 1
            self.kept = 0.9 * self.kept + kept
            self.rejected = 0.9 * self.rejected + (kept < len(drafts))
        stats = self.owner.stats
        stats["draft_rounds"] += 1
        stats["drafted"] += len(drafts)
        stats["draft_accepted"] += len(tokens) - 1
        return tokens

    def rollback(self, pos: int) -> None:
        """The stream's KV now ends at `pos`."""
        self.drafter.rollback(pos)

    def close(self) -> None:
        if self.dist is not None:
            self.dist.close()
            self.dist = None


class SlotDrafting:
    """Engine methods that bring decoding slots' drafts to a step and take its verdict on them, over its slots,
    context (`ctx`), `speculation`, options and stats."""

    def _drafts(self, decoding: list[_Slot], budget: int) -> dict:
        """The drafts of this step's decoding streams, at most `budget` in all: {slot: (drafts, q)}."""
        drafting = [s for s in decoding if s.drafts is not None]
        if not drafting:
            return {}
        wants = [(s.drafts, self._room(s)) for s in drafting]
        allot = self.speculation.allot(wants) if self.options.draft_cost_model else [room for _, room in wants]
        asks = []
        for slot, allotted in zip(drafting, allot):
            asks.append((slot.drafts, [*slot.held, slot.pending], min(allotted, budget)))
            budget -= asks[-1][2]
        return {slot: (drafts, q) for slot, (drafts, q) in zip(drafting, self.speculation.draft_many(asks)) if drafts}

    def _room(self, slot: _Slot) -> int:
        """Drafts a decoding slot may make: within draft_max, max_tokens (the model's own token follows them) and
        the sequence's context (len(held) is the pending token's position)."""
        return max(0, min(self.options.draft_max, slot.req.params.max_tokens - slot.n_out - 1,
                          self.options.n_ctx - 2 - len(slot.held)))

    def _verified(self, slot: _Slot, index: int, row: int, drafts: list[int], q, argmax, now: float) -> None:
        """Emit what a step verified for a drafting slot (its rows from batch `index` and output `row` on): the
        drafts kept and the model's next token; the rejected drafts leave the KV (its own and the draft model's)."""
        if argmax is not None and slot.sampler.argmax_only:
            def choose(j: int) -> int:
                return int(argmax[row + j])
        else:
            def choose(j: int) -> int | None:
                return slot.sampler.sample(self.ctx.ptr, index + j)
        tokens = slot.drafts.verify(self.ctx, index, drafts, q, choose)
        for j, token in enumerate(tokens):
            if j:
                if slot.req is None:  # finished on the token before
                    return
                slot.held.append(slot.pending)  # a kept draft: the step put it in the KV
                slot.pending = None
            self._sampled(slot, token, now, index + j)
        if slot.req is None:
            return
        keep = len(slot.held)
        if not self.ctx.remove(slot.seq, keep):
            slot.req._fail(ModelLoadError(f"could not drop rejected drafts from sequence {slot.seq}"))
            self._release(slot, keep=False)
            return
        slot.drafts.rollback(keep)
