"""Speculative decoding: a cheap drafter proposes tokens, the full model checks them all in one batch.

One verify loop serves three drafters:
  EarlyExit  the model's own first k layers with an exit norm (D of an early-exit split, see
             edgelm.runtime.early_exit); the tail T verifies from D's captured boundary hidden
             states, so no weight and no KV position is held twice
  DraftModel a separate small model with the same vocabulary (a distilled student, say)
  Lookup     n-grams of the prompt and the text so far (prompt lookup decoding); no model at all

Each round: the last sampled token t and the drafts d1..dm go through the verifier at positions
pos..pos+m in one batch, whose m + 1 logits rows are the full model's predictions after t, d1, ..
Greedy keeps the longest prefix of drafts equal to those argmaxes plus the verifier's own next token,
so the output is the full model's, bit for bit where the batched verification rounds as the one-token decode
does. llama.cpp's CPU kernels do not always: a row in a batch can get other last bits than a lone row (repacked
weights multiply rows in groups of 4; flash attention over 512 or more KV cells splits a lone query's cells among
threads), so where the model's top two candidates lie within that rounding (0.01-0.05 in log-probability on
the reference models, tests/test_drafting.py), greedy output can part from plain decoding's there. Sampling
keeps draft x with probability min(1, p(x) / q(x)) and on the first rejection draws from
normalize(max(0, p - q)) (Leviathan et al. 2023), which keeps the full model's distribution.
Rejected positions leave both KV caches (llama_memory_seq_rm) before the next round.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from edgelm import native
from edgelm.errors import ContextOverflowError, UsageError

from .context import Context
from .generate import Timings, common_prefix, prefill, release
from .logprobs import TokenLogprob, token_logprob
from .sampling import (Candidates, SamplerChain, SamplingParams, add_truncation_and_temperature,
                       logit_bias_sampler)

import llama_cpp as lib

DRAFT_MAX = 8  # drafts per round, at most
THRESHOLD = 0.6  # draft while the drafter's max softmax probability is at least this


@dataclass
class SpecStats:
    rounds: int = 0  # verifier batches
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens the verifier kept

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted(self) -> float:
        """Tokens produced per verifier batch: accepted drafts plus the verifier's own token."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


# ---------------------------------------------------------------------------- distributions


class Distribution:
    """The probabilities a SamplingParams draws from, for a logits row: llama.cpp's own samplers
    (logit bias, top-k, typical, top-p, min-p, temperature) applied to the row, then a softmax."""

    def __init__(self, params: SamplingParams, model):
        self.n_vocab = model.n_vocab
        self._candidates = Candidates(model.n_vocab)
        self._chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        add = lambda s: lib.llama_sampler_chain_add(self._chain, s)  # noqa: E731
        if params.logit_bias:
            add(logit_bias_sampler(params, model.n_vocab))
        add_truncation_and_temperature(add, params)

    def __call__(self, row: np.ndarray) -> np.ndarray:
        c = self._candidates
        c.load(row)
        if c.prune() == 0:
            raise UsageError("every token is banned")
        lib.llama_sampler_apply(self._chain, c.ref)
        kept = c.buf[:c.array.size]
        z = kept["logit"].astype(np.float64)
        z = np.exp(z - z.max())
        p = np.zeros(self.n_vocab, np.float32)
        p[kept["id"]] = z / z.sum()
        return p

    def close(self) -> None:
        if getattr(self, "_chain", None):
            lib.llama_sampler_free(self._chain)
            self._chain = None

    def __del__(self):
        self.close()


def speculative_mode(params: SamplingParams) -> str:
    """"greedy" and "sample" draft; "plain" (grammars, penalties, DRY, mirostat, XTC: state that a rejected draft
    would have advanced) decodes one verified token per round with the ordinary sampler chain."""
    if params.gbnf is not None or params.stateful or params.uses_infill:  # infill: not a filter of the row
        return "plain"
    if params.greedy:
        return "plain" if params.logit_bias else "greedy"
    return "sample"


# ---------------------------------------------------------------------------- drafters and verifiers


