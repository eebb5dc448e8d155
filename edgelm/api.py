"""The public Python API: `edgelm.load()` and the `Model` it returns."""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Iterator

from .cache.prompt import DEFAULT_DISK_BYTES, DEFAULT_RAM_BYTES, PromptCache
from .cache.response import CachedResponse, ResponseCache
from .errors import ContextOverflowError, UsageError
from .runtime.backend import release_workers, running_graphs
from .runtime.chat import chat_tokens, template_for
from .runtime.context import Context, ContextOptions
from .runtime.generate import (REUSE, Chunk, Completion, Timings, check_keep, collect, generate, shift_keep, stream,
                               text_stream, truncated)
from .runtime.memory import ensure_fits
from .runtime.model import LlamaModel, LoadOptions, resolve_model
from .runtime.sampling import SamplingParams
from .runtime.early_exit import EARLY_EXIT_BATCH, EarlyExit
from .runtime.speculative import (DRAFT_MAX, THRESHOLD, ContextVerifier, DraftModel, Lookup, SpecStats,
                                  SpeculativeOptions, same_vocabulary, speculative_tokens)
from .runtime.splits import choose_split
from .runtime.reasoning import prompt_opens_thinking
from .runtime.tools import forcing_call, reply_chunks, split_reply, tool_setup

TRUNCATE = ("error", "left")  # what a prompt longer than the context does


