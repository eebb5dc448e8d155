"""Generation, layered: prefill -> decode step -> token stream -> text stream -> completion."""
from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field
from typing import Iterator

from edgelm.errors import ContextOverflowError

from .context import Context
from .sampling import SamplerChain, SamplingParams


@dataclass
class Timings:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_s: float = 0.0  # prefill time
    ttft_s: float = 0.0  # request start -> first generated token
    gen_s: float = 0.0  # time spent after the first token

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_s if self.prompt_s else 0.0

    @property
    def gen_tps(self) -> float:
        # the first token's cost is prefill; rate over the rest
        n = self.completion_tokens - 1
        return n / self.gen_s if n > 0 and self.gen_s else 0.0


@dataclass
class Chunk:
    text: str
    tokens: list[int]
    finish_reason: str | None = None  # "stop", "length" or None while running
    timings: Timings | None = None  # set on the last chunk


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str
    timings: Timings = field(default_factory=Timings)


def prefill(ctx: Context, tokens: list[int], seq: int = 0, start: int = 0) -> None:
    ctx.decode(tokens, start, seq)


def generate_tokens(
    ctx: Context, prompt: list[int], params: SamplingParams, timings: Timings, seq: int = 0
) -> Iterator[int]:
    """Prefill `prompt` from position 0 and yield sampled tokens until EOG, max_tokens or the context end.

    The generator's return value (StopIteration.value) is the finish reason.
    """
    if len(prompt) >= ctx.n_ctx:
        raise ContextOverflowError(f"prompt of {len(prompt)} tokens does not fit the context of {ctx.n_ctx}")
    sampler = SamplerChain(params, ctx.model, ctx.n_ctx)
    sampler.accept_prompt(prompt)
    t0 = time.perf_counter()
    ctx.remove(seq)
    prefill(ctx, prompt, seq)
    timings.prompt_tokens = len(prompt)
    timings.prompt_s = time.perf_counter() - t0
    pos = len(prompt)
    model = ctx.model
    try:
        for i in range(params.max_tokens):
            token = sampler.sample(ctx.ptr)
            if i == 0:
                t_first = time.perf_counter()
                timings.ttft_s = t_first - t0
            if token is None:  # no token allowed: a grammar dead end, or every token banned
                return "stop"
            if model.is_eog(token) and (not params.ignore_eos or sampler.constrained):
                return "stop"
            timings.completion_tokens = i + 1
            yield token
            if pos >= ctx.n_ctx:
                return "length"
            ctx.decode_one(token, pos, seq)
            pos += 1
            timings.gen_s = time.perf_counter() - t_first
        return "length"
    finally:
        sampler.close()


class StopMatcher:
    """Holds back text that could be the start of a stop string, so stops are never emitted."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, stopped)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        keep = max((n for s in self.stops for n in range(len(s) - 1, 0, -1) if self.pending.endswith(s[:n])), default=0)
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def stream(ctx: Context, prompt: list[int], params: SamplingParams, timings: Timings | None = None,
           seq: int = 0) -> Iterator[Chunk]:
    """Text chunks as they are generated; the last chunk carries the finish reason."""
    timings = timings if timings is not None else Timings()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # holds split UTF-8 sequences
    stops = StopMatcher(params.stop)
    tokens = generate_tokens(ctx, prompt, params, timings, seq)
    model = ctx.model
    while True:
        try:
            token = next(tokens)
        except StopIteration as done:
            tail = stops.flush() + decoder.decode(b"", final=True)
            yield Chunk(tail, [], done.value, timings)
            return
        text, stopped = stops.feed(decoder.decode(model.token_bytes(token)))
        if stopped:
            tokens.close()
            yield Chunk(text, [token], "stop", timings)
            return
        yield Chunk(text, [token])


def generate(ctx: Context, prompt: list[int], params: SamplingParams) -> Completion:
    timings = Timings()
    parts, ids, reason = [], [], "length"
    for chunk in stream(ctx, prompt, params, timings):
        parts.append(chunk.text)
        ids.extend(chunk.tokens)
        reason = chunk.finish_reason or reason
    return Completion("".join(parts), ids, reason, timings)
