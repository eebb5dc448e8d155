"""What `edgelm info` and Ollama's /api/show say about a GGUF file: a JSON-serialisable summary of its header."""
from __future__ import annotations

from typing import Any

from .gguf_reader import GGUFFile, format_count


def describe(gguf: GGUFFile) -> dict[str, Any]:
    """The summary `edgelm info` prints; JSON-serialisable."""
    arch = gguf.architecture

    def hp(key: str) -> Any:  # hyperparameters live under the architecture's own prefix
        return gguf.get(f"{arch}.{key}") if arch else None

    tokens = gguf.get("tokenizer.ggml.tokens")
    n_params = gguf.n_parameters
    tensor_bytes = gguf.n_tensor_bytes
    return {
        "path": gguf.path,
        "architecture": arch,
        "name": gguf.get("general.name"),
        "n_parameters": n_params,
        "size_label": gguf.get("general.size_label") or format_count(n_params),
        "file_size": gguf.file_size,
        "tensor_bytes": tensor_bytes,
        "bits_per_weight": round(8 * tensor_bytes / n_params, 3) if n_params else None,
        "context_length": hp("context_length"),
        "n_layers": hp("block_count"),
        "n_embd": hp("embedding_length"),
        "n_heads": hp("attention.head_count"),
        "n_kv_heads": hp("attention.head_count_kv"),
        "vocab_size": len(tokens) if isinstance(tokens, list) else hp("vocab_size"),
        "tokenizer_model": gguf.get("tokenizer.ggml.model"),
        "gguf_version": gguf.version,
        "n_tensors": len(gguf.tensors),
        "n_metadata": len(gguf.metadata),
        "bytes_by_type": gguf.bytes_by_type(),
        **_adapter_summary(gguf),
    }


def _adapter_summary(gguf: GGUFFile) -> dict[str, Any]:
    """A LoRA adapter's kind, alpha and largest rank (the rank is the rows of its .lora_a tensors)."""
    if gguf.get("general.type") != "adapter":
        return {}
    ranks = [t.shape[1] for t in gguf.tensors if t.name.endswith(".lora_a") and len(t.shape) == 2]
    return {"adapter": gguf.get("adapter.type"), "lora_alpha": gguf.get("adapter.lora.alpha"),
            "lora_rank": max(ranks, default=None), "lora_targets": len(ranks)}
