"""Teachers for distillation: log-probabilities over the student's vocabulary for windows of tokens.

A Hugging Face teacher runs in transformers and gives the full distribution. A GGUF teacher runs in
llama.cpp; its top-k log-probabilities per position are computed once per window and kept in a disk
cache (memory-mapped), so memory stays bounded however long training runs.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from edgelm.errors import ConversionError


class HFTeacher:
    """Full-vocabulary log-probabilities from a transformers checkpoint (fp32, no gradient)."""

    def __init__(self, path: Path, device: str):
        import torch
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
        self.device = device
        self.vocab = _hf_vocab(path)

    def log_probs(self, ids, windows=None, temperature: float = 1.0, hidden: bool = False):
        """(values (B, T, V), None, hidden states or None) for input ids (B, T)."""
        import torch

        with torch.no_grad():
            out = self.model(input_ids=ids, output_hidden_states=hidden)
            logp = torch.log_softmax(out.logits.float() / temperature, dim=-1)
        return logp, None, out.hidden_states if hidden else None


class GGUFTeacher:
    """Top-k log-probabilities from llama.cpp, cached on disk per window of the training stream."""

    def __init__(self, path: Path, windows: np.ndarray, cache_dir: Path, top_k: int, n_threads: int | None,
                 progress: bool = False):
        from edgelm.gguf_reader import read_gguf

        self.path, self.top_k = Path(path), top_k
        self.vocab = list(read_gguf(self.path).get("tokenizer.ggml.tokens") or [])
        key = hashlib.sha256(windows.tobytes() + str(top_k).encode() + _file_digest(self.path).encode()).hexdigest()
        cache_dir.mkdir(parents=True, exist_ok=True)
        stem = cache_dir / f"teacher-{key[:16]}"
        n, t = windows.shape[0], windows.shape[1] - 1
        done = Path(f"{stem}.done")
        mode = "r" if done.is_file() else "w+"
        self.values = np.lib.format.open_memmap(f"{stem}.values.npy", mode=mode, dtype=np.float16, shape=(n, t, top_k))
        self.indices = np.lib.format.open_memmap(f"{stem}.indices.npy", mode=mode, dtype=np.int32, shape=(n, t, top_k))
        if mode == "w+":
            self._fill(windows, n_threads, progress)
            self.values.flush()
            self.indices.flush()
            done.write_text(json.dumps({"model": str(self.path), "windows": n, "top_k": top_k}))

    def _fill(self, windows: np.ndarray, n_threads: int | None, progress: bool) -> None:
        from tqdm import tqdm

        from edgelm.runtime.context import Context, ContextOptions
        from edgelm.runtime.model import LlamaModel

        t = windows.shape[1] - 1
        with LlamaModel(self.path) as llama:
            ctx = Context(llama, ContextOptions(n_ctx=max(t, 64), n_batch=max(t, 64), n_threads=n_threads))
            try:
                for i in tqdm(range(len(windows)), desc="teacher logits", unit="window", disable=not progress):
                    ctx.clear()
                    ctx.decode(windows[i, :t].tolist(), 0, logits_last=False, logits_from=0)
                    logits = ctx.all_logits(t)
                    top = np.argpartition(logits, -self.top_k, axis=1)[:, -self.top_k:]
                    z = logits - logits.max(axis=1, keepdims=True)
                    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
                    self.indices[i] = top
                    self.values[i] = np.take_along_axis(logp, top, axis=1)
            finally:
                ctx.close()

    def log_probs(self, ids, windows: np.ndarray, temperature: float = 1.0, hidden: bool = False):
        """(top-k log-probabilities (B, T, K) of the full distribution, their ids (B, T, K), None). The mass
        outside the top k stays 1 − Σ; it is unknown at another temperature, so only T = 1 is offered."""
        import torch

        if hidden:
            raise ConversionError("hidden-state matching needs a Hugging Face teacher (a GGUF teacher has no hidden states here)")
        if temperature != 1.0:
            raise ConversionError("a GGUF teacher keeps top-k log-probabilities at temperature 1; use --temperature 1 "
                                  "or a Hugging Face teacher")
        values = torch.from_numpy(self.values[windows].astype(np.float32)).to(ids.device)
        indices = torch.from_numpy(self.indices[windows].astype(np.int64)).to(ids.device)
        return values, indices, None


def load_teacher(path: str | Path, *, device: str, windows: np.ndarray, cache_dir: Path, top_k: int,
                 n_threads: int | None, progress: bool):
    path = Path(path)
    if path.is_dir():
        return HFTeacher(path, device)
    if path.is_file() and path.suffix == ".gguf":
        return GGUFTeacher(path, windows, cache_dir, top_k, n_threads, progress)
    raise ConversionError(f"{path}: a teacher is a checkpoint directory or a .gguf file")


def check_same_vocabulary(teacher_vocab: list[str], student_dir: Path) -> None:
    """The teacher's token strings by id must be the student's (padding entries past the tokenizer aside)."""
    student = _hf_vocab(student_dir)
    if len(teacher_vocab) < len(student):
        raise ConversionError(f"teacher has {len(teacher_vocab)} tokens, student {len(student)}: distillation "
                              "needs one vocabulary")
    if mismatch := next((i for i, (a, b) in enumerate(zip(teacher_vocab, student)) if a != b), None):
        raise ConversionError(f"teacher and student vocabularies differ at id {mismatch} "
                              f"({teacher_vocab[mismatch]!r} vs {student[mismatch]!r})")


def _hf_vocab(path: Path) -> list[str]:
    """Token strings by id from tokenizer.json (model vocabulary plus added tokens)."""
    from .vocab_trim import id_to_token

    f = Path(path) / "tokenizer.json"
    if not f.is_file():
        raise ConversionError(f"{path}: no tokenizer.json")
    try:
        tokens = id_to_token(json.loads(f.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConversionError(f"{f}: not a tokenizer.json this can read: {e}") from None
    out = [""] * (max(tokens) + 1)
    for i, text in tokens.items():
        out[i] = text
    return out


def _file_digest(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