class Verifier:
    """The full model's predictions for a run of tokens."""

    model = None  # the LlamaModel whose vocabulary the tokens are in
    n_ctx = 0
    max_batch = 1  # positions one verify() call takes: the last token plus drafts

    def prefill(self, tokens: list[int]) -> int:
        """Hold `tokens` at positions 0..; the logits of the last one are then the current output.
        Returns how many leading tokens were kept from before rather than evaluated."""
        raise NotImplementedError

    def verify(self, tokens: list[int], pos: int) -> np.ndarray:
        """Evaluate tokens at positions pos..; returns their logits rows (len(tokens), n_vocab)."""
        raise NotImplementedError

    def rollback(self, pos: int) -> None:
        """Forget positions pos.. ."""
        raise NotImplementedError

    def finish(self) -> None:
        """A generation ended (normally or not)."""

    @property
    def ctx_ptr(self):
        """The llama_context whose last output row the ordinary sampler chain reads."""
        raise NotImplementedError


class Drafter:
    def prefill(self, tokens: list[int]) -> None:
        pass

    def draft(self, history: list[int], n_max: int, dist: Distribution | None,
              rng: np.random.Generator | None) -> tuple[list[int], np.ndarray | None]:
        """Up to n_max tokens to follow `history` (its last token is not yet in any KV cache), and with a
        Distribution the draft probabilities q of each (n, n_vocab), sampled from with `rng`."""
        raise NotImplementedError

    def rollback(self, pos: int) -> None:
        pass

    def close(self) -> None:
        pass


def draw(p: np.ndarray, rng: np.random.Generator) -> int:
    """A token drawn from probabilities p (renormalised against float32 rounding)."""
    return int(rng.choice(len(p), p=p / p.sum()))


def next_draft(row: np.ndarray, threshold: float, dist: Distribution | None, rng, qs: list) -> int | None:
    """The drafter's next token from its logits row, or None when its top probability is under `threshold`;
    sampling appends the draft distribution q to `qs`."""
    c = native.confidence(row)
    if c.max_prob < threshold:
        return None
    if dist is None:
        return c.argmax
    q = dist(row)
    qs.append(q)
    return draw(q, rng)


class ContextVerifier(Verifier):
    """A single-file model's context verifies by decoding the tokens in one batch. Its prompt goes through
    the prompt cache (if any) under the same reuse rule as plain generation."""

    def __init__(self, ctx: Context, cache=None, reuse: str = "exact"):
        self.ctx, self.model, self.n_ctx, self.max_batch = ctx, ctx.model, ctx.n_ctx, ctx.n_batch
        self.cache, self.reuse = cache, reuse

    def prefill(self, tokens: list[int]) -> int:
        # as plain generation does: the same batches, so the same KV bit for bit
        return prefill(self.ctx, tokens, cache=self.cache, reuse=self.reuse)

    def finish(self) -> None:
        release(self.ctx, 0, self.cache, self.reuse)

    def verify(self, tokens: list[int], pos: int) -> np.ndarray:
        self.ctx.decode(tokens, pos, logits_from=0)
        return self.ctx.all_logits(len(tokens))

    def rollback(self, pos: int) -> None:
        self.ctx.remove(0, pos)

    @property
    def ctx_ptr(self):
        return self.ctx.ptr


class DraftModel(Drafter):
    """A separate model with the verifier's vocabulary drafts greedily (or samples q) one token at a time,
    in sequence `seq` of its context (the engine gives each slot its own)."""

    def __init__(self, ctx: Context, threshold: float = THRESHOLD, seq: int = 0):
        self.ctx, self.threshold, self.seq = ctx, threshold, seq

    def prefill(self, tokens: list[int]) -> None:
        self._sync(tokens[:-1])

    def keep_prefix(self, history: list[int], most: int | None = None) -> int:
        """Cut the sequence back to its common prefix with `history` (at most `most` positions); its length."""
        n = common_prefix(self.ctx.seq_tokens(self.seq), history)
        if most is not None:
            n = min(n, most)
        if not self.ctx.remove(self.seq, n):
            self.ctx.remove(self.seq)
            n = 0
        return n

    def _sync(self, history: list[int]) -> None:
        n = self.keep_prefix(history)
        if n < len(history):
            self.ctx.decode(history[n:], n, self.seq, logits_last=False)

    def draft(self, history, n_max, dist, rng):
        if n_max <= 0:
            return [], None
        self._sync(history[:-1])
        ctx, pos = self.ctx, len(history) - 1
        drafts, qs = [], []
        token = history[-1]
        while len(drafts) < n_max and pos + 1 < ctx.n_ctx:
            ctx.decode_one(token, pos, self.seq)
            token = next_draft(ctx.logits(), self.threshold, dist, rng, qs)
            if token is None:
                break
            drafts.append(token)
            pos += 1
        return drafts, (np.stack(qs) if qs else None)

    def rollback(self, pos: int) -> None:
        self.ctx.remove(self.seq, pos)


