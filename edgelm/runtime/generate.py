"""Generation, layered: prefill -> decode step -> token stream -> text stream -> completion."""
from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field
from typing import Iterator

from edgelm.cache.prefix import common_prefix
from edgelm.errors import ContextOverflowError, UsageError

from .canonical import prefill_batches, reusable
from .context import Context
from .logprobs import LogprobReader, TokenLogprob
from .sampling import SamplerChain, SamplingParams


@dataclass
class Timings:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # leading prompt tokens reused from the KV or the prompt cache, not evaluated
    completion_tokens: int = 0
    prompt_s: float = 0.0  # prefill time
    ttft_s: float = 0.0  # request start -> first generated token
    gen_s: float = 0.0  # time spent after the first token
    response_cache: str | None = None  # "exact" or "semantic" when the response cache answered
    speculative: object | None = None  # speculative.SpecStats of a speculative generation

    @property
    def prompt_tps(self) -> float:  # over the prompt tokens actually evaluated
        return (self.prompt_tokens - self.cached_tokens) / self.prompt_s if self.prompt_s else 0.0

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
    logprobs: list[TokenLogprob] | None = None  # one per token, when the request asked for logprobs
    tool_calls: list | None = None  # on the last chunk of a chat offered tools: the calls made (runtime.tools)
    reasoning: str | None = None  # a chat reply's thinking in this chunk, kept out of text (runtime.reasoning)


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str
    timings: Timings = field(default_factory=Timings)
    logprobs: list[TokenLogprob] | None = None  # one per token, when the request asked for logprobs
    tool_calls: list | None = None  # the calls a chat offered tools made (runtime.tools.ToolCall)
    reasoning: str | None = None  # a chat reply's thinking (<think>...</think>), kept out of text


REUSE = ("exact", "fast", "off")


def prefill(ctx: Context, tokens: list[int], seq: int = 0, cache=None, reuse: str = "exact") -> int:
    """Make `seq` hold `tokens`, evaluating only what neither it nor the prompt cache already holds.

    reuse "exact" takes only canonically evaluated positions and leaves at least ctx.canonical_rows
    positions to evaluate canonically, so the output is exactly a cold run's; "fast" takes every shared
    position (llama-server's behaviour: logits may differ in the last bits); "off" evaluates all.
    Returns how many leading tokens were reused.
    """
    if reuse not in REUSE:
        raise UsageError(f"kv_reuse must be one of {', '.join(REUSE)}, not {reuse!r}")

    rows = ctx.canonical_rows

    def usable(shared: int, exact: int) -> int:
        return reusable(shared, exact, len(tokens), reuse, rows)

    n = usable(common_prefix(ctx.seq_tokens(seq), tokens), ctx.exact_tokens(seq))
    source_exact = ctx.exact_tokens(seq)
    if cache is not None and reuse != "off":
        shared, entry = cache.lookup(tokens)
        if entry is not None and usable(shared, entry.exact) > n:
            if cache.restore(seq, entry):
                n, source_exact = usable(shared, entry.exact), entry.exact
            else:
                n = 0
    if not ctx.remove(seq, n):  # a memory that cannot cut a sequence short: start over
        ctx.remove(seq)
        n = 0
    batches, exact = prefill_batches(n, len(tokens), ctx.n_batch, source_exact, rows)
    for lo, hi in batches:
        ctx.decode(tokens[lo:hi], lo, seq, logits_last=hi == len(tokens))
    ctx.set_tokens(seq, tokens, exact=exact)
    return n


def shift_keep(prompt: list[int], keep: int, bos: int | None) -> int:
    """Positions a context shift keeps for `prompt` (llama.cpp's --keep): its first `keep` tokens (-1: all of
    them), and a leading BOS always."""
    n = len(prompt) if keep == -1 else min(keep, len(prompt))
    return max(n, int(bool(prompt) and prompt[0] == bos))


