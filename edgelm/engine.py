"""Continuous batching: many concurrent requests decoded together, one `llama_decode` per step.

One worker thread owns a context with one KV sequence per slot, each in a KV stream of its own (so
attention never scans another slot's cells). Each step it admits queued requests into free slots,
then builds one batch: prompt chunks of requests being prefilled first (bounded so running streams
keep flowing), then the pending token of every decoding request. After the decode each request samples from its
own logits row with its own sampler chain and streams text chunks to its consumer. Finished or
cancelled requests leave between steps; their KV stays in their slot for a follow-up request that
shares the prefix (engine_reuse.py), and goes to the prompt cache when one is configured. With a drafter
(prompt lookup or a draft model, drafting.py) each decoding stream also brings drafts to the step, verified in
the same decode. A request submitted with `keep` goes on past its sequence's context end: there the older half
of what follows its first `keep` positions leaves the KV and the rest moves down (a context shift, as
llama-server's --context-shift does).
"""
from __future__ import annotations

import codecs
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass

import llama_cpp as lib

from .drafting import SlotDrafting, Speculation, check_draft_options
from .engine_reuse import _ALL, SlotReuse
from .engine_slots import SlotFiles
from .errors import ContextOverflowError, EdgelmError, ModelLoadError, UsageError
from .runtime.backend import release_workers, running_graphs
from .runtime.canonical import ROW_GROUP, canonical_sequences
from .request import POLL_S, QueueFullError, Request, RequestCancelled  # noqa: F401 (POLL_S: the consumers' tick)
from .runtime.context import Context, ContextOptions
from .runtime.generate import Chunk, StopMatcher, check_keep, shift_keep
from .runtime.logprobs import LogprobReader
from .runtime.model import LlamaModel
from .runtime.sampling import SamplerChain, SamplingParams
from .runtime.speculative import DRAFT_MAX, THRESHOLD

NO_DRAFTS = ((), None)  # what drafted.get() gives a slot without drafts this step


@dataclass(frozen=True)
class EngineOptions:
    n_parallel: int = 4  # sequences decoded together
    n_ctx: int = 2048  # context of each sequence
    n_batch: int = 512  # tokens per decode step; prompt chunks get what decoding leaves
    max_queue: int = 64  # waiting requests beyond the running ones
    max_tokens_cap: int = 4096  # no request generates more
    n_threads: int | None = None
    flash_attn: bool | None = None
    type_k: str = "f16"
    type_v: str = "f16"
    warmup: bool = True  # one throw-away decode at start (Context.warm_up), as llama-server does
    share_prefill: bool = True  # a request waits for another slot's prefill of its prompt's prefix, and copies it
    lookup: bool = False  # prompt-lookup drafts for every decoding stream (drafting.py); or Engine(draft_model=)
    draft_max: int = DRAFT_MAX  # drafts per stream and step, at most
    draft_threshold: float = THRESHOLD  # a draft model drafts while its top probability is at least this
    draft_cost_model: bool = True  # drafts only where they are expected to pay (drafting.py); False: up to draft_max

    def validate(self) -> None:
        for name in ("n_parallel", "n_ctx", "n_batch", "max_queue", "max_tokens_cap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name} must be a positive integer, not {value!r}")
        if self.n_batch < self.n_parallel:
            raise UsageError(f"n_batch ({self.n_batch}) must be at least n_parallel ({self.n_parallel})")
        check_draft_options(self.lookup, None, self.draft_max, self.draft_threshold)


class _Slot:
    """A KV sequence and the request it serves."""

    def __init__(self, seq: int):
        self.seq = seq
        self.held: list[int] = []  # tokens in this sequence's KV, by position
        self.exact = 0  # leading positions evaluated canonically (see runtime.generate)
        self.req: Request | None = None
        self.last: Request | None = None  # the request it serves or served last (llama-server's /slots)
        self.adapters: tuple[float, ...] | None = None  # the LoRA scales its KV was computed with (None: the model's)
        # (slot, its request, positions): a slot prefilling this request's prompt prefix, waited for, then copied
        self.donor: tuple[_Slot, Request, int] | None = None

    def start(self, req: Request, model: LlamaModel, n_ctx: int, reuse: int) -> None:
        self.req = req
        req.slot = self.seq
        self.last = req
        self.sampler = SamplerChain(req.params, model, n_ctx)
        self.sampler.accept_prompt(req.tokens)
        self.logprobs = LogprobReader(model.n_vocab, req.params.logprobs) if req.params.logprobs is not None else None
        # positions a context shift keeps (runtime.generate.shift_keep); None: the context's end is the end
        self.keep = None if req.keep is None else shift_keep(req.tokens, req.keep, model.bos)
        self.cursor = reuse  # next prompt position to evaluate
        self.donor = None
        self.drafts = None  # StreamDrafts when the engine drafts and this request's sampling takes drafts
        self.pending: int | None = None  # sampled, not yet in the KV
        self.n_out = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = StopMatcher(req.params.stop)
        self.t0 = time.perf_counter()
        req.timings.cached_tokens = reuse

    @property
    def prefilling(self) -> bool:
        return self.req is not None and self.cursor < len(self.req.tokens)

    @property
    def evaluating(self) -> bool:
        """Prefilling now, not waiting for another slot's prefill of the same prefix."""
        return self.prefilling and self.donor is None