class Lookup(Drafter):
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the last n-gram."""

    def __init__(self, ngram_max: int = 4, ngram_min: int = 2):
        if not 1 <= ngram_min <= ngram_max:
            raise UsageError(f"lookup n-gram sizes must satisfy 1 <= min <= max, not {ngram_min}, {ngram_max}")
        self.ngram_min, self.ngram_max = ngram_min, ngram_max
        self._seen: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token after its latest occurrence
        self._indexed = 1  # n-grams ending before this index are in _seen

    def prefill(self, tokens: list[int]) -> None:
        self._seen.clear()
        self._indexed = 1

    def _index(self, history: list[int]) -> None:
        """History only grows within a generation (it holds accepted tokens only)."""
        for end in range(self._indexed, len(history)):
            for n in range(self.ngram_min, min(self.ngram_max, end) + 1):
                self._seen[tuple(history[end - n:end])] = end
        self._indexed = max(self._indexed, len(history))

    def draft(self, history, n_max, dist, rng):
        self._index(history)
        for n in range(self.ngram_max, self.ngram_min - 1, -1):
            if len(history) < n:
                continue
            start = self._seen.get(tuple(history[-n:]))
            if start is not None and start < len(history):
                drafts = history[start:start + n_max]
                if dist is None:
                    return list(drafts), None
                q = np.zeros((len(drafts), dist.n_vocab), np.float32)  # a point mass on each draft
                q[np.arange(len(drafts)), drafts] = 1.0
                return list(drafts), q
        return [], None


# ---------------------------------------------------------------------------- the loop


def speculative_tokens(verifier: Verifier, drafter: Drafter, prompt: list[int], params: SamplingParams,
                       timings: Timings, stats: SpecStats, draft_max: int = DRAFT_MAX,
                       logprobs: list[TokenLogprob] | None = None) -> Iterator[int]:
    """Like generate.generate_tokens, through draft-and-verify rounds; the return value is the finish reason.
    With a `logprobs` list, each token's TokenLogprob (from the verifier's row that chose it) is appended to it
    before the token is yielded."""
    model = verifier.model
    if len(prompt) >= verifier.n_ctx:
        raise ContextOverflowError(f"prompt of {len(prompt)} tokens does not fit the context of {verifier.n_ctx}")
    mode = speculative_mode(params)
    chain = SamplerChain(params, model, verifier.n_ctx)
    dist = Distribution(params, model) if mode == "sample" else None
    rng = np.random.default_rng(params.seed) if mode == "sample" else None  # greedy never draws (nor loads numpy.random)
    t0 = time.perf_counter()
    try:
        chain.accept_prompt(prompt)
        timings.cached_tokens = verifier.prefill(prompt)
        if verifier is not drafter:
            drafter.prefill(prompt)
        timings.prompt_tokens = len(prompt)
        timings.prompt_s = time.perf_counter() - t0
        token = _first(verifier, chain, dist, rng, mode)
        n_top = params.logprobs

        def scored(row, t: int | None):  # the TokenLogprob of t, drawn from the verifier's `row`
            return token_logprob(row, t, n_top) if logprobs is not None and t is not None else None

        token_lp = scored(np.ctypeslib.as_array(lib.llama_get_logits_ith(verifier.ctx_ptr, -1),
                                                shape=(model.n_vocab,)), token)
        timings.ttft_s = time.perf_counter() - t0
        t_first = time.perf_counter()
        history = list(prompt)
        n_out = 0
        while True:
            if n_out >= params.max_tokens:
                return "length"
            if token is None:
                return "stop"
            if model.is_eog(token) and (not params.ignore_eos or chain.constrained):
                return "stop"
            n_out += 1
            timings.completion_tokens = n_out
            if logprobs is not None:
                logprobs.append(token_lp)
            yield token
            history.append(token)
            if n_out >= params.max_tokens:
                return "length"
            pos = len(history) - 1
            if pos >= verifier.n_ctx:
                return "length"
            # drafts that could all be kept: the verifier's own token follows them, within max_tokens and one batch
            room = min(draft_max, params.max_tokens - n_out - 1, verifier.n_ctx - 1 - pos, verifier.max_batch - 1)
            drafts, q = drafter.draft(history, room if mode != "plain" else 0, dist, rng)
            rows = verifier.verify([token, *drafts], pos)
            stats.rounds += 1
            stats.drafted += len(drafts)
            if mode == "plain":
                token = chain.sample(verifier.ctx_ptr, -1)
                accepted = []
            else:
                accepted, token = _accept(drafts, rows, q, dist, rng, mode)
                stats.accepted += len(accepted)
            scores = [scored(rows[j], t) for j, t in enumerate(accepted)]  # rows[j] verified draft j
            token_lp = scored(rows[len(accepted)], token)
            verifier.rollback(pos + 1 + len(accepted))
            if verifier is not drafter:
                drafter.rollback(pos + 1 + len(accepted))
            for t, lp in zip(accepted, scores):
                if model.is_eog(t) and not params.ignore_eos:
                    return "stop"
                n_out += 1
                timings.completion_tokens = n_out
                if logprobs is not None:
                    logprobs.append(lp)
                yield t
                history.append(t)
            timings.gen_s = time.perf_counter() - t_first
    finally:
        chain.close()
        if dist is not None:
            dist.close()
        verifier.finish()


def _first(verifier: Verifier, chain: SamplerChain, dist, rng, mode: str) -> int | None:
    if mode == "plain":
        return chain.sample(verifier.ctx_ptr, -1)
    ptr = lib.llama_get_logits_ith(verifier.ctx_ptr, -1)
    row = np.ctypeslib.as_array(ptr, shape=(verifier.model.n_vocab,))
    if mode == "greedy":
        return int(row.argmax())
    return draw(dist(row.copy()), rng)


def _accept(drafts: list[int], rows: np.ndarray, q, dist, rng, mode: str) -> tuple[list[int], int]:
    """(accepted drafts, the next token) from the verifier's rows for [last token, *drafts]."""
    if mode == "greedy":
        target = rows.argmax(axis=1).astype(np.int32)
        j = native.greedy_accept(np.asarray(drafts, np.int32), target) if drafts else 0
        return drafts[:j], int(target[j])
    p = np.stack([dist(r) for r in rows])
    if drafts:
        u = rng.random(len(drafts))
        j = native.speculative_accept(np.ascontiguousarray(p[:-1]), np.ascontiguousarray(q, np.float32),
                                      np.asarray(drafts, np.int32), u)
    else:
        j = 0
    if j < len(drafts):  # rejected at j: draw the replacement from the residual
        return drafts[:j], native.residual_sample(p[j], np.ascontiguousarray(q[j], np.float32), float(rng.random()))
    return drafts, draw(p[-1], rng)