def truncated(tokens: list[int], n: int, head: int) -> list[int]:
    """`n` tokens of `tokens`: its first `head` (a BOS, kept positions) and then its most recent ones."""
    head = min(head, n // 2)
    return tokens[:head] + tokens[len(tokens) - n + head:]


def check_keep(keep) -> None:
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < -1:
        raise UsageError(f"keep must be an integer >= -1 (-1: the whole prompt), not {keep!r}")


def generate_tokens(
    ctx: Context, prompt: list[int], params: SamplingParams, timings: Timings, seq: int = 0, cache=None,
    reuse: str = "exact", logprobs: list[TokenLogprob] | None = None, keep: int | None = None,
) -> Iterator[int]:
    """Prefill `prompt` from position 0 and yield sampled tokens until EOG, max_tokens or the context end.

    With a prompt `cache`, a shared prefix is restored rather than evaluated, and the sequence's
    state is offered to the cache when generation ends. The generator's return value
    (StopIteration.value) is the finish reason. With a `logprobs` list, each token's TokenLogprob is
    appended to it before the token is yielded. With `keep` (context shift, as llama.cpp's --context-shift), the
    context's end drops the older half of what follows the first `keep` positions and generation goes on.
    """
    if len(prompt) >= ctx.n_ctx:
        raise ContextOverflowError(f"prompt of {len(prompt)} tokens does not fit the context of {ctx.n_ctx}")
    sampler = SamplerChain(params, ctx.model, ctx.n_ctx)
    sampler.accept_prompt(prompt)
    t0 = time.perf_counter()
    try:
        timings.cached_tokens = prefill(ctx, prompt, seq, cache, reuse)
    except BaseException:
        sampler.close()
        raise
    timings.prompt_tokens = len(prompt)
    timings.prompt_s = time.perf_counter() - t0
    pos = len(prompt)
    model = ctx.model
    reader = LogprobReader(model.n_vocab, params.logprobs) if logprobs is not None else None
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
            if reader is not None:
                logprobs.append(reader.read(ctx.ptr, -1, token))
            yield token
            if pos >= ctx.n_ctx and keep is not None and pos - keep >= 2:
                pos -= ctx.shift(seq, keep, pos)
            if pos >= ctx.n_ctx or i + 1 == params.max_tokens:  # no step whose logits nobody reads
                timings.gen_s = time.perf_counter() - t_first
                return "length"
            ctx.decode_one(token, pos, seq)
            pos += 1
            timings.gen_s = time.perf_counter() - t_first
        return "length"
    finally:
        sampler.close()
        release(ctx, seq, cache, reuse)


def release(ctx: Context, seq: int, cache=None, reuse: str = "exact") -> None:
    """A generation in `seq` ended: keep what a later request may reuse, and offer it to the prompt cache."""
    if reuse == "exact":  # what lies past the canonical prefix can never be reused exactly: free it now
        ctx.remove(seq, ctx.exact_tokens(seq))
    if cache is not None and reuse != "off":
        cache.store(seq)


class StopMatcher:
    """Holds back text that could be the start of a stop string, so stops are never emitted."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, stopped)."""
        if not self.stops:
            return text, False
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
           seq: int = 0, cache=None, reuse: str = "exact", keep: int | None = None) -> Iterator[Chunk]:
    """Text chunks as they are generated; the last chunk carries the finish reason."""
    timings = timings if timings is not None else Timings()
    logprobs = [] if params.logprobs is not None else None
    tokens = generate_tokens(ctx, prompt, params, timings, seq, cache, reuse, logprobs, keep)
    return text_stream(ctx.model, tokens, params, timings, logprobs)


def text_stream(model, tokens: Iterator[int], params: SamplingParams, timings: Timings,
                logprobs: list[TokenLogprob] | None = None) -> Iterator[Chunk]:
    """Text chunks of a token generator (whose return value is the finish reason), stop strings held back.
    `logprobs`: the list the generator appends each token's TokenLogprob to; each chunk takes its own."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # holds split UTF-8 sequences
    stops = StopMatcher(params.stop)
    while True:
        try:
            token = next(tokens)
        except StopIteration as done:
            tail = stops.flush() + decoder.decode(b"", final=True)
            yield Chunk(tail, [], done.value, timings, None if logprobs is None else [])
            return
        text, stopped = stops.feed(decoder.decode(model.token_bytes(token)))
        taken = None
        if logprobs is not None:
            taken = logprobs[:]
            logprobs.clear()
        if stopped:
            tokens.close()
            yield Chunk(text, [token], "stop", timings, taken)
            return
        yield Chunk(text, [token], logprobs=taken)


def generate(ctx: Context, prompt: list[int], params: SamplingParams, cache=None, reuse: str = "exact",
             keep: int | None = None) -> Completion:
    if params.stop:  # stop strings are looked for in the text as it grows
        return collect(stream(ctx, prompt, params, cache=cache, reuse=reuse, keep=keep))
    # nothing to look at before the end: the tokens alone, their text decoded once (what the chunks would join to)
    timings = Timings()
    logprobs = [] if params.logprobs is not None else None
    tokens = generate_tokens(ctx, prompt, params, timings, 0, cache, reuse, logprobs, keep)
    ids: list[int] = []
    try:
        while True:
            ids.append(next(tokens))
    except StopIteration as done:
        reason = done.value
    text = b"".join(map(ctx.model.token_bytes, ids)).decode("utf-8", errors="replace")
    return Completion(text, ids, reason, timings, logprobs)


def collect(chunks: Iterator[Chunk]) -> Completion:
    """A Completion from a stream of chunks (the last one carries the finish reason and timings)."""
    timings = Timings()
    parts, ids, reason, logprobs, calls, thoughts = [], [], "length", None, None, []
    for chunk in chunks:
        calls = chunk.tool_calls or calls
        if chunk.reasoning is not None:
            thoughts.append(chunk.reasoning)
        timings = chunk.timings or timings
        parts.append(chunk.text)
        ids.extend(chunk.tokens)
        reason = chunk.finish_reason or reason
        if chunk.logprobs is not None:
            logprobs = logprobs if logprobs is not None else []
            logprobs.extend(chunk.logprobs)
    return Completion("".join(parts), ids, reason, timings, logprobs, calls,
                      "".join(thoughts).rstrip() if thoughts else None)
