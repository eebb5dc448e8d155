"""Sampling parameters, validated in Python, and the llama.cpp sampler chain they build."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import llama_cpp as lib

from edgelm.errors import UsageError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.8  # 0: greedy
    top_k: int = 40  # 0: off
    top_p: float = 0.95  # 1: off
    min_p: float = 0.05  # 0: off
    seed: int | None = None  # None: a fresh seed each call
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    @classmethod
    def from_kwargs(cls, **kwargs) -> "SamplingParams":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise UsageError(f"unknown sampling field(s): {', '.join(unknown)}")
        if isinstance(kwargs.get("stop"), str):
            kwargs["stop"] = (kwargs["stop"],)
        elif kwargs.get("stop") is not None:
            kwargs["stop"] = tuple(kwargs["stop"])
        params = cls(**{k: v for k, v in kwargs.items() if v is not None or k == "seed"})
        params.validate()
        return params

    def validate(self) -> None:
        def number(name: str, lo: float, hi: float = math.inf) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
                raise UsageError(f"{name} must be a number in [{lo}, {hi}], not {v!r}")

        def integer(name: str, lo: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise UsageError(f"{name} must be an integer >= {lo}, not {v!r}")

        integer("max_tokens", 0)
        integer("top_k", 0)
        number("temperature", 0.0)
        number("top_p", 0.0, 1.0)
        number("min_p", 0.0, 1.0)
        if self.seed is not None:
            integer("seed", 0)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise UsageError("stop must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class SamplerChain:
    """A llama.cpp sampler chain owned by Python; freed with the object."""

    def __init__(self, params: SamplingParams):
        self._ptr = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        add = lambda s: lib.llama_sampler_chain_add(self._ptr, s)  # noqa: E731
        if params.greedy:
            add(lib.llama_sampler_init_greedy())
            return
        if params.top_k > 0:
            add(lib.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            add(lib.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            add(lib.llama_sampler_init_min_p(params.min_p, 1))
        add(lib.llama_sampler_init_temp(params.temperature))
        seed = lib.LLAMA_DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF
        add(lib.llama_sampler_init_dist(seed))

    def sample(self, ctx_ptr, index: int = -1) -> int:
        # llama_sampler_sample also accepts the token into stateful samplers
        return lib.llama_sampler_sample(self._ptr, ctx_ptr, index)

    def close(self) -> None:
        if getattr(self, "_ptr", None):
            lib.llama_sampler_free(self._ptr)
            self._ptr = None

    def __del__(self):
        self.close()
