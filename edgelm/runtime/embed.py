"""Text embeddings: the mean of the model's last hidden states over a text, L2-normalised.

A generative model's pooled hidden state is a usable (if not state-of-the-art)
sentence embedding; it is what llama.cpp's embedding tool returns with
`--pooling mean`. Embeddings need their own context (llama.cpp switches the
graph's output from logits to hidden states), created on first use.
"""
from __future__ import annotations

import llama_cpp as lib
import numpy as np

from edgelm.errors import ContextOverflowError, UsageError

from .context import Context, ContextOptions
from .model import LlamaModel


class Embedder:
    """One embedding context; each text is one sequence evaluated in a single batch."""

    def __init__(self, model: LlamaModel, *, n_ctx: int = 2048, n_threads: int | None = None):
        n_ctx = min(n_ctx, model.n_ctx_train) if model.n_ctx_train else n_ctx
        # pooling needs a whole sequence in one micro-batch
        self.ctx = Context(model, ContextOptions(n_ctx=n_ctx, n_batch=n_ctx, n_threads=n_threads, embeddings=True))
        self.model = model

    def embed(self, texts: list[str], *, normalize: bool = True, truncate: bool = False) -> np.ndarray:
        """(len(texts), n_embd) float32 embeddings; with `truncate`, a text longer than the context is embedded
        by its first tokens (as Ollama's /api/embed does), else it raises ContextOverflowError."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise UsageError("embed() takes a list of strings")
        out = np.empty((len(texts), self.model.n_embd), dtype=np.float32)
        for i, text in enumerate(texts):
            tokens = self.model.tokenize(text)
            if not tokens:
                raise UsageError(f"text {i} is empty after tokenisation")
            if len(tokens) > self.ctx.n_batch and truncate:
                tokens = tokens[:self.ctx.n_batch]
            elif len(tokens) > self.ctx.n_batch:
                raise ContextOverflowError(
                    f"text {i} has {len(tokens)} tokens; the embedding context holds {self.ctx.n_batch}"
                )
            self.ctx.clear()
            self.ctx.decode(tokens, 0, logits_last=False)
            ptr = lib.llama_get_embeddings_seq(self.ctx.ptr, 0)
            out[i] = np.ctypeslib.as_array(ptr, shape=(self.model.n_embd,))
        if normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def close(self) -> None:
        self.ctx.close()
