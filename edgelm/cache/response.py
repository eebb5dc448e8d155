"""Response cache: deterministic requests answered without running the model.

Exact mode keys an answer by (model fingerprint, prompt tokens, sampling parameters); only
requests whose output is a function of those keys are cached: greedy ones, or sampled ones with
a fixed seed. Semantic mode (off by default) also answers a greedy request whose prompt embedding
lies within a cosine threshold of a cached prompt's, under the same model and parameters; it is
never used for sampled requests. Entries expire after `ttl` seconds; at most `max_entries` are kept (LRU).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from edgelm.errors import UsageError


@dataclass(frozen=True)
class CachedResponse:
    text: str
    tokens: tuple[int, ...]
    finish_reason: str


@dataclass
class _Entry:
    response: CachedResponse
    expires: float
    group: str  # model and parameters, without the prompt: where semantic lookups search
    vector: np.ndarray | None = None


def _params_json(params) -> str:
    d = dataclasses.asdict(params)
    d["logit_bias"] = sorted((int(k), float(v)) for k, v in params.logit_bias.items())
    if isinstance(d.get("json_schema"), dict):
        d["json_schema"] = json.dumps(d["json_schema"], sort_keys=True)
    return json.dumps(d, sort_keys=True, default=str)


class ResponseCache:
    def __init__(self, *, max_entries: int = 1024, ttl: float = 3600.0, semantic_threshold: float | None = None,
                 embed: Callable[[list[str]], np.ndarray] | None = None, clock: Callable[[], float] = time.monotonic):
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise UsageError(f"max_entries must be a positive integer, not {max_entries!r}")
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0 or math.isnan(ttl):
            raise UsageError(f"ttl must be a positive number of seconds, not {ttl!r}")
        if semantic_threshold is not None and (
                isinstance(semantic_threshold, bool) or not isinstance(semantic_threshold, (int, float))
                or not 0.0 < semantic_threshold <= 1.0):
            raise UsageError(f"semantic_threshold must be in (0, 1], not {semantic_threshold!r}")
        self.max_entries, self.ttl, self.semantic_threshold = max_entries, float(ttl), semantic_threshold
        self.embed = embed  # texts -> unit vectors; the owning Model supplies its own when None
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = {"hits": 0, "semantic_hits": 0, "misses": 0, "stores": 0}

    @staticmethod
    def cacheable(params) -> bool:
        # a cached answer keeps text and tokens, not the logprobs a request may ask for
        return (params.greedy or params.seed is not None) and params.logprobs is None

    @staticmethod
    def _group(fingerprint: str, params) -> str:
        return hashlib.sha256(f"{fingerprint}\0{_params_json(params)}".encode()).hexdigest()

    @classmethod
    def key(cls, fingerprint: str, tokens: Sequence[int], params) -> str | None:
        """The exact-match key, or None for a request whose output is not determined by its inputs."""
        if not cls.cacheable(params):
            return None
        h = hashlib.sha256(cls._group(fingerprint, params).encode())
        h.update(np.asarray(tokens, dtype="<i4").tobytes())
        return h.hexdigest()

    def get(self, fingerprint: str, tokens: Sequence[int], params, text: str | None = None
            ) -> tuple[CachedResponse, str] | None:
        """(response, "exact" | "semantic") or None. `text` is the prompt as text, for semantic lookups."""
        key = self.key(fingerprint, tokens, params)
        if key is None:
            return None
        with self._lock:
            self._expire()
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.stats["hits"] += 1
                return entry.response, "exact"
        if self.semantic_threshold is not None and params.greedy and text is not None and self.embed is not None:
            group = self._group(fingerprint, params)
            with self._lock:
                candidates = [(k, e) for k, e in self._entries.items() if e.group == group and e.vector is not None]
            if candidates:
                v = self._vector(text)
                k, e = max(candidates, key=lambda ke: float(ke[1].vector @ v))
                if float(e.vector @ v) >= self.semantic_threshold:
                    with self._lock:
                        if k in self._entries:
                            self._entries.move_to_end(k)
                        self.stats["semantic_hits"] += 1
                    return e.response, "semantic"
        with self._lock:
            self.stats["misses"] += 1
        return None

    def put(self, fingerprint: str, tokens: Sequence[int], params, response: CachedResponse,
            text: str | None = None) -> None:
        key = self.key(fingerprint, tokens, params)
        if key is None:
            return
        vector = None
        if self.semantic_threshold is not None and params.greedy and text is not None and self.embed is not None:
            vector = self._vector(text)
        with self._lock:
            self._entries[key] = _Entry(response, self._clock() + self.ttl, self._group(fingerprint, params), vector)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            self.stats["stores"] += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._entries)

    def _vector(self, text: str) -> np.ndarray:
        v = np.asarray(self.embed([text]), dtype=np.float32).reshape(-1)
        norm = float(np.linalg.norm(v))
        return v / norm if norm > 0 else v

    def _expire(self) -> None:
        now = self._clock()
        for k in [k for k, e in self._entries.items() if e.expires <= now]:
            del self._entries[k]
