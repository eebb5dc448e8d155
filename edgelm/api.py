"""The public Python API: `edgelm.load()` and the `Model` it returns."""
from __future__ import annotations

import os
import threading
from typing import Iterator

from .runtime.context import Context, ContextOptions
from .runtime.generate import Chunk, Completion, generate, stream
from .runtime.model import LlamaModel, LoadOptions
from .runtime.sampling import SamplingParams


class Model:
    """A loaded model with its context. Calls are serialised by a lock, so it is safe to share."""

    def __init__(self, path: str | os.PathLike | None = None, *, n_ctx: int = 2048, n_threads: int | None = None,
                 n_batch: int = 512, n_gpu_layers: int = 0, flash_attn: bool | None = None,
                 type_k: str = "f16", type_v: str = "f16", use_mmap: bool = True, use_mlock: bool = False):
        self.llama = LlamaModel(path, LoadOptions(n_gpu_layers=n_gpu_layers, use_mmap=use_mmap, use_mlock=use_mlock))
        self.ctx = Context(self.llama, ContextOptions(n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
                                                      flash_attn=flash_attn, type_k=type_k, type_v=type_v))
        self._lock = threading.Lock()

    # ------------------------------------------------------------ text

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self.llama.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.llama.detokenize(tokens)

    def _prompt_tokens(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenize(prompt)
        tokens = list(prompt)
        self.llama.check_tokens(tokens)
        return tokens

    def generate(self, prompt: str | list[int], **sampling) -> Completion:
        params = SamplingParams.from_kwargs(**sampling)
        tokens = self._prompt_tokens(prompt)
        with self._lock:
            return generate(self.ctx, tokens, params)

    def stream(self, prompt: str | list[int], **sampling) -> Iterator[Chunk]:
        params = SamplingParams.from_kwargs(**sampling)
        tokens = self._prompt_tokens(prompt)
        with self._lock:
            yield from stream(self.ctx, tokens, params)

    # ------------------------------------------------------------ info

    @property
    def path(self):
        return self.llama.path

    @property
    def n_ctx(self) -> int:
        return self.ctx.n_ctx

    def close(self) -> None:
        self.ctx.close()
        self.llama.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(path_or_ref: str | os.PathLike | None = None, **options) -> Model:
    """Load a GGUF model (no reference: the bundled default model)."""
    return Model(path_or_ref, **options)
