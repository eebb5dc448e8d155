"""A request to the batching engine, as its consumer sees it: chunks to iterate, cancel(), the completion.

The engine's thread fills it (`_emit`, `_fail`); any other thread reads it. Consumers look for new chunks every
POLL_S rather than being woken per token (see Request.__iter__).
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from typing import Iterator

from .errors import EdgelmError
from .runtime.generate import Chunk, Completion, Timings
from .runtime.sampling import SamplingParams


POLL_S = 0.02  # how often a consumer looks for new chunks


class QueueFullError(EdgelmError):
    """The engine's queue is full: retry later (the server answers 503 with Retry-After)."""

    retry_after = 1


class RequestCancelled(EdgelmError):
    """The request was cancelled before it finished."""


class Request:
    """A submitted request: iterate it for text chunks (the last carries finish_reason and timings)."""

    _ids = itertools.count(1)

    def __init__(self, tokens: list[int], params: SamplingParams, keep: int | None = None,
                 adapters: tuple[float, ...] | None = None):
        self.id = next(self._ids)
        self.tokens = tokens
        self.params = params
        self.keep = keep  # context shift: prompt positions kept (Engine.submit), None: none
        self.adapters = adapters  # the LoRA adapters' scales for this request; None: the model's own
        self.timings = Timings(prompt_tokens=len(tokens))
        self.finish_reason: str | None = None
        self.slot: int | None = None  # the engine's slot serving it, once admitted
        self._buffer: deque = deque()  # chunks (or an exception) not yet taken by the consumer
        self._done = threading.Event()
        self._parts: list[str] = []
        self._ids: list[int] = []
        self._logprobs = [] if params.logprobs is not None else None
        self._cancelled = threading.Event()
        self._error: BaseException | None = None
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        """Stop generating; the slot is freed within one decode step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request ends (True) or `timeout` seconds pass (False)."""
        return self._done.wait(timeout)

    def drain(self) -> list[Chunk]:
        """The chunks generated since the last call (never blocks)."""
        out = []
        while self._buffer:
            item = self._buffer.popleft()
            if isinstance(item, BaseException):
                raise item
            out.append(item)
        return out

    def __iter__(self) -> Iterator[Chunk]:
        # The consumer looks every POLL_S rather than being woken for each token: on a machine with as
        # many cores as llama.cpp threads, a thread woken mid-decode takes a core from llama.cpp, whose
        # workers then stall at every barrier of the graph (measured: 4x slower decoding at 2 threads).
        while True:
            for chunk in self.drain():
                yield chunk
                if chunk.finish_reason is not None:
                    return
            self._done.wait(POLL_S)

    def result(self) -> Completion:
        """Wait for the end, then the whole completion."""
        for _ in self:
            pass
        return self.completion()

    def completion(self) -> Completion:
        """What has been generated so far (all of it once finish_reason is set); a request that failed raises
        its error."""
        if self._error is not None:
            raise self._error
        logprobs = None if self._logprobs is None else list(self._logprobs)
        return Completion("".join(self._parts), list(self._ids), self.finish_reason, self.timings, logprobs)

    def _emit(self, chunk: Chunk) -> None:  # engine thread
        self._parts.append(chunk.text)
        self._ids.extend(chunk.tokens)
        if chunk.logprobs:
            self._logprobs.extend(chunk.logprobs)
        self._buffer.append(chunk)
        if chunk.finish_reason is not None:
            self._done.set()

    def _fail(self, error: BaseException) -> None:  # engine thread
        self._error = error
        self._buffer.append(error)
        self._done.set()