class Model:
    """A loaded model with its context. Calls are serialised by a lock, so it is safe to share."""

    def __init__(self, path: str | os.PathLike | None = None, *, n_ctx: int = 2048, n_threads: int | None = None,
                 n_batch: int = 512, n_gpu_layers: int = 0, flash_attn: bool | None = None,
                 type_k: str = "f16", type_v: str = "f16", use_mmap: bool = True, use_mlock: bool = False,
                 seed: int | None = None, truncate: str = "error", chat_template: str | None = None,
                 prefix_cache_bytes: int = DEFAULT_RAM_BYTES, prompt_cache: str | os.PathLike | None = None,
                 prompt_cache_bytes: int = DEFAULT_DISK_BYTES, response_cache: "bool | ResponseCache" = False,
                 kv_reuse: str = "exact", early_exit: bool | int | None = None, draft: str | os.PathLike | None = None,
                 lookup: bool = False, draft_max: int = DRAFT_MAX, draft_threshold: float = THRESHOLD,
                 warmup: bool = True, lora=None, control=None, control_range: tuple[int, int] | None = None,
                 profile=None, memory_check: bool = True, context_shift: bool = False, keep: int = 0):
        if truncate not in TRUNCATE:
            raise UsageError(f"truncate must be one of {', '.join(TRUNCATE)}, not {truncate!r}")
        if kv_reuse not in REUSE:
            raise UsageError(f"kv_reuse must be one of {', '.join(REUSE)}, not {kv_reuse!r}")
        if seed is not None:
            SamplingParams(seed=seed).validate()
        if not isinstance(context_shift, bool):
            raise UsageError(f"context_shift must be True or False, not {context_shift!r}")
        check_keep(keep)
        # speculative decoding: early exit (the model's own first layers draft), a draft model, or prompt lookup
        self.speculative = SpeculativeOptions(early_exit, None if draft is None else str(draft), lookup, draft_max,
                                              draft_threshold)
        self.speculative.validate()
        load = LoadOptions(n_gpu_layers=n_gpu_layers, use_mmap=use_mmap, use_mlock=use_mlock)
        ctx_options = ContextOptions(n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads, flash_attn=flash_attn,
                                     type_k=type_k, type_v=type_v)
        ctx_options.validate()
        path = resolve_model(path)  # once: an hf:// reference asks the Hub (or its cache) here
        if memory_check:  # a model too large for this machine is a clear error, not an OOM kill (runtime/memory.py)
            ensure_fits(path, n_ctx=n_ctx, n_batch=n_batch, type_k=type_k, type_v=type_v, n_gpu_layers=n_gpu_layers,
                        flash_attn=flash_attn, draft=self.speculative.draft)
        self._pair = self._draft_ctx = self.early_exit = None  # _pair: the early-exit draft and tail
        if self.speculative.early_exit not in (None, False):
            if lora is not None or control is not None:
                raise UsageError("LoRA adapters and control vectors do not apply to an early-exit split; "
                                 "use a draft model or lookup")
            self._load_early_exit(path, load, ctx_options)
        else:
            self.llama = LlamaModel(path, load, lora=lora, control=control, control_range=control_range)
            self.ctx = Context(self.llama, ctx_options)
        if self.speculative.draft is not None:
            draft_model = LlamaModel(self.speculative.draft, load)
            if not same_vocabulary(self.llama, draft_model):
                raise UsageError(f"{draft_model.path}: its vocabulary differs from {self.llama.path}'s; "
                                 "a draft model must share the target's tokenizer")
            self._draft_ctx = Context(draft_model, ctx_options)
        if warmup:  # one throw-away decode per context, as llama.cpp's tools do: the first request runs at full speed
            for warm in (self._pair or self.ctx, self._draft_ctx):
                if warm is not None:
                    warm.warm_up()
            release_workers()  # the thread that loads is often not the one that generates (runtime/backend.py)
        self.seed, self.truncate = seed, truncate  # defaults for every call
        # context shift (llama.cpp's --context-shift, --keep): at the context's end, drop the older half of what
        # follows the first `keep` prompt tokens (-1: all of them; BOS always stays) and generate on
        self.context_shift, self.keep = context_shift, keep
        if context_shift:
            if self.speculative.enabled:
                raise UsageError("context shift and speculative decoding exclude each other")
            self.ctx.check_can_shift()
        self.profile = profile  # a named model's sampling defaults and chat preamble (edgelm/modelfile.py)
        self.kv_reuse = kv_reuse  # how much of an earlier prompt's KV a request may take (generate.prefill)
        if self._pair is not None:
            self._pair.reuse = kv_reuse
        # KV states of earlier prompts: in RAM (prefix_cache_bytes, 0: none) and in a folder (prompt_cache)
        self.prompt_cache = None
        if (prefix_cache_bytes or prompt_cache is not None) and self._pair is not None:
            # one cache per half of the split, each with its layers' share of the RAM budget; one folder
            k, n_layer = self.early_exit.k, self.early_exit.n_layer
            self._pair.caches = tuple(
                PromptCache(ctx, ram_bytes=prefix_cache_bytes * layers // n_layer, path=prompt_cache,
                            disk_bytes=prompt_cache_bytes)
                for ctx, layers in ((self.ctx, k), (self._pair.t, n_layer - k)))
            self.prompt_cache = self._pair.caches[0]
        elif prefix_cache_bytes or prompt_cache is not None:
            self.prompt_cache = PromptCache(self.ctx, ram_bytes=prefix_cache_bytes, path=prompt_cache,
                                            disk_bytes=prompt_cache_bytes)
        self._prompt_caches = (() if self.prompt_cache is None
                               else self._pair.caches if self._pair is not None else (self.prompt_cache,))
        # answers to deterministic requests (opt-in): True for the defaults, or a configured ResponseCache
        if response_cache is True:
            response_cache = ResponseCache()
        elif response_cache is not False and response_cache is not None and not isinstance(response_cache,
                                                                                             ResponseCache):
            raise UsageError(f"response_cache must be True, False or a ResponseCache, not {response_cache!r}")
        self.response_cache = response_cache if isinstance(response_cache, ResponseCache) else None
        if self.response_cache is not None and self.response_cache.embed is None:
            self.response_cache.embed = self._embed_unlocked
        self._embedder = None
        self._lock = threading.Lock()
        # chat_template: a built-in name ("chatml", "completion") or Jinja source replacing the model's own
        self._chat_template = None if chat_template is None else template_for(self.llama, chat_template)

    def _load_early_exit(self, path, load: LoadOptions, ctx_options: ContextOptions) -> None:
        from .gguf_reader import read_gguf
        from .native import Capture
        split = choose_split(path, self.speculative.early_exit)
        self.early_exit = split
        self.llama = LlamaModel(split.paths.draft, load, parts=[split.paths.shared])
        shared = read_gguf(split.paths.shared, keep_arrays=False)
        # the tail reads hidden states, never token_embd, unless the head is tied to it
        unused = ("token_embd.weight",) if any(t.name == "output.weight" for t in shared.tensors) else ()
        tail = LlamaModel(split.paths.tail, load, parts=[split.paths.shared], unused=unused, metadata_arrays=False)
        ctx_options = dataclasses.replace(ctx_options, n_batch=min(ctx_options.n_batch, EARLY_EXIT_BATCH))
        capture = Capture(f"l_out-{split.k - 1}", self.llama.n_embd, ctx_options.n_batch)
        self.ctx = Context(self.llama, ctx_options, eval_callback=capture.callback, eval_user_data=capture.user_data)
        # one for the model's life, so a request reuses the KV an earlier one left (a chat's history)
        self._pair = EarlyExit(self.ctx, Context(tail, ctx_options, embd_input=True), capture,
                               self.speculative.threshold, passthrough=split.passthrough)

    def _speculative_stream(self, tokens: list[int], params: SamplingParams) -> Iterator[Chunk]:
        s = self.speculative
        if self._pair is not None:
            verifier = drafter = self._pair
        else:
            verifier = ContextVerifier(self.ctx, self.prompt_cache, self.kv_reuse)
            drafter = DraftModel(self._draft_ctx, s.threshold) if self._draft_ctx is not None else Lookup()
        timings = Timings()
        timings.speculative = stats = SpecStats()
        logprobs = [] if params.logprobs is not None else None
        gen = speculative_tokens(verifier, drafter, tokens, params, timings, stats, s.draft_max, logprobs)
        return text_stream(self.llama, gen, params, timings, logprobs)

    def _no_early_exit(self, what: str) -> None:
        if self._pair is not None:
            raise UsageError(f"{what} needs the single-file model; this one is loaded as an early-exit split")

    # ------------------------------------------------------------ text

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self.llama.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.llama.detokenize(tokens)

    def _prompt_tokens(self, prompt: str | list[int], params: SamplingParams, truncate: str | None) -> list[int]:
        return prompt_tokens(self.llama, prompt, self.ctx.n_ctx, params.max_tokens, truncate or self.truncate)

    def _params(self, sampling: dict) -> tuple[SamplingParams, str | None]:
        truncate = sampling.pop("truncate", None)
        if truncate is not None and truncate not in TRUNCATE:
            raise UsageError(f"truncate must be one of {', '.join(TRUNCATE)}, not {truncate!r}")
        if self.profile is not None:
            sampling = {**self.profile.sampling, **sampling}
        if self.seed is not None and sampling.get("seed") is None:
            sampling["seed"] = self.seed
        return SamplingParams.from_kwargs(**sampling), truncate

    def generate(self, prompt: str | list[int], **sampling) -> Completion:
        """Complete `prompt`; `sampling` takes SamplingParams' fields and truncate="error"|"left"."""
        params, truncate = self._params(sampling)
        tokens = self._prompt_tokens(prompt, params, truncate)
        return self._complete(tokens, params)

    def stream(self, prompt: str | list[int], **sampling) -> Iterator[Chunk]:
        """Like generate(), as text chunks; the last one carries finish_reason and timings."""
        params, truncate = self._params(sampling)
        tokens = self._prompt_tokens(prompt, params, truncate)
        return self._stream(tokens, params)

    def infill(self, prefix: str, suffix: str, *, middle: str = "", extra: Iterable[Mapping] = (),
               **sampling) -> Completion:
        """What goes between `prefix` and `suffix`, from a model trained with fill-in-the-middle tokens (code models:
        Qwen2.5-Coder, CodeLlama, StarCoder, ...): the prompt llama-server's /infill builds (runtime/infill.py), with
        `extra` files ({"filename", "text"}) as context before it and `middle` as the reply's start. UsageError for
        a model without FIM tokens."""
        from .runtime.infill import infill_tokens

        params, _ = self._params(sampling)
        tokens = infill_tokens(self.llama, prefix, suffix, middle=middle, extra=extra, n_ctx=self.ctx.n_ctx,
                               n_batch=self.ctx.n_batch, n_predict=params.max_tokens)
        return self._complete(tokens, params)

    def generate_batch(self, prompts: list[str | list[int]], *, n_parallel: int = 4, **sampling) -> list[Completion]:
        """Complete every prompt, decoding up to `n_parallel` of them together (continuous batching);
        results come back in the order of `prompts`. A model loaded with lookup or a draft model drafts for
        every stream (edgelm/drafting.py)."""
        from .engine import Engine, EngineOptions

        self._no_early_exit("generate_batch")
        params, truncate = self._params(sampling)
        token_lists = [self._prompt_tokens(p, params, truncate) for p in prompts]
        if not token_lists:
            return []
        options = EngineOptions(n_parallel=min(n_parallel, len(token_lists)), n_ctx=self.ctx.n_ctx,
                                n_batch=max(self.ctx.n_batch, n_parallel), max_queue=len(token_lists),
                                max_tokens_cap=max(params.max_tokens, 1), n_threads=self.ctx.options.n_threads,
                                flash_attn=self.ctx.options.flash_attn, type_k=self.ctx.options.type_k,
                                type_v=self.ctx.options.type_v, lookup=self.speculative.lookup,
                                draft_max=self.speculative.draft_max, draft_threshold=self.speculative.threshold)
        draft = self._draft_ctx.model if self._draft_ctx is not None else None
        with self._lock, running_graphs(), Engine(self.llama, options, prompt_cache=None, threaded=False,
                                                  draft_model=draft) as engine:
            requests = engine.submit_many([(tokens, params) for tokens in token_lists])
            engine.run_until_idle()  # in this thread: see Engine's threaded
            return [r.result() for r in requests]

    def reset(self) -> None:
        """Forget the KV of earlier requests, in the context and the in-memory prompt cache (files stay)."""
        with self._lock:
            for ctx in (self.ctx, self._draft_ctx):
                if ctx is not None:
                    ctx.clear()
            if self._pair is not None:
                self._pair.clear()
            for cache in self._prompt_caches:
                cache.clear()

    def _complete(self, tokens: list[int], params: SamplingParams) -> Completion:
        with self._lock, running_graphs():
            hit = self._cached_response(tokens, params)
            if hit is not None:
                return hit
            if self.speculative.enabled:
                out = collect(self._speculative_stream(tokens, params))
            else:
                out = generate(self.ctx, tokens, params, cache=self.prompt_cache, reuse=self.kv_reuse,
                               keep=self._keep(tokens))
            self._remember(tokens, params, out.text, out.tokens, out.finish_reason)
            return out

    def _stream(self, tokens: list[int], params: SamplingParams) -> Iterator[Chunk]:
        with self._lock, running_graphs():
            hit = self._cached_response(tokens, params)
            if hit is not None:
                yield Chunk(hit.text, hit.tokens, hit.finish_reason, hit.timings)
                return
            parts, ids = [], []
            chunks = (self._speculative_stream(tokens, params) if self.speculative.enabled
                      else stream(self.ctx, tokens, params, cache=self.prompt_cache, reuse=self.kv_reuse,
                                  keep=self._keep(tokens)))
            for chunk in chunks:
                parts.append(chunk.text)
                ids.extend(chunk.tokens)
                if chunk.finish_reason is not None:
                    self._remember(tokens, params, "".join(parts), ids, chunk.finish_reason)
                yield chunk

    def _keep(self, tokens: list[int]) -> int | None:
        """Positions a context shift keeps for this prompt, None without context shift."""
        if not self.context_shift:
            return None
        return shift_keep(tokens, self.keep, self.llama.bos)

    def _cached_response(self, tokens: list[int], params: SamplingParams) -> Completion | None:
        rc = self.response_cache
        if rc is None or not rc.cacheable(params):
            return None
        t0 = time.perf_counter()
        text = self.detokenize(tokens) if rc.semantic_threshold is not None else None
        found = rc.get(self.llama.fingerprint, tokens, params, text)
        if found is None:
            return None
        response, how = found
        dt = time.perf_counter() - t0
        timings = Timings(prompt_tokens=len(tokens), cached_tokens=len(tokens),
                          completion_tokens=len(response.tokens), prompt_s=dt, ttft_s=dt, response_cache=how)
        return Completion(response.text, list(response.tokens), response.finish_reason, timings)

    def _remember(self, tokens, params, text: str, ids: list[int], reason: str) -> None:
        rc = self.response_cache
        if rc is not None and rc.cacheable(params):
            prompt_text = self.detokenize(tokens) if rc.semantic_threshold is not None else None
            rc.put(self.llama.fingerprint, tokens, params, CachedResponse(text, tuple(ids), reason), prompt_text)

    # ------------------------------------------------------------ chat

    def _template(self, chat_template: str | None):
        if chat_template is not None:
            return template_for(self.llama, chat_template)
        if self._chat_template is None:  # the model's own template (or the fallback), resolved on first use
            self._chat_template = template_for(self.llama)
        return self._chat_template

    def chat_prompt(self, messages: list[dict], *, chat_template: str | None = None,
                    add_generation_prompt: bool = True, tools: list[dict] | None = None,
                    chat_template_kwargs: dict | None = None) -> str:
        """The prompt text chat() would send for `messages` (see edgelm/runtime/chat.py)."""
        offered, _ = tool_setup(tools, None)
        messages = self.profile.preamble(messages) if self.profile is not None else messages
        return self._template(chat_template).render(messages, add_generation_prompt=add_generation_prompt,
                                                    tools=offered, extra=chat_template_kwargs)

    def _chat_tokens(self, messages: list[dict], sampling: dict, *, chat_template: str | None = None, tools=None,
                     tool_choice=None, chat_template_kwargs: dict | None = None):
        offered, grammar = tool_setup(tools, tool_choice)
        if self.profile is not None:
            messages = self.profile.preamble(messages)
        tokens = chat_tokens(self.llama, messages, self._template(chat_template), tools=offered,
                             extra=chat_template_kwargs)
        params, truncate = self._params(sampling)
        if grammar is not None:
            params = forcing_call(params, grammar)
        return self._prompt_tokens(tokens, params, truncate), params, offered

    def chat(self, messages: list[dict], *, chat_template: str | None = None, tools: list[dict] | None = None,
             tool_choice: str | dict | None = None, chat_template_kwargs: dict | None = None,
             **sampling) -> Completion:
        """Reply to `messages` ([{"role": ..., "content": ...}]); stops at the model's end-of-turn token.
        `tools` and `tool_choice` as in OpenAI's API: the reply's calls are in .tool_calls (runtime/tools.py).
        A reasoning model's <think> block is in .reasoning, not in .text (runtime/reasoning.py).
        chat_template_kwargs: more template variables, e.g. {"enable_thinking": False} for Qwen3."""
        tokens, params, offered = self._chat_tokens(messages, sampling, chat_template=chat_template, tools=tools,
                                                    tool_choice=tool_choice, chat_template_kwargs=chat_template_kwargs)
        out = self._complete(tokens, params)
        reasoning, content, calls = split_reply(out.text, offered, prompt_opens_thinking(self.llama, tokens))
        return dataclasses.replace(out, text=content, reasoning=reasoning, tool_calls=calls or None,
                                   finish_reason="tool_calls" if calls else out.finish_reason)

    def chat_stream(self, messages: list[dict], *, chat_template: str | None = None, tools: list[dict] | None = None,
                    tool_choice: str | dict | None = None, chat_template_kwargs: dict | None = None,
                    **sampling) -> Iterator[Chunk]:
        """Like chat(), as text chunks; the last one carries finish_reason, timings and any tool calls (text that
        may be a call is held back until it is known)."""
        tokens, params, offered = self._chat_tokens(messages, sampling, chat_template=chat_template, tools=tools,
                                                    tool_choice=tool_choice, chat_template_kwargs=chat_template_kwargs)
        return self._reply(self._stream(tokens, params), tokens, offered)

    def _reply(self, chunks: Iterator[Chunk], prompt: list[int], tools: list[dict] | None) -> Iterator[Chunk]:
        """A chat reply's chunks with its thinking in chunk.reasoning and, when tools were offered, its calls."""
        return reply_chunks(chunks, tools, prompt_opens_thinking(self.llama, prompt))

    # ------------------------------------------------------------ analysis

    def embed(self, texts: list[str] | str, *, normalize: bool = True):
        """Mean-pooled, L2-normalised hidden states: an (n, n_embd) float32 array (one row for a str)."""
        with self._lock, running_graphs():
            return self._embed_unlocked(texts, normalize=normalize)

    def _embed_unlocked(self, texts: list[str] | str, *, normalize: bool = True):
        from .runtime.embed import Embedder

        self._no_early_exit("embed")
        single = isinstance(texts, str)
        if self._embedder is None:
            self._embedder = Embedder(self.llama, n_ctx=self.ctx.n_ctx, n_threads=self.ctx.options.n_threads)
        out = self._embedder.embed([texts] if single else list(texts), normalize=normalize)
        return out[0] if single else out

    def perplexity(self, text: str, *, window: int | None = None, stride: int | None = None):
        """Perplexity of `text` over strided windows (default: the context size, half-window stride)."""
        from .runtime.perplexity import perplexity

        self._no_early_exit("perplexity")
        window = window or min(self.ctx.n_ctx, 512)
        with self._lock, running_graphs():
            return perplexity(self.llama, self.tokenize(text), window=window, stride=stride,
                              n_threads=self.ctx.options.n_threads)

    # ------------------------------------------------------------ info

    @property
    def path(self):
        return self.llama.path

    @property
    def n_ctx(self) -> int:
        return self.ctx.n_ctx

    def close(self) -> None:
        if self._embedder is not None:
            self._embedder.close()
        for ctx in (self._pair and self._pair.t, self._draft_ctx):
            if ctx is not None:
                ctx.close()
                ctx.model.close()
        self.ctx.close()
        self.llama.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def prompt_tokens(llama: LlamaModel, prompt: str | list[int], n_ctx: int, max_tokens: int,
                  truncate: str = "error") -> list[int]:
    """`prompt` as token ids that leave a context of `n_ctx` at least one position to generate into: a text is
    tokenized, ids are checked against the vocabulary; a longer prompt raises ContextOverflowError, or with
    truncate="left" keeps its most recent tokens."""
    if isinstance(prompt, str):
        tokens = llama.tokenize(prompt)
    elif isinstance(prompt, (list, tuple)):
        tokens = list(prompt)
        llama.check_tokens(tokens)
    else:
        raise UsageError(f"prompt must be a string or a list of token ids, not {type(prompt).__name__}")
    if not tokens:
        raise UsageError("empty prompt: nothing to condition on")
    room = n_ctx - 1
    if len(tokens) <= room:
        return tokens
    if truncate == "error":
        raise ContextOverflowError(f"prompt of {len(tokens)} tokens does not fit the context of {n_ctx} "
                                   f"(use a larger n_ctx, or truncate='left')")
    # keep the most recent tokens, leaving room for the reply (and a leading BOS where the model wants one)
    return truncated(tokens, max(1, room - min(max_tokens, room // 2)), int(llama.add_bos and tokens[0] == llama.bos))


def load(path_or_ref: str | os.PathLike | None = None, **options) -> Model:
    """Load a GGUF model (no reference: the bundled default model), or a model named by `edgelm create`, whose
    options the caller's override."""
    from .modelfile import find

    profile = find(path_or_ref)
    if profile is not None:
        return Model(profile.model, **{**profile.load_options(), **options}, profile=profile)
    return Model(path_or_ref, **options)
