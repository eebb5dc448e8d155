"""Will it fit? The memory a model and its context will take, estimated from the GGUF header before anything is
loaded, against what this machine (or the container it runs in) has available.

llama.cpp itself would mmap the weights, allocate the KV cache and compute buffer, and on a device that is too
small get the process killed or the system swapping. Ollama refuses such a load up front; so does edgelm, with
the numbers and what to change (`memory_check=False`, `--no-mem-check` to try anyway).

- weights: every tensor's bytes, but those of layers offloaded to a GPU (n_gpu_layers);
- KV cache: per layer and cell, the K and V rows (n_head_kv x head size) in their cache types, exactly as
  llama.cpp sizes them (for models with one attention kind in every layer; others are estimated as such);
- compute: llama.cpp reserves a graph buffer sized by its widest batch: the logits of n_batch rows dominate
  (n_vocab floats each), plus the FFN's and attention's intermediates.
"""
from __future__ import annotations

import contextlib

import sys
from dataclasses import dataclass, replace
from pathlib import Path

from edgelm.errors import InsufficientMemoryError
from edgelm.gguf_reader import GGML_TYPES, GGUFFile

GIB = 1 << 30
RUNTIME_BYTES = 8 << 20
KV_TYPE_IDS = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7}


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv: int
    compute: int  # llama.cpp's graph buffer
    n_ctx: int
    runtime: int = 0  # edgelm's own buffers and the threads' stacks
    draft: int = 0  # a draft model's weights, KV cache and buffers, all told (speculative decoding)

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute + self.runtime + self.draft

    def describe(self) -> str:
        draft = f", draft model {gib(self.draft)}" if self.draft else ""
        return (f"about {gib(self.total)} (weights {gib(self.weights)}, KV cache {gib(self.kv)} for "
                f"{self.n_ctx:,} tokens, compute {gib(self.compute + self.runtime)}{draft})")


def gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB // 10 else f"{n / (1 << 20):.0f} MiB"


def _hp(gguf: GGUFFile, key: str, default=None):
    value = gguf.get(f"{gguf.architecture}.{key}", default)
    return max(value) if isinstance(value, list) and value else value  # per-layer arrays: the widest layer


def _bytes_per_element(type_name: str) -> float:
    t = GGML_TYPES[KV_TYPE_IDS[type_name]]
    return t.type_size / t.block_size


def estimate(files: list[GGUFFile], *, n_ctx: int, n_batch: int = 512, type_k: str = "f16", type_v: str = "f16",
             n_gpu_layers: int = 0, flash_attn: bool | None = None) -> MemoryEstimate:
    """Host memory for a model (its GGUF files' headers) and a context of `n_ctx` cells (all sequences)."""
    main = files[0]
    n_layer = int(_hp(main, "block_count", 0) or 0)
    n_embd = int(_hp(main, "embedding_length", 0) or 0)
    n_head = int(_hp(main, "attention.head_count", 1) or 1)
    n_head_kv = int(_hp(main, "attention.head_count_kv", n_head) or n_head)
    head_k = int(_hp(main, "attention.key_length", n_embd // n_head) or 0)
    head_v = int(_hp(main, "attention.value_length", n_embd // n_head) or 0)
    n_ff = int(_hp(main, "feed_forward_length", 4 * n_embd) or 0)
    tokens = main.get("tokenizer.ggml.tokens")
    n_vocab = int(getattr(tokens, "length", None) or (len(tokens) if isinstance(tokens, list) else 0)
                  or _hp(main, "vocab_size", 0) or 0)
    n_ctx = n_ctx or int(_hp(main, "context_length", 2048) or 2048)
    offloaded = set(range(max(0, n_layer - n_gpu_layers), n_layer)) if n_gpu_layers > 0 else set()
    weights = sum(t.n_bytes for f in files for t in f.tensors if _layer(t.name) not in offloaded)
    host_layers = n_layer - len(offloaded)
    kv = int(host_layers * n_ctx * n_head_kv * (head_k * _bytes_per_element(type_k)
                                                 + head_v * _bytes_per_element(type_v)))
    n_ubatch = min(n_batch, n_ctx)
    rows = n_vocab + 2 * n_ff + 4 * n_embd  # logits, the FFN's gate and up, the residual stream's copies
    if flash_attn is False:  # without flash attention the scores of one head's batch against the cache exist too
        rows += n_ctx
    # beyond llama.cpp's buffers a run measured 3.6 MiB more on the small model (benchmarks/memory_fit.py):
    # sampling buffers of a few bytes per vocabulary entry, the interpreter's and the worker threads' pages
    runtime = RUNTIME_BYTES + 32 * n_vocab
    return MemoryEstimate(weights, kv, 4 * n_ubatch * rows, n_ctx, runtime)


def _layer(name: str) -> int | None:
    if name.startswith("blk."):
        head = name.split(".", 2)[1]
        return int(head) if head.isdigit() else None
    return None


def available() -> int | None:
    """Bytes this process may still take: MemAvailable, or less where a cgroup (a container) limits it; None
    where the system does not say (then nothing is checked)."""
    if not sys.platform.startswith("linux"):
        return None
    found = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            found = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    room = _cgroup_room()
    if room is not None:
        found = room if found is None else min(found, room)
    return found


def _cgroup_room(root: Path = Path("/")) -> int | None:
    """cgroup v2 memory.max less what the group holds and cannot readily give back (memory.current counts the
    page cache too: its inactive files are reclaimed before anything fails, as a container's working set leaves
    them out); None: no limit, or not cgroup v2."""
    try:
        line = next(ln for ln in (root / "proc/self/cgroup").read_text().splitlines() if ln.startswith("0::"))
        group = root / "sys/fs/cgroup" / line[3:].lstrip("/")
        limit = (group / "memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int((group / "memory.current").read_text())
        with contextlib.suppress(OSError, ValueError):
            stat = dict(ln.split() for ln in (group / "memory.stat").read_text().splitlines())
            used -= min(used, int(stat.get("inactive_file", 0)))
        return max(0, int(limit) - used)
    except (OSError, StopIteration, ValueError):
        return None


def check_fits(need: MemoryEstimate, what: str, *, hint: str = "") -> None:
    """InsufficientMemoryError when `need` is more than is available (nothing when the system does not say)."""
    room = available()
    if room is None or need.total <= room:
        return
    advice = hint or "a smaller context, a quantized KV cache (type_k/type_v q8_0) or a smaller quantization"
    raise InsufficientMemoryError(f"{what} needs {need.describe()}, but {gib(room)} is available; try {advice} "
                                  "(or skip this check: --no-mem-check, memory_check=False)")


def ensure_fits(model, what: str | None = None, *, draft=None, **context) -> MemoryEstimate:
    """estimate() and check_fits() for a model reference (resolved as a load resolves it) before it loads; with
    `draft`, a draft model reference that gets a context of its own of the same size, counted in."""
    from edgelm.gguf_reader import read_gguf

    from .model import resolve_model

    path = resolve_model(model)
    need = estimate([read_gguf(path, keep_arrays=False)], **context)
    if draft is not None:
        need = replace(need, draft=estimate([read_gguf(resolve_model(draft), keep_arrays=False)], **context).total)
    check_fits(need, what or path.name)
    return need
