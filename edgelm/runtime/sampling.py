"""Sampling parameters, validated in Python, and the llama.cpp samplers they build.

The order is llama.cpp's default common sampler: logit bias -> penalties -> DRY -> top-n-sigma -> top-k -> typical
-> top-p -> min-p -> XTC -> temperature (or dynamic temperature) -> dist; with mirostat, logit bias -> penalties ->
DRY -> temperature -> mirostat (greedy: logit bias -> penalties -> DRY -> argmax). `samplers` (llama.cpp's
--samplers, llama-server's field) names the ones to run and their order instead, "infill" among them. A grammar is
checked the way llama.cpp's common_sampler_sample does it: sample without it, and only when the grammar rejects that
token, mask the whole vocabulary with the grammar and sample again. Masking costs a pass over every token, so this
saves it on most steps.
"""
from __future__ import annotations

import ctypes
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import llama_cpp as lib
import numpy as np

from edgelm.errors import UsageError

from .grammar import Grammar, Utf8Guard, check_gbnf
from .json_schema import schema_to_gbnf
from .logprobs import MAX_TOP_LOGPROBS

INT32_MAX = 2**31 - 1
GREEDY_BELOW = 1e-4  # smaller temperatures are greedy: dividing logits by them can overflow float32
MAX_BIAS = 1e4  # |finite logit bias|; -inf bans a token
# llama.cpp's sampler names (--samplers, llama-server's `samplers`): the history samplers edgelm applies first, then
# the truncation samplers and temperature in the order given
HISTORY_SAMPLERS = ("penalties", "dry")
CHAIN_SAMPLERS = ("top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature", "infill")
SAMPLER_NAMES = HISTORY_SAMPLERS + CHAIN_SAMPLERS
MIROSTAT_M = 100  # Mirostat 1.0's tokens for estimating the distribution's shape (the paper's and llama.cpp's)
MAX_BREAKERS, MAX_BREAKER_BYTES = 32, 40  # DRY sequence breakers (llama.cpp cuts longer ones silently)
TYPICAL_FLOOR = 80.0  # typical_p: drop logits this far below the best, whose exp underflows to 0 (NaN entropy)

TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data
assert TOKEN_DATA.itemsize == ctypes.sizeof(lib.llama_token_data)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.8  # 0 (anything below 1e-4): greedy
    top_k: int = 40  # 0: off
    top_p: float = 0.95  # 1: off
    min_p: float = 0.05  # 0: off
    typical_p: float = 1.0  # 1: off
    repeat_penalty: float = 1.0  # 1: off
    presence_penalty: float = 0.0  # 0: off
    frequency_penalty: float = 0.0  # 0: off
    penalty_last_n: int = 64  # tokens the penalties look back over, prompt included; 0: off, -1: the whole context
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # token id -> added to its logit; -inf bans it
    grammar: str | None = None  # GBNF; generation starts at its `root` rule
    json_schema: dict | str | None = None  # a JSON schema, converted to GBNF; excludes `grammar`
    seed: int | None = None  # None: a fresh seed each call
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False  # never with a grammar: the grammar decides where output may end
    logprobs: int | None = None  # report each token's logprob and this many alternatives (0-20; runtime/logprobs.py)
    # llama.cpp's other samplers, with llama-server's names and defaults (each off by default)
    mirostat: int = 0  # 1, 2: Mirostat 1.0 / 2.0 holds each token's surprise near mirostat_tau (replaces top-k..dist)
    mirostat_tau: float = 5.0  # target surprise of each token, in bits (-log2 p)
    mirostat_eta: float = 0.1  # learning rate
    xtc_probability: float = 0.0  # XTC: with this probability a step drops every token above xtc_threshold but
    xtc_threshold: float = 0.1  # the least likely of them (when at least two are above it)
    dry_multiplier: float = 0.0  # DRY: penalise a token that would extend a repeat of earlier text; 0: off
    dry_base: float = 1.75  # the penalty is multiplier * base ** (repeat length - allowed length)
    dry_allowed_length: int = 2  # repeats this long go free
    dry_penalty_last_n: int = -1  # tokens DRY looks back over, prompt included; -1: the whole context
    dry_sequence_breakers: tuple[str, ...] = ("\n", ":", "\"", "*")  # a repeat never runs across these
    top_n_sigma: float = -1.0  # keep tokens within n standard deviations of the top logit; <= 0: off
    dynatemp_range: float = 0.0  # dynamic temperature: temperature +- range, by the distribution's entropy
    dynatemp_exponent: float = 1.0
    # the samplers to run, in order (SAMPLER_NAMES; "infill" merges the probabilities of tokens that share a prefix
    # and prefers end of text when it is likely, for code infilling); None: every sampler set above, in llama.cpp's
    # default order. A sampler left out is off whatever its value; without "temperature" the draw is at 1
    samplers: tuple[str, ...] | None = None

    @classmethod
    def from_kwargs(cls, **kwargs) -> "SamplingParams":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise UsageError(f"unknown sampling field(s): {', '.join(unknown)}")
        if isinstance(kwargs.get("samplers"), str):  # llama-cli's form: "top_k;top_p;temperature"
            kwargs["samplers"] = tuple(kwargs["samplers"].split(";"))
        for key in ("stop", "dry_sequence_breakers", "samplers"):  # one string, or a list of them
            if isinstance(kwargs.get(key), str):
                kwargs[key] = (kwargs[key],)
            elif isinstance(kwargs.get(key), (list, tuple)):
                kwargs[key] = tuple(kwargs[key])
        if isinstance(kwargs.get("logit_bias"), Mapping):
            kwargs["logit_bias"] = {_token_key(k): v for k, v in kwargs["logit_bias"].items()}
        params = cls(**{k: v for k, v in kwargs.items() if v is not None or k == "seed"})
        params.validate()
        return params

    def validate(self) -> None:
        """Raise UsageError naming the first bad field; llama.cpp aborts the process on some values."""
        _integer("max_tokens", self.max_tokens, 0)
        _integer("top_k", self.top_k, 0, INT32_MAX)
        _integer("penalty_last_n", self.penalty_last_n, -1, INT32_MAX)
        _number("temperature", self.temperature, 0.0, 100.0)
        _number("top_p", self.top_p, 0.0, 1.0)
        _number("min_p", self.min_p, 0.0, 1.0)
        _number("typical_p", self.typical_p, 0.0, 1.0)
        _number("repeat_penalty", self.repeat_penalty, 0.01, 100.0)  # > 0; bounded so logits stay finite
        _number("presence_penalty", self.presence_penalty, -100.0, 100.0)
        _number("frequency_penalty", self.frequency_penalty, -100.0, 100.0)
        if self.seed is not None:
            _integer("seed", self.seed, 0, lib.LLAMA_DEFAULT_SEED - 1)  # 0xFFFFFFFF means "random" to llama.cpp
        _integer("mirostat", self.mirostat, 0, 2)
        _number("mirostat_tau", self.mirostat_tau, 0.0, 100.0)
        _number("mirostat_eta", self.mirostat_eta, 0.0, 10.0)
        _number("xtc_probability", self.xtc_probability, 0.0, 1.0)
        _number("xtc_threshold", self.xtc_threshold, 0.0, 1.0)
        _number("dry_multiplier", self.dry_multiplier, 0.0, 100.0)
        _number("dry_base", self.dry_base, 1.0, 100.0)  # below 1 llama.cpp turns DRY off without a word
        _integer("dry_allowed_length", self.dry_allowed_length, 1, 1024)
        _integer("dry_penalty_last_n", self.dry_penalty_last_n, -1, INT32_MAX)
        breakers = self.dry_sequence_breakers
        if not isinstance(breakers, tuple) or len(breakers) > MAX_BREAKERS or not all(
                isinstance(b, str) and 0 < len(b.encode()) <= MAX_BREAKER_BYTES and "\0" not in b for b in breakers):
            raise UsageError(f"dry_sequence_breakers must be at most {MAX_BREAKERS} non-empty strings of at most "
                             f"{MAX_BREAKER_BYTES} bytes, not {breakers!r}")
        _number("top_n_sigma", self.top_n_sigma, -1.0, 100.0)
        _number("dynatemp_range", self.dynatemp_range, 0.0, 100.0)
        _number("dynatemp_exponent", self.dynatemp_exponent, 0.0, 100.0)
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise UsageError("stop must be non-empty strings")
        self._validate_samplers()
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs, 0, MAX_TOP_LOGPROBS)
        if not isinstance(self.ignore_eos, bool):
            raise UsageError(f"ignore_eos must be true or false, not {self.ignore_eos!r}")
        self._validate_logit_bias()
        if self.grammar is not None and self.json_schema is not None:
            raise UsageError("grammar and json_schema exclude each other: pass one")
        if self.grammar is not None:
            check_gbnf(self.grammar)
        if self.json_schema is not None:
            schema_to_gbnf(self.json_schema)

    def _validate_samplers(self) -> None:
        names = self.samplers
        if names is None:
            return
        if not isinstance(names, tuple) or not all(isinstance(n, str) for n in names):
            raise UsageError(f"samplers must be a list of sampler names, not {names!r}")
        bad = next((n for n in names if n not in SAMPLER_NAMES), None)
        if bad is not None:
            raise UsageError(f"samplers: unknown sampler {bad!r} (known: {', '.join(SAMPLER_NAMES)})")
        chain = [i for i, n in enumerate(names) if n in CHAIN_SAMPLERS]
        if chain and any(i > chain[0] for i, n in enumerate(names) if n in HISTORY_SAMPLERS):
            raise UsageError("samplers: penalties and dry must come before the other samplers "
                             "(edgelm applies them first, as llama.cpp's default order does)")
        if len(set(names)) != len(names):
            raise UsageError(f"samplers: each sampler at most once, not {names!r}")

    def uses(self, sampler: str) -> bool:
        """Whether `sampler` (SAMPLER_NAMES) may run: named in `samplers`, or every one without it."""
        return self.samplers is None or sampler in self.samplers

    def _validate_logit_bias(self) -> None:
        if not isinstance(self.logit_bias, Mapping):
            raise UsageError(f"logit_bias must map token ids to numbers, not {type(self.logit_bias).__name__}")
        for token, bias in self.logit_bias.items():
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise UsageError(f"logit_bias: token ids must be integers >= 0, not {token!r}")
            if isinstance(bias, bool) or not isinstance(bias, numbers.Real) or not (
                    bias == -math.inf or -MAX_BIAS <= bias <= MAX_BIAS):
                raise UsageError(f"logit_bias[{token}] must be a number in [{-MAX_BIAS:g}, {MAX_BIAS:g}] "
                                 f"or -inf, not {bias!r}")

    @property
    def greedy(self) -> bool:
        """An argmax over the (biased, penalized) logits: a temperature near 0 that runs, with no infill sampler
        before it to merge tokens."""
        return self.temperature < GREEDY_BELOW and self.uses("temperature") and not self.uses_infill

    @property
    def uses_infill(self) -> bool:
        return self.samplers is not None and "infill" in self.samplers

    @property
    def gbnf(self) -> str | None:
        """The grammar text that constrains output, from `grammar` or `json_schema`."""
        if self.json_schema is not None:
            return schema_to_gbnf(self.json_schema)
        return self.grammar

    @property
    def penalized(self) -> bool:
        return self.uses("penalties") and (
            self.repeat_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0)

    @property
    def dry(self) -> bool:
        return self.uses("dry") and self.dry_multiplier > 0.0 and self.dry_penalty_last_n != 0

    @property
    def stateful(self) -> bool:
        """Samplers whose choice depends on the tokens before (penalties, DRY, mirostat's running estimate) or on
        a random draw of their own (XTC): a rejected speculative draft would have moved them."""
        return self.penalized or self.dry or (not self.greedy and (self.mirostat > 0 or self.xtc_probability > 0))


