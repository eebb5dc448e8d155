"""The public Python API: `edgelm.load()` and the `Model` it returns."""
from __future__ import annotations

import os
import threading
from typing import Iterator

from .errors import ContextOverflowError, UsageError
from .runtime.chat import chat_tokens, template_for
from .runtime.context import Context, ContextOptions
from .runtime.generate import Chunk, Completion, generate, stream
from .runtime.model import LlamaModel, LoadOptions
from .runtime.sampling import SamplingParams

TRUNCATE = ("error", "left")  # what a prompt longer than the context does


class Model:
    """A loaded model with its context. Calls are serialised by a lock, so it is safe to share."""

    def __init__(self, path: str | os.PathLike | None = None, *, n_ctx: int = 2048, n_threads: int | None = None,
                 n_batch: int = 512, n_gpu_layers: int = 0, flash_attn: bool | None = None,
                 type_k: str = "f16", type_v: str = "f16", use_mmap: bool = True, use_mlock: bool = False,
                 seed: int | None = None, truncate: str = "error", chat_template: str | None = None):
        if truncate not in TRUNCATE:
            raise UsageError(f"truncate must be one of {', '.join(TRUNCATE)}, not {truncate!r}")
        if seed is not None:
            SamplingParams(seed=seed).validate()
        self.llama = LlamaModel(path, LoadOptions(n_gpu_layers=n_gpu_layers, use_mmap=use_mmap, use_mlock=use_mlock))
        self.ctx = Context(self.llama, ContextOptions(n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
                                                      flash_attn=flash_attn, type_k=type_k, type_v=type_v))
        self.seed, self.truncate = seed, truncate  # defaults for every call
        self._embedder = None
        self._lock = threading.Lock()
        # chat_template: a built-in name ("chatml", "completion") or Jinja source replacing the model's own
        self._chat_template = None if chat_template is None else template_for(self.llama, chat_template)

    # ------------------------------------------------------------ text

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self.llama.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.llama.detokenize(tokens)

    def _prompt_tokens(self, prompt: str | list[int], params: SamplingParams, truncate: str | None) -> list[int]:
        if isinstance(prompt, str):
            tokens = self.tokenize(prompt)
        elif isinstance(prompt, (list, tuple)):
            tokens = list(prompt)
            self.llama.check_tokens(tokens)
        else:
            raise UsageError(f"prompt must be a string or a list of token ids, not {type(prompt).__name__}")
        if not tokens:
            raise UsageError("empty prompt: nothing to condition on")
        room = self.ctx.n_ctx - 1  # at least one position to generate into
        if len(tokens) <= room:
            return tokens
        if (truncate or self.truncate) == "error":
            raise ContextOverflowError(
                f"prompt of {len(tokens)} tokens does not fit the context of {self.ctx.n_ctx} "
                f"(use a larger n_ctx, or truncate='left')"
            )
        # keep the most recent tokens, leaving room for the reply (and a leading BOS where the model wants one)
        keep = max(1, room - min(params.max_tokens, room // 2))
        head = tokens[:1] if self.llama.add_bos and tokens[0] == self.llama.bos else []
        return head + tokens[len(tokens) - keep + len(head):]

    def _params(self, sampling: dict) -> tuple[SamplingParams, str | None]:
        truncate = sampling.pop("truncate", None)
        if truncate is not None and truncate not in TRUNCATE:
            raise UsageError(f"truncate must be one of {', '.join(TRUNCATE)}, not {truncate!r}")
        if self.seed is not None and sampling.get("seed") is None:
            sampling["seed"] = self.seed
        return SamplingParams.from_kwargs(**sampling), truncate

    def generate(self, prompt: str | list[int], **sampling) -> Completion:
        """Complete `prompt`; `sampling` takes SamplingParams' fields and truncate="error"|"left"."""
        params, truncate = self._params(sampling)
        tokens = self._prompt_tokens(prompt, params, truncate)
        with self._lock:
            return generate(self.ctx, tokens, params)

    def stream(self, prompt: str | list[int], **sampling) -> Iterator[Chunk]:
        """Like generate(), as text chunks; the last one carries finish_reason and timings."""
        params, truncate = self._params(sampling)
        tokens = self._prompt_tokens(prompt, params, truncate)
        with self._lock:
            yield from stream(self.ctx, tokens, params)

    # ------------------------------------------------------------ chat

    def _template(self, chat_template: str | None):
        if chat_template is not None:
            return template_for(self.llama, chat_template)
        if self._chat_template is None:  # the model's own template (or the fallback), resolved on first use
            self._chat_template = template_for(self.llama)
        return self._chat_template

    def chat_prompt(self, messages: list[dict], *, chat_template: str | None = None,
                    add_generation_prompt: bool = True) -> str:
        """The prompt text chat() would send for `messages` (see edgelm/runtime/chat.py)."""
        return self._template(chat_template).render(messages, add_generation_prompt=add_generation_prompt)

    def _chat_tokens(self, messages: list[dict], chat_template: str | None, sampling: dict):
        tokens = chat_tokens(self.llama, messages, self._template(chat_template))
        params, truncate = self._params(sampling)
        return self._prompt_tokens(tokens, params, truncate), params

    def chat(self, messages: list[dict], *, chat_template: str | None = None, **sampling) -> Completion:
        """Reply to `messages` ([{"role": ..., "content": ...}]); stops at the model's end-of-turn token."""
        tokens, params = self._chat_tokens(messages, chat_template, sampling)
        with self._lock:
            return generate(self.ctx, tokens, params)

    def chat_stream(self, messages: list[dict], *, chat_template: str | None = None, **sampling) -> Iterator[Chunk]:
        """Like chat(), as text chunks; the last one carries finish_reason and timings."""
        tokens, params = self._chat_tokens(messages, chat_template, sampling)
        with self._lock:
            yield from stream(self.ctx, tokens, params)

    # ------------------------------------------------------------ analysis

    def embed(self, texts: list[str] | str, *, normalize: bool = True):
        """Mean-pooled, L2-normalised hidden states: an (n, n_embd) float32 array (one row for a str)."""
        from .runtime.embed import Embedder

        single = isinstance(texts, str)
        with self._lock:
            if self._embedder is None:
                self._embedder = Embedder(self.llama, n_ctx=self.ctx.n_ctx, n_threads=self.ctx.options.n_threads)
            out = self._embedder.embed([texts] if single else list(texts), normalize=normalize)
        return out[0] if single else out

    def perplexity(self, text: str, *, window: int | None = None, stride: int | None = None):
        """Perplexity of `text` over strided windows (default: the context size, half-window stride)."""
        from .runtime.perplexity import perplexity

        window = window or min(self.ctx.n_ctx, 512)
        with self._lock:
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
        self.ctx.close()
        self.llama.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(path_or_ref: str | os.PathLike | None = None, **options) -> Model:
    """Load a GGUF model (no reference: the bundled default model)."""
    return Model(path_or_ref, **options)