class Engine(SlotReuse, SlotDrafting, SlotFiles):
    def __init__(self, model: LlamaModel, options: EngineOptions | None = None, *, prompt_cache=None,
                 threaded: bool = True, draft_model: LlamaModel | None = None):
        """threaded=False: no worker thread; the caller drives it with run_until_idle(). Either way one thread
        runs every graph of the engine, its warm-up included: llama.cpp's OpenMP workers decode at half speed
        or worse while a second thread of the process keeps a pool of them (runtime/backend.py).
        draft_model: a model sharing the vocabulary that drafts for every stream (in a context of the engine's)."""
        self.options = options = options or EngineOptions()
        options.validate()
        self.model = model
        ctx_options = ContextOptions(
            n_ctx=options.n_ctx * options.n_parallel, n_batch=options.n_batch, n_threads=options.n_threads,
            n_seq_max=options.n_parallel, flash_attn=options.flash_attn, type_k=options.type_k,
            type_v=options.type_v, kv_unified=False)
        self.stats = {"requests": 0, "completed": 0, "cancelled": 0, "rejected": 0, "prompt_tokens": 0,
                      "cached_tokens": 0, "generated_tokens": 0, "steps": 0, "batch_tokens": 0, "last_batch": 0,
                      "shared_prefix_hits": 0, "draft_rounds": 0, "drafted": 0, "draft_accepted": 0,
                      "context_shifts": 0, "lora_switches": 0}
        self.speculation = None
        if options.lookup or draft_model is not None:
            self.speculation = Speculation(model, ctx_options, lookup=options.lookup, draft_model=draft_model,
                                           draft_max=options.draft_max, threshold=options.draft_threshold,
                                           stats=self.stats)
        self.ctx = Context(model, ctx_options)
        self.prompt_cache = prompt_cache
        self._slots = [_Slot(i) for i in range(options.n_parallel)]
        self._queue: deque[Request] = deque()
        self._cv = threading.Condition()
        self._adapters: tuple[float, ...] | None = None  # the LoRA scales set on the context (None: the model's)
        self._turn_steps = 0  # steps decoded under them in a row
        self._closed = False
        self._paused = False  # submit_many holds admission until all its requests are queued
        self._calls: deque = deque()  # (function, future) to run on the engine's thread between steps
        self._thread = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="edgelm-engine", daemon=True)
            self._thread.start()
        if options.warmup:  # on the thread that decodes: one that only warmed up would keep a pool (runtime/backend.py)
            try:
                self.call(self._warm_up).result()
            except BaseException:
                self.close()
                raise

    def _warm_up(self) -> None:
        self.ctx.warm_up()
        if self.speculation is not None:
            self.speculation.warm_up()
            self.speculation.calibrate(self.ctx)

    # ------------------------------------------------------------ client side

    def submit(self, tokens: list[int], params: SamplingParams, keep: int | None = None,
               adapters: tuple[float, ...] | None = None) -> Request:
        """Queue a request (tokens already checked against the vocabulary); raises QueueFullError. With `keep`
        (llama.cpp's --keep: -1 the whole prompt) its generation shifts the context at the end, not stops.
        `adapters`: the model's LoRA adapters' scales for this request (llama-server's per-request `lora`); requests
        with other scales decode in steps of their own, and no KV computed under other scales is reused."""
        if not tokens:
            raise UsageError("empty prompt: nothing to condition on")
        if keep is not None:
            check_keep(keep)
            self.ctx.check_can_shift()
        self.model.check_tokens(tokens)
        if len(tokens) >= self.options.n_ctx:
            raise ContextOverflowError(f"prompt of {len(tokens)} tokens does not fit the context of "
                                       f"{self.options.n_ctx} per sequence")
        if params.max_tokens > self.options.max_tokens_cap:
            raise UsageError(f"max_tokens must be at most {self.options.max_tokens_cap}, not {params.max_tokens}")
        if adapters is not None:
            if self.model.lora is None:
                raise UsageError("LoRA scales for a request, but the model has no LoRA adapters")
            adapters = self.model.lora.scales(adapters)
        req = Request(list(tokens), params, keep, adapters)
        with self._cv:
            if self._closed:
                raise UsageError("the engine is closed")
            if len(self._queue) >= self.options.max_queue:
                self.stats["rejected"] += 1
                raise QueueFullError(f"{len(self._queue)} requests are waiting already; retry later")
            self._queue.append(req)
            self.stats["requests"] += 1
            self._cv.notify()
        return req

    def submit_many(self, items: list[tuple[list[int], SamplingParams]], keep: int | None = None,
                    adapters: tuple[float, ...] | None = None) -> list[Request]:
        """Queue several requests at once, so they start in the same step (a reproducible schedule)."""
        with self._cv:
            if len(self._queue) + len(items) > self.options.max_queue:
                self.stats["rejected"] += len(items)
                raise QueueFullError(f"{len(items)} requests do not fit the queue of {self.options.max_queue}")
            self._paused = True
        try:
            return [self.submit(tokens, params, keep, adapters) for tokens, params in items]
        finally:
            with self._cv:
                self._paused = False
                self._cv.notify()

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def active(self) -> int:
        return sum(s.req is not None for s in self._slots)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for req in list(self._queue):
            req._fail(RequestCancelled("the engine was closed"))
        self._queue.clear()
        self.ctx.close()
        if self.speculation is not None:
            self.speculation.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ worker

    def call(self, fn) -> Future:
        """Run fn() on the engine's thread between two steps (other llama.cpp work, e.g. embeddings, so
        that one thread of the process runs every graph); returns a concurrent.futures.Future."""
        future: Future = Future()
        if self._thread is None:  # driven by its caller: that is the thread
            self._run_call(fn, future)
            return future
        with self._cv:
            self._calls.append((fn, future))
            self._cv.notify()
        return future

    @staticmethod
    def _run_call(fn, future: Future) -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn())
            except BaseException as e:
                future.set_exception(e)

    def run_until_idle(self) -> None:
        """Decode in the calling thread until no request is queued or running (threaded=False)."""
        while True:
            with self._cv:
                if not self._queue and not any(s.req for s in self._slots):
                    return
                self._admit()
            self._guarded_step()

    def _run(self) -> None:
        with running_graphs():
            self._serve()

    def _serve(self) -> None:
        while True:
            with self._cv:
                while (not self._closed and (self._paused or not self._queue) and not self._calls
                       and not any(s.req for s in self._slots)):
                    release_workers()  # idle: another engine's graphs (router mode) must not meet this pool
                    self._cv.wait()
                if self._closed:
                    break
                calls = list(self._calls)
                self._calls.clear()
                if not self._paused:
                    self._admit()
            for fn, future in calls:
                self._run_call(fn, future)
            self._guarded_step()
        for slot in self._slots:
            if slot.req is not None:
                slot.req._fail(RequestCancelled("the engine was closed"))
                self._release(slot, keep=False)

    def _guarded_step(self) -> None:
        try:
            self._step()
        except BaseException as e:  # a broken step fails every running request, never hangs them
            for slot in self._slots:
                if slot.req is not None:
                    slot.req._fail(e if isinstance(e, EdgelmError) else ModelLoadError(str(e)))
                    self._release(slot, keep=False)

    def _admit(self) -> None:
        for slot in self._slots:
            if not self._queue:
                return
            if slot.req is None:
                req = self._queue.popleft()
                if req.cancelled:
                    self._cancelled_before_start(req)
                    continue
                slot.start(req, self.model, self.options.n_ctx, self._reuse(slot, req.tokens, req.adapters))
                if self.speculation is not None:
                    slot.drafts = self.speculation.start(slot.seq, req.params, slot.sampler)
                self._await_donor(slot)

    def _cancelled_before_start(self, req: Request) -> None:
        req.finish_reason = "cancelled"
        self.stats["cancelled"] += 1
        req._emit(Chunk("", [], "cancelled", req.timings))

    def _step(self) -> None:
        for slot in self._slots:
            if slot.req is not None and slot.req.cancelled:
                self._finish(slot, "cancelled")
        for slot in self._slots:
            if slot.donor is not None and not self._still_waiting(slot):
                self._take_from_donor(slot)
            elif slot.req is not None and slot.pending is not None and len(slot.held) >= self.options.n_ctx:
                self._shift(slot)
        decoding = [s for s in self._slots if s.req is not None and not s.prefilling and s.pending is not None]
        prefilling = sorted((s for s in self._slots if s.evaluating), key=lambda s: s.req.submitted)
        if not decoding and not prefilling:
            return
        adapters = self._adapter_turn(decoding + prefilling)
        if adapters is not _ALL:  # requests with other LoRA scales wait for their own step
            decoding = [s for s in decoding if s.req.adapters == adapters]
            prefilling = [s for s in prefilling if s.req.adapters == adapters]
        t_step = time.perf_counter()
        b = self.ctx._batch
        # outputs: (slot, batch index, output row) with logits; chunks: (slot, start, end)
        n, rows, outputs, chunks = 0, 0, [], []
        budget = self.options.n_batch - len(decoding)  # decoding streams always get their token
        # slot -> (drafts, their draft probabilities or None): verified in this step's decode; drafts come before
        # prompt chunks, as llama-server's do
        drafted = self._drafts(decoding, budget)
        budget -= sum(len(d) for d, _ in drafted.values())
        for slot in prefilling:  # prompt chunks first, then the decode tokens
            remaining = len(slot.req.tokens) - slot.cursor
            take = min(remaining, budget)
            if take < remaining:
                take -= take % ROW_GROUP  # a chunk that stops early stops at a row-group boundary
            if take <= 0:
                break
            tokens, start, last = slot.req.tokens, slot.cursor, len(slot.req.tokens) - 1
            chunks.append((slot, start, start + take))
            for p in range(start, start + take):
                b.token[n], b.pos[n], b.n_seq_id[n], b.seq_id[n][0] = tokens[p], p, 1, slot.seq
                b.logits[n] = p == last
                if p == last:
                    outputs.append((slot, n, rows))
                    rows += 1
                n += 1
            slot.cursor += take
            budget -= take
        for slot in decoding:  # the pending token, then the drafts after it, each with its logits row
            outputs.append((slot, n, rows))
            for i, token in enumerate((slot.pending, *drafted.get(slot, NO_DRAFTS)[0])):
                b.token[n], b.pos[n], b.n_seq_id[n], b.seq_id[n][0] = token, len(slot.held) + i, 1, slot.seq
                b.logits[n] = True
                n += 1
                rows += 1
        b.n_tokens = n
        rc = lib.llama_decode(self.ctx.ptr, b)
        if rc != 0:
            raise ModelLoadError(f"llama_decode failed with code {rc} (batch of {n} tokens)")
        self.stats["steps"] += 1
        self.stats["batch_tokens"] += n
        self.stats["last_batch"] = n
        # canonical (runtime/canonical.py): whole shares of llama.cpp's micro-batches, from a row-group boundary,
        # continuing a canonical prefix; the prompt's last partial row group never counts
        canonical = canonical_sequences(
            [(slot.seq, end - start) for slot, start, end in chunks] + [(slot.seq, 1) for slot in decoding],
            self.ctx.n_batch, self.ctx.canonical_rows) if chunks else set()
        for slot, start, end in chunks:
            slot.held = slot.req.tokens[:end]
            if slot.seq in canonical and start % ROW_GROUP == 0 and slot.exact == start:
                slot.exact = end if end < len(slot.req.tokens) else end - end % ROW_GROUP
        for slot in decoding:
            slot.held.append(slot.pending)
            slot.pending = None
        # plain greedy slots take their tokens from one argmax over every output row
        greedy_rows = sum(1 + len(drafted.get(s, NO_DRAFTS)[0]) for s, _, _ in outputs if s.sampler.argmax_only)
        argmax = self.ctx.output_argmax(rows) if greedy_rows > 1 else None
        now = time.perf_counter()
        for slot, index, row in outputs:
            if slot in drafted:
                self._verified(slot, index, row, *drafted[slot], argmax, now)
            elif argmax is not None and slot.sampler.argmax_only:
                self._sampled(slot, int(argmax[row]), now, index)
            else:
                self._sampled(slot, slot.sampler.sample(self.ctx.ptr, index), now, index)
        if self.speculation is not None and not chunks:
            # a step of decoding rows only, all told (drafts' verification and rollback too; a draft model's time
            # is its own cost): the cost model's data
            self.speculation.observe(n, time.perf_counter() - t_step)

    def _sampled(self, slot: _Slot, token: int | None, now: float, index: int) -> None:
        req, model = slot.req, self.model
        if slot.n_out == 0:
            req.timings.prompt_s = now - slot.t0  # prefill, interleaved with the other streams
            req.timings.ttft_s = now - req.submitted  # queueing included
            slot.t_first = now
            if req.params.max_tokens == 0:  # the prompt only (its KV stays for the next request, as llama-server's)
                self._finish(slot, "length")
                return
        if token is None or (model.is_eog(token) and (not req.params.ignore_eos or slot.sampler.constrained)):
            self._finish(slot, "stop")
            return
        slot.n_out += 1
        req.timings.completion_tokens = slot.n_out
        req.timings.gen_s = now - slot.t_first
        text, stopped = slot.stops.feed(slot.decoder.decode(model.token_bytes(token)))
        logprobs = None if slot.logprobs is None else [slot.logprobs.read(self.ctx.ptr, index, token)]
        if stopped:
            req._emit(Chunk(text, [token], logprobs=logprobs))
            self._finish(slot, "stop", flush=False)
            return
        if slot.n_out >= req.params.max_tokens or (len(slot.held) + 1 >= self.options.n_ctx
                                                   and not self._shifts(slot)):
            tail = slot.stops.flush() + slot.decoder.decode(b"", final=True)
            req._emit(Chunk(text + tail, [token], logprobs=logprobs))
            self._finish(slot, "length", flush=False)
            return
        req._emit(Chunk(text, [token], logprobs=logprobs))
        slot.pending = token

    def _shifts(self, slot: _Slot) -> bool:
        """Whether a slot near its context's end goes on, to shift once its pending token finds no position (as
        runtime.generate shifts): it was asked to and has at least two positions to halve."""
        return slot.keep is not None and len(slot.held) - slot.keep >= 2

    def _shift(self, slot: _Slot) -> None:
        """Context shift: the older half of what follows the kept positions leaves the KV, the rest moves down.
        Past the kept positions the KV no longer equals a fresh prefill's, so no later request reuses it; the
        stream drafts no more (a draft model's sequence would need the same shift)."""
        discard = self.ctx.shift(slot.seq, slot.keep, len(slot.held))
        del slot.held[slot.keep:slot.keep + discard]
        slot.exact = min(slot.exact, slot.keep)
        if slot.drafts is not None:
            slot.drafts.close()
            slot.drafts = None
        self.stats["context_shifts"] += 1

    def _finish(self, slot: _Slot, reason: str, *, flush: bool = True) -> None:
        req = slot.req
        tail = slot.stops.flush() + slot.decoder.decode(b"", final=True) if flush and reason != "cancelled" else ""
        req.finish_reason = reason
        req.timings.prompt_s = req.timings.prompt_s or time.perf_counter() - slot.t0
        self.stats["cancelled" if reason == "cancelled" else "completed"] += 1
        self.stats["prompt_tokens"] += len(req.tokens)
        self.stats["cached_tokens"] += req.timings.cached_tokens
        self.stats["generated_tokens"] += slot.n_out
        req._emit(Chunk(tail, [], reason, req.timings))
        self._release(slot, keep=True)

    def _release(self, slot: _Slot, keep: bool) -> None:
        """Free the slot. Its canonically evaluated prompt prefix stays in the KV for a request sharing it
        (and goes to the prompt cache, when there is one); the rest is dropped."""
        slot.sampler.close()
        if slot.drafts is not None:
            slot.drafts.close()
        slot.req = slot.donor = slot.drafts = None
        keep_n = min(slot.exact, len(slot.held)) if keep else 0
        if not self.ctx.remove(slot.seq, keep_n):
            self.ctx.remove(slot.seq)
            keep_n = 0
        del slot.held[keep_n:]
        slot.exact = keep_n
        if keep_n and self.prompt_cache is not None and slot.adapters is None:  # the cache knows the model's scales
            self.ctx.set_tokens(slot.seq, slot.held, exact=keep_n)
            self.prompt_cache.store(slot.seq)