# ---------------------------------------------------------------------------- set-up


@dataclass(frozen=True)
class SpeculativeOptions:
    early_exit: bool | int | None = None  # True: the split beside the model; k: the split at layer k
    draft: str | None = None  # path of a separate draft model
    lookup: bool = False  # prompt lookup drafts
    draft_max: int = DRAFT_MAX
    threshold: float = THRESHOLD

    def validate(self) -> None:
        chosen = [n for n, on in (("early_exit", self.early_exit not in (None, False)), ("draft", self.draft is not None),
                                  ("lookup", bool(self.lookup))) if on]
        if len(chosen) > 1:
            raise UsageError(f"choose one drafter, not {' and '.join(chosen)}")
        if isinstance(self.draft_max, bool) or not isinstance(self.draft_max, int) or not 1 <= self.draft_max <= 64:
            raise UsageError(f"draft_max must be an integer in [1, 64], not {self.draft_max!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not 0 <= self.threshold <= 1:
            raise UsageError(f"draft threshold must be in [0, 1], not {self.threshold!r}")
        if self.early_exit is not None and not isinstance(self.early_exit, bool) and (
                not isinstance(self.early_exit, int) or self.early_exit < 1):
            raise UsageError(f"early_exit must be true or a layer number >= 1, not {self.early_exit!r}")

    @property
    def enabled(self) -> bool:
        return self.early_exit not in (None, False) or self.draft is not None or self.lookup


def same_vocabulary(a, b) -> bool:
    keys = ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")
    return a.n_vocab == b.n_vocab and all(a.gguf.get(k) == b.gguf.get(k) for k in keys)