def _number(name: str, v, lo: float, hi: float) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or not lo <= v <= hi:
        raise UsageError(f"{name} must be a number in [{lo:g}, {hi:g}], not {v!r}")


def _integer(name: str, v, lo: int, hi: int | None = None) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo or (hi is not None and v > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise UsageError(f"{name} must be an integer {bound}, not {v!r}")


def _token_key(key):
    """JSON objects (the OpenAI-style API) carry token ids as strings; numpy gives its own integers."""
    if isinstance(key, str) and key.isdecimal() or isinstance(key, numbers.Integral) and not isinstance(key, bool):
        return int(key)
    return key


class Candidates:
    """A llama_token_data_array over a numpy buffer: filled from the logits, edited in place by the samplers."""

    def __init__(self, n_vocab: int):
        self.buf = np.zeros(n_vocab, TOKEN_DATA)
        self.ids = np.arange(n_vocab, dtype=np.int32)
        data = ctypes.cast(self.buf.ctypes.data, lib.llama_token_data_p)
        self.array = lib.llama_token_data_array(data, n_vocab, -1, False)
        self.ref = ctypes.byref(self.array)

    def load(self, logits) -> None:
        """`logits`: a float* of n_vocab values (llama_get_logits_ith), or a numpy row."""
        n = len(self.buf)
        self.buf["id"] = self.ids
        self.buf["logit"] = logits if isinstance(logits, np.ndarray) else np.ctypeslib.as_array(logits, shape=(n,))
        self.buf["p"] = 0.0
        self.array.size, self.array.selected, self.array.sorted = n, -1, False

    def prune(self, floor: float | None = None) -> int:
        """Drop banned (-inf) candidates, and with `floor` those that far below the best; returns how many remain."""
        n = self.array.size
        logit = self.buf["logit"][:n]
        keep = logit > -np.inf
        if floor is not None and keep.any():
            keep &= logit >= logit[keep].max() - floor
        if not keep.all():
            idx = np.flatnonzero(keep)
            self.buf[:len(idx)] = self.buf[idx]
            self.array.size = n = len(idx)
        return n

    @property
    def selected(self) -> int:
        return int(self.buf["id"][self.array.selected])


def logit_bias_sampler(p: SamplingParams, n_vocab: int):
    """llama.cpp's logit-bias sampler for p.logit_bias (ids already checked against n_vocab)."""
    items = [lib.llama_logit_bias(t, float(b)) for t, b in p.logit_bias.items()]
    array = (lib.llama_logit_bias * len(items))(*items)  # llama.cpp copies it
    return lib.llama_sampler_init_logit_bias(n_vocab, len(items), array)


def add_truncation_and_temperature(add, p: SamplingParams, vocab=None) -> None:
    """Top-n-sigma, top-k, typical, top-p, min-p, XTC and temperature in llama.cpp's default order, or those of
    p.samplers in its order (the infill sampler needs the model's `vocab`), through `add(sampler)`; with mirostat,
    temperature alone (mirostat truncates). Samplers whose value turns them off are left out."""
    if p.mirostat != 0:
        order = ("temperature",) if p.uses("temperature") else ()
    else:
        order = CHAIN_SAMPLERS[:-1] if p.samplers is None else [n for n in p.samplers if n in CHAIN_SAMPLERS]
    for name in order:
        if name == "top_n_sigma" and p.top_n_sigma > 0:
            add(lib.llama_sampler_init_top_n_sigma(float(p.top_n_sigma)))
        elif name == "top_k" and p.top_k > 0:
            add(lib.llama_sampler_init_top_k(int(p.top_k)))
        elif name == "typ_p" and p.typical_p < 1.0:
            add(lib.llama_sampler_init_typical(float(p.typical_p), 1))
        elif name == "top_p" and p.top_p < 1.0:
            add(lib.llama_sampler_init_top_p(float(p.top_p), 1))
        elif name == "min_p" and p.min_p > 0.0:
            add(lib.llama_sampler_init_min_p(float(p.min_p), 1))
        elif name == "xtc" and p.xtc_probability > 0.0:
            add(lib.llama_sampler_init_xtc(float(p.xtc_probability), float(p.xtc_threshold), 1, _seed(p)))
        elif name == "infill":
            if vocab is None:
                raise UsageError("the infill sampler needs the model's vocabulary")
            add(lib.llama_sampler_init_infill(vocab))
        elif name == "temperature" and p.dynatemp_range > 0.0:
            add(lib.llama_sampler_init_temp_ext(float(p.temperature), float(p.dynatemp_range),
                                                float(p.dynatemp_exponent)))
        elif name == "temperature":
            add(lib.llama_sampler_init_temp(float(p.temperature)))


def _seed(p: SamplingParams) -> int:
    return lib.LLAMA_DEFAULT_SEED if p.seed is None else int(p.seed)


def dry_sampler(p: SamplingParams, model, last_n: int):
    """llama.cpp's DRY sampler over the last `last_n` tokens."""
    breakers = [b.encode() for b in p.dry_sequence_breakers]
    array = (ctypes.c_char_p * len(breakers))(*breakers)  # llama.cpp tokenizes and keeps its own copies
    return lib.llama_sampler_init_dry(model.vocab, float(p.dry_multiplier), float(p.dry_base),
                                      int(p.dry_allowed_length), int(last_n), array, len(breakers))


def biased_argmax(row: np.ndarray, ids: np.ndarray, bias: np.ndarray) -> int | None:
    """argmax(row + bias at ids), first of equal maxima, None when every token is banned; without copying the
    row when its own maximum is not a biased token (a copy of a 152k-token row costs ~0.2 ms a step)."""
    best = int(row.argmax())
    if not (ids == best).any():  # the unbiased maximum stands unless a biased token now reaches it
        values = row[ids] + bias
        top = values.max()
        if top < row[best]:
            return best
        first = int(ids[values == top].min())
        if top == row[best]:
            return min(first, best) if top > -np.inf else None
        return first
    row = row.copy()
    row[ids] += bias
    return int(row.argmax()) if row.max() > -np.inf else None


class SamplerChain:
    """llama.cpp samplers owned by Python, freed with the object.

    Logit bias and the samplers that remember tokens (penalties, DRY) stand alone so that prompt tokens reach only
    those (as llama.cpp's server and CLI accept them) and banned tokens can be dropped before the truncation
    samplers see them.
    """

    def __init__(self, params: SamplingParams, model, n_ctx: int):
        self.params = params
        self._bias = self._grammar = self._tail = self._utf8 = None
        self._history: list[tuple[object, int]] = []  # (sampler, the tokens it looks back over): penalties, DRY
        try:
            self._build(params, model, n_ctx)
        except BaseException:
            self.close()
            raise
        self._candidates = Candidates(model.n_vocab)
        # nothing to do in Python between the logits and the chain: let llama.cpp fill the candidates itself
        self._plain = self._bias is None and not self._history and self._grammar is None and (
            params.greedy or params.typical_p >= 1.0 or not params.uses("typ_p"))
        # plain greedy is an argmax over the logits row: numpy reads it in place, where llama_sampler_sample
        # would first copy the whole vocabulary into candidates (0.3 ms a token at 152k tokens, 0.01 ms this way)
        self._argmax_row = ctypes.c_float * model.n_vocab if self._plain and params.greedy else None
        # greedy with a logit bias and nothing else: the same argmax over a biased copy of the row
        self._biased = None
        if params.greedy and params.logit_bias and not self._history and self._grammar is None:
            self._argmax_row = ctypes.c_float * model.n_vocab
            ids = np.fromiter(params.logit_bias, dtype=np.int64, count=len(params.logit_bias))
            self._biased = (ids, np.array([params.logit_bias[int(t)] for t in ids], dtype=np.float32))

    def _build(self, p: SamplingParams, model, n_ctx: int) -> None:
        n_vocab = model.n_vocab
        if p.logit_bias:
            bad = next((t for t in p.logit_bias if t >= n_vocab), None)
            if bad is not None:  # llama.cpp indexes the logits with it unchecked
                raise UsageError(f"logit_bias: token id {bad} out of range [0, {n_vocab})")
            self._bias = logit_bias_sampler(p, n_vocab)
        last_n = n_ctx if p.penalty_last_n == -1 else min(int(p.penalty_last_n), n_ctx)
        if p.penalized and last_n > 0:  # ctypes wants plain numbers: numpy's pass validate() but not it
            self._history.append((lib.llama_sampler_init_penalties(
                n_vocab, last_n, float(p.repeat_penalty), float(p.frequency_penalty), float(p.presence_penalty)),
                last_n))
        if p.dry:
            last_n = n_ctx if p.dry_penalty_last_n == -1 else min(int(p.dry_penalty_last_n), n_ctx)
            self._history.append((dry_sampler(p, model, last_n), last_n))
        if p.gbnf is not None:
            self._grammar = Grammar(p.gbnf, model.vocab)
            self._utf8 = Utf8Guard(model)  # JSON and GBNF speak of characters, so bytes must form them
        self._tail = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        add = lambda s: lib.llama_sampler_chain_add(self._tail, s)  # noqa: E731
        if p.greedy:  # truncation never removes the top token (typical_p could: greedy ignores it)
            add(lib.llama_sampler_init_greedy())
            return
        add_truncation_and_temperature(add, p, model.vocab)
        if p.mirostat == 1:
            add(lib.llama_sampler_init_mirostat(n_vocab, _seed(p), float(p.mirostat_tau), float(p.mirostat_eta),
                                                MIROSTAT_M))
        elif p.mirostat == 2:
            add(lib.llama_sampler_init_mirostat_v2(_seed(p), float(p.mirostat_tau), float(p.mirostat_eta)))
        else:
            add(lib.llama_sampler_init_dist(_seed(p)))

    @property
    def constrained(self) -> bool:
        return self._grammar is not None

    @property
    def argmax_only(self) -> bool:
        """Plain greedy: the token is the argmax of the logits row, nothing else (no state, no bias), so a
        caller holding many rows may take all their argmaxes at once."""
        return self._argmax_row is not None and self._biased is None

    @property
    def stateless_greedy(self) -> bool:
        """Greedy with nothing that remembers tokens (logit bias allowed): each output row's token depends on that
        row alone, so speculative drafts can be checked row by row."""
        return self._argmax_row is not None

    def accept_prompt(self, tokens: list[int]) -> None:
        """Feed the prompt to the penalties' and DRY's windows (never to the grammar), as llama.cpp does."""
        for sampler, last_n in self._history:
            for t in tokens[-last_n:]:
                lib.llama_sampler_accept(sampler, t)

    def sample(self, ctx_ptr, index: int = -1) -> int | None:
        """Sample and accept a token from output `index` of the last decode; None when no token is allowed."""
        if self._argmax_row is not None:  # the decode step's hot path
            logits = lib.llama_get_logits_ith(ctx_ptr, index)
            if not logits:
                raise UsageError(f"no logits for output {index} of the last decode")
            row = np.frombuffer(self._argmax_row.from_address(ctypes.addressof(logits.contents)), dtype=np.float32)
            if self._biased is not None:
                return biased_argmax(row, *self._biased)
            return int(row.argmax())  # first of equal maxima, as llama.cpp's greedy sampler
        if self._plain:  # one C call
            return lib.llama_sampler_sample(self._tail, ctx_ptr, index)
        logits = lib.llama_get_logits_ith(ctx_ptr, index)
        if not logits:
            raise UsageError(f"no logits for output {index} of the last decode")
        token = self._draw(logits, masked=False)
        if self._grammar is not None and (token is None or not self._grammar.allows(token)):
            token = self._draw(logits, masked=True)
            if token is not None and not self._grammar.allows(token):
                token = None  # cannot happen after masking; accepting it would abort the process
        if token is not None:
            self.accept(token)
        return token

    def _draw(self, logits, masked: bool) -> int | None:
        c = self._candidates
        c.load(logits)
        if self._utf8 is not None:
            c.buf["logit"][~self._utf8.allowed()] = -np.inf  # the buffer is in token-id order after load
        if self._bias is not None:
            lib.llama_sampler_apply(self._bias, c.ref)
        if masked:
            self._grammar.apply(c.ref)
        for sampler, _ in self._history:
            lib.llama_sampler_apply(sampler, c.ref)
        typical = self.params.typical_p < 1.0 and not self.params.greedy and self.params.uses("typ_p")
        if c.prune(TYPICAL_FLOOR if typical else None) == 0:
            return None  # everything banned, or a grammar dead end
        lib.llama_sampler_apply(self._tail, c.ref)
        return c.selected

    def accept(self, token: int) -> None:
        for sampler, _ in self._history:
            lib.llama_sampler_accept(sampler, token)
        if self._grammar is not None:
            self._grammar.accept(token)
            self._utf8.accept(token)

    def close(self) -> None:
        for name in ("_bias", "_tail"):
            ptr = getattr(self, name, None)
            if ptr:
                lib.llama_sampler_free(ptr)
            setattr(self, name, None)
        for sampler, _ in getattr(self, "_history", ()):
            lib.llama_sampler_free(sampler)
        self._history = []
        if getattr(self, "_grammar", None) is not None:
            self._grammar.close()
            self._grammar = None

    def __del__(self):
        self.close()
