"""A llama.cpp context: one KV cache, a reusable batch, decode and logits.

Positions and sequence ids are explicit so that later layers (prefix cache,
micro-batching, early exit) can drive several sequences in one context.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import llama_cpp as lib
import numpy as np

from edgelm.errors import ContextOverflowError, ModelLoadError, UsageError

from .canonical import canonical_rows
from .model import LlamaModel


@dataclass(frozen=True)
class ContextOptions:
    n_ctx: int = 2048  # 0: the model's training context
    n_batch: int = 512
    n_threads: int | None = None  # None: every core
    n_seq_max: int = 1
    flash_attn: bool | None = None  # None: llama.cpp decides
    type_k: str = "f16"
    type_v: str = "f16"
    embeddings: bool = False  # pooled hidden states instead of logits (see runtime/embed.py)
    kv_unified: bool = False  # one KV buffer for all sequences (so each may use the whole context)

    def validate(self) -> None:
        for name in ("n_ctx", "n_batch", "n_seq_max"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "n_ctx" else 1):
                raise UsageError(f"{name} must be a positive integer, not {value!r}")
        if self.n_threads is not None and (not isinstance(self.n_threads, int) or self.n_threads < 1):
            raise UsageError(f"n_threads must be a positive integer, not {self.n_threads!r}")
        for name in ("type_k", "type_v"):
            if getattr(self, name) not in KV_TYPES:
                raise UsageError(f"{name} must be one of {', '.join(KV_TYPES)}, not {getattr(self, name)!r}")
        if self.flash_attn is False and self.type_v not in ("f32", "f16", "bf16"):
            raise UsageError(f"a quantized V cache (type_v {self.type_v!r}) needs flash attention, "
                             "which flash_attn=False turns off")


KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "bf16": 30}  # ggml_type ids


def warmup_tokens(model: LlamaModel) -> list[int]:
    """What a warm-up decode evaluates: BOS and EOS, or token 0 for a vocabulary with neither."""
    return [t for t in (model.bos, model.eos) if t >= 0] or [0]


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class Context:
    def __init__(self, model: LlamaModel, options: ContextOptions | None = None, *, eval_callback=None,
                 eval_user_data=None, embd_input: bool = False):
        self.model = model
        self.options = options = options or ContextOptions()
        options.validate()
        params = lib.llama_context_default_params()
        params.n_ctx = options.n_ctx or model.n_ctx_train
        params.n_batch = params.n_ubatch = min(options.n_batch, params.n_ctx)
        params.n_seq_max = options.n_seq_max
        params.n_threads = params.n_threads_batch = options.n_threads or default_threads()
        params.no_perf = True
        params.type_k, params.type_v = KV_TYPES[options.type_k], KV_TYPES[options.type_v]
        if eval_callback is not None:  # a ggml_backend_sched_eval_callback; the caller keeps it alive
            params.cb_eval = eval_callback
            params.cb_eval_user_data = eval_user_data
        if options.embeddings:  # mean of the last hidden states over each sequence
            params.embeddings = True
            params.pooling_type = lib.LLAMA_POOLING_TYPE_MEAN
        params.kv_unified = options.kv_unified
        if options.flash_attn is not None:
            params.flash_attn_type = 1 if options.flash_attn else 0
        self._ptr = lib.llama_init_from_model(model.ptr, params)
        if not self._ptr:
            raise ModelLoadError(f"{model.path}: llama.cpp could not create a context of {params.n_ctx} tokens")
        if model.lora is not None:
            model.lora.apply(self._ptr)
        if model.control is not None:
            model.control.apply(self._ptr)
        self.n_ctx = lib.llama_n_ctx(self._ptr)
        self.n_batch = lib.llama_n_batch(self._ptr)
        self.memory = lib.llama_get_memory(self._ptr)
        # embd_input: batches carry hidden states (n_embd floats per position) instead of token ids
        self._batch = lib.llama_batch_init(self.n_batch, model.n_embd if embd_input else 0, options.n_seq_max)
        self._embd = (np.ctypeslib.as_array(self._batch.embd, shape=(self.n_batch, model.n_embd))
                      if embd_input else None)
        self._tokens: dict[int, list[int]] = {}  # seq -> the tokens its KV holds, by position
        self._exact: dict[int, int] = {}  # seq -> how many leading positions were evaluated canonically

    @property
    def canonical_rows(self) -> int:
        """The least batch whose positions a canonical evaluation reproduces (runtime/canonical.py)."""
        o = self.options
        return canonical_rows(o.flash_attn, o.type_k, o.type_v)

    def close(self) -> None:
        if getattr(self, "_ptr", None):
            lib.llama_batch_free(self._batch)
            lib.llama_free(self._ptr)
            self._ptr = None

    def __del__(self):
        self.close()

    @property
    def ptr(self):
        return self._ptr

    # ------------------------------------------------------------ KV cache

    def clear(self) -> None:
        lib.llama_memory_clear(self.memory, True)
        self._tokens.clear()
        self._exact.clear()

    def remove(self, seq: int, start: int = 0, end: int = -1) -> bool:
        """Drop positions [start, end) of a sequence (end -1: to the end). False if the memory cannot
        (a recurrent or sliding-window cache asked to cut in the middle): then the caller must clear it."""
        ok = bool(lib.llama_memory_seq_rm(self.memory, seq, start, end))
        held = self._tokens.get(seq)
        if held is not None:
            if ok and end < 0:
                del held[start:]
            else:  # a hole, or nothing removed: what it holds is no longer a known prefix
                self._tokens.pop(seq)
        self._exact[seq] = min(self._exact.get(seq, 0), start if ok else 0)
        return ok

    @property
    def can_shift(self) -> bool:
        """Whether positions can move (RoPE caches can; recurrent states and some attention kinds cannot)."""
        return bool(lib.llama_memory_can_shift(self.memory))

    def check_can_shift(self) -> None:
        if not self.can_shift:
            raise UsageError(f"{self.model.path.name}: this model's KV cache cannot shift positions")

    def shift(self, seq: int, keep: int, end: int) -> int:
        """Context shift of `seq`, which holds positions 0..end-1: the older half of [keep, end) leaves and the later
        positions move down (llama.cpp re-rotates their keys), so a generation at the context's end can go on.
        Returns the positions dropped."""
        self.check_can_shift()
        discard = (end - keep) // 2
        if not lib.llama_memory_seq_rm(self.memory, seq, keep, keep + discard):
            raise UsageError("llama.cpp could not drop the shifted-out positions")
        lib.llama_memory_seq_add(self.memory, seq, keep + discard, -1, -discard)
        held = self._tokens.get(seq)
        if held is not None:
            del held[keep:keep + discard]
        self._exact[seq] = min(self._exact.get(seq, 0), keep)  # later positions no longer equal a fresh prefill
        return discard

    def seq_tokens(self, seq: int = 0) -> list[int]:
        """The tokens sequence `seq` holds at positions 0.. (a copy)."""
        return list(self._tokens.get(seq, ()))

    def set_tokens(self, seq: int, tokens, exact: int = 0) -> None:
        """Record what a sequence holds (after its state was loaded from elsewhere), and how many
        leading positions of it were evaluated canonically (see generate.prefill)."""
        self._tokens[seq] = list(tokens)
        self._exact[seq] = min(exact, len(self._tokens[seq]))

    def exact_tokens(self, seq: int = 0) -> int:
        """Leading positions of `seq` whose KV a canonical prefill would reproduce bit for bit."""
        return min(self._exact.get(seq, 0), len(self._tokens.get(seq, ())))

    # ------------------------------------------------------------ decode

    def warm_up(self, rows: np.ndarray | None = None) -> None:
        """One throw-away decode, as llama.cpp's own tools run at start (`--no-warmup` there), so that the first
        request does not pay for the process's first graph (page faults, thread start-up). Token contexts
        evaluate BOS and EOS (token 0 without either); an embd_input context evaluates `rows` (default: two
        zero rows). The KV cache is empty afterwards. Models with an encoder (T5) are left alone: their decode
        needs the encoder's output first."""
        if lib.llama_model_has_encoder(self.model.ptr) or not lib.llama_model_has_decoder(self.model.ptr):
            return
        try:
            with self.warmup_mode():
                if self._embd is not None:
                    self.decode_embd(np.zeros((2, self.model.n_embd), np.float32) if rows is None else rows, 0)
                else:
                    self.decode(warmup_tokens(self.model), 0)
        finally:
            self.clear()

    @contextlib.contextmanager
    def warmup_mode(self):
        """llama.cpp's warm-up mode for the decodes inside: a mixture of experts runs every expert, so all are
        touched."""
        lib.llama_set_warmup(self._ptr, True)
        try:
            yield
        finally:
            lib.llama_set_warmup(self._ptr, False)

    def decode(self, tokens: list[int], start: int, seq: int = 0, *, logits_last: bool = True,
               logits_from: int | None = None) -> None:
        """Evaluate `tokens` at positions start.. of `seq`, in chunks of n_batch.

        Logits are kept for the last token, or for every index >= `logits_from`
        (then all of `tokens` must fit one batch, since each decode call replaces them).
        """
        if logits_from is not None and len(tokens) > self.n_batch:
            raise UsageError(f"logits for many positions need one batch: {len(tokens)} > n_batch {self.n_batch}")
        if not tokens:
            raise UsageError("nothing to decode: empty token list")
        if start + len(tokens) > self.n_ctx:
            raise ContextOverflowError(
                f"{start + len(tokens)} tokens do not fit the context of {self.n_ctx} (use a larger --ctx)"
            )
        self.model.check_tokens(tokens)
        b = self._batch
        for lo in range(0, len(tokens), self.n_batch):
            chunk = tokens[lo:lo + self.n_batch]
            last_chunk = lo + len(chunk) == len(tokens)
            for i, t in enumerate(chunk):
                b.token[i] = t
                b.pos[i] = start + lo + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                b.logits[i] = logits_from is not None and lo + i >= logits_from
            if logits_last and last_chunk:
                b.logits[len(chunk) - 1] = True
            b.n_tokens = len(chunk)
            rc = lib.llama_decode(self._ptr, b)
            if rc != 0:
                self._tokens.pop(seq, None)
                raise ModelLoadError(f"llama_decode failed with code {rc}")
        self._record(seq, start, tokens)

    def _record(self, seq: int, start: int, tokens: list[int]) -> None:
        """`seq` now holds `tokens` at positions start..: extend what it is known to hold, or forget that."""
        held = self._tokens.setdefault(seq, [])
        if len(held) == start:
            held.extend(tokens)
        else:  # not a continuation of what we know it holds: stop claiming to know
            self._tokens.pop(seq)

    def decode_embd(self, rows: np.ndarray, start: int, seq: int = 0, *, logits_from: int | None = None) -> None:
        """Evaluate hidden states `rows` (n, n_embd) at positions start.. of `seq` in one batch (a context made
        with embd_input). Logits are kept for the last row, or for every row >= `logits_from`."""
        if self._embd is None:
            raise UsageError("this context takes token ids; create it with embd_input=True")
        n = len(rows)
        if not 1 <= n <= self.n_batch:
            raise UsageError(f"hidden states for 1 to {self.n_batch} positions per call, not {n}")
        if start + n > self.n_ctx:
            raise ContextOverflowError(f"{start + n} positions do not fit the context of {self.n_ctx}")
        b = self._batch
        self._embd[:n] = rows
        for i in range(n):
            b.pos[i] = start + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits_from is not None and i >= logits_from
        b.logits[n - 1] = True
        b.n_tokens = n
        rc = lib.llama_decode(self._ptr, b)
        if rc != 0:
            raise ModelLoadError(f"llama_decode failed with code {rc}")
        self._tokens.pop(seq, None)  # what an embedding-fed sequence holds is tracked by its owner

    def decode_one(self, token: int, pos: int, seq: int = 0, *, logits: bool = True) -> None:
        """The decode step's hot path: one token, logits on (off: nobody reads them, and the head is skipped)."""
        if pos >= self.n_ctx:
            raise ContextOverflowError(f"position {pos} is past the context of {self.n_ctx}")
        if not 0 <= token < self.model.n_vocab:
            raise UsageError(f"token id {token} out of range [0, {self.model.n_vocab})")
        b = self._batch
        b.token[0] = token
        b.pos[0] = pos
        b.n_seq_id[0] = 1
        b.seq_id[0][0] = seq
        b.logits[0] = logits
        b.n_tokens = 1
        rc = lib.llama_decode(self._ptr, b)
        if rc != 0:
            self._tokens.pop(seq, None)
            raise ModelLoadError(f"llama_decode failed with code {rc}")
        held = self._tokens.get(seq)
        if held is not None:
            if len(held) == pos:
                held.append(token)
            else:
                self._tokens.pop(seq)

    def decode_rows(self, rows: list[tuple[int, int, int, bool]]) -> None:
        """One batch of (token, position, sequence, logits?) rows, several sequences at once; each sequence's rows
        must continue it at consecutive positions. ctx.logits(i) then reads row i's logits."""
        if not 1 <= len(rows) <= self.n_batch:
            raise UsageError(f"1 to {self.n_batch} rows per batch, not {len(rows)}")
        self.model.check_tokens([r[0] for r in rows])
        b = self._batch
        for i, (token, pos, seq, logits) in enumerate(rows):
            if not 0 <= pos < self.n_ctx:
                raise ContextOverflowError(f"position {pos} is past the context of {self.n_ctx}")
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = token, pos, 1, seq, logits
        b.n_tokens = len(rows)
        rc = lib.llama_decode(self._ptr, b)
        if rc != 0:
            for _, _, seq, _ in rows:
                self._tokens.pop(seq, None)
            raise ModelLoadError(f"llama_decode failed with code {rc}")
        runs: dict[int, tuple[int, list[int]]] = {}  # sequence -> (its first position here, its tokens)
        for token, pos, seq, _ in rows:
            runs.setdefault(seq, (pos, []))[1].append(token)
        for seq, (start, tokens) in runs.items():
            self._record(seq, start, tokens)

    def output_rows(self, n_outputs: int) -> np.ndarray:
        """Every output row of the last decode, in batch order, in place: (n_outputs, n_vocab)."""
        return np.ctypeslib.as_array(lib.llama_get_logits(self._ptr), shape=(n_outputs, self.model.n_vocab))

    def all_logits(self, n_outputs: int) -> np.ndarray:
        """A copy of every output row of the last decode, in batch order: (n_outputs, n_vocab)."""
        return self.output_rows(n_outputs).copy()

    def output_argmax(self, n_outputs: int) -> np.ndarray:
        """The argmax of every output row of the last decode, in batch order (the rows read in place)."""
        return self.output_rows(n_outputs).argmax(axis=1)

    def logits(self, index: int = -1) -> np.ndarray:
        """A copy of the logits row of output `index` (-1: the last one)."""
        ptr = lib.llama_get_logits_ith(self._ptr, index)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()
