"""Importance matrix: the mean squared activation per input column of every matrix multiplication.

Collected from llama.cpp itself through the context's eval callback while it runs the
model over calibration text; saved in llama.cpp's imatrix GGUF layout so that
`llama-quantize --imatrix` reads it too.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import llama_cpp as lib
import numpy as np

from edgelm.errors import ConversionError
from edgelm.gguf_reader import read_gguf

MIN_TOKENS = 16  # llama.cpp's imatrix tool ignores smaller batches too (generation-sized ones)


@dataclass
class Imatrix:
    sums: dict[str, np.ndarray] = field(default_factory=dict)  # weight name -> sum of x^2 per column (float64)
    counts: dict[str, int] = field(default_factory=dict)  # weight name -> rows accumulated
    chunks: int = 0
    chunk_size: int = 0
    datasets: list[str] = field(default_factory=list)

    def means(self) -> dict[str, np.ndarray]:
        """What llama_model_quantize takes: per-column mean of x^2."""
        return {k: (v / self.counts[k]).astype(np.float32) for k, v in self.sums.items() if self.counts[k]}


class Collector:
    """The eval callback: every matrix multiplication's input rows, squared and summed per column."""

    def __init__(self, imatrix: Imatrix, include_output: bool):
        from edgelm.runtime import ggml

        ggml.check_layout()
        self.ggml = ggml
        self.imatrix = imatrix
        self.include_output = include_output
        self.mul_mat = ggml.op_id("MUL_MAT")
        self.error: BaseException | None = None
        self.callback = lib.ggml_backend_sched_eval_callback(self._on_tensor)

    def _weight_name(self, t) -> str | None:
        if t.op != self.mul_mat or not t.src[0] or not t.src[1]:
            return None
        src1 = t.src[1].contents
        if src1.type != self.ggml.GGML_TYPE_F32 or src1.ne[1] < MIN_TOKENS:
            return None
        name = t.src[0].contents.name.decode()
        if name.startswith("blk.") or (self.include_output and name == "output.weight"):
            return name
        return None

    def wants(self, t) -> bool:
        return self._weight_name(t) is not None

    def collect(self, t, address: int) -> None:
        name = self._weight_name(t)
        if name is None:
            return
        src1_address = ctypes.cast(t.src[1], ctypes.c_void_p).value
        x = self.ggml.read_rows(t.src[1].contents, src1_address)
        sq = np.einsum("ij,ij->j", x, x, dtype=np.float64)
        if not np.isfinite(sq).all():
            raise ConversionError(f"non-finite activations entering {name}")
        acc = self.imatrix.sums.get(name)
        self.imatrix.sums[name] = sq if acc is None else acc + sq
        self.imatrix.counts[name] = self.imatrix.counts.get(name, 0) + x.shape[0]

    def _on_tensor(self, address: int, ask: bool, _user_data) -> bool:
        try:
            t = self.ggml.GGMLTensor.from_address(address)
            if ask:
                return self.wants(t)
            self.collect(t, address)
            return True
        except BaseException as e:  # never let an exception cross the C boundary
            self.error = self.error or e
            return False


def compute_imatrix(model_path: str | Path, text: str, *, chunk_size: int = 512, max_chunks: int | None = None,
                    n_threads: int | None = None, include_output: bool = False, dataset: str = "") -> Imatrix:
    """Run the model over `text` in chunks of `chunk_size` tokens and collect the importance matrix."""
    imatrix = Imatrix(chunk_size=chunk_size, datasets=[dataset] if dataset else [])
    run_chunks(model_path, text, Collector(imatrix, include_output), chunk_size=chunk_size, max_chunks=max_chunks,
               n_threads=n_threads)
    if not imatrix.sums:
        raise ConversionError(f"{model_path}: no matrix multiplications observed")
    return imatrix


def run_chunks(model_path: str | Path, text: str, collector: Collector, *, chunk_size: int,
               max_chunks: int | None, n_threads: int | None) -> int:
    """Evaluate `text` in document-like chunks with `collector` as the eval callback; returns the chunk count."""
    from edgelm.runtime.context import Context, ContextOptions
    from edgelm.runtime.model import LlamaModel

    with LlamaModel(model_path) as llama:
        tokens = llama.tokenize(text)
        n_chunks = len(tokens) // chunk_size
        if max_chunks is not None:
            n_chunks = min(n_chunks, max_chunks)
        if n_chunks < 1:
            raise ConversionError(f"calibration text too short: {len(tokens)} tokens, need at least {chunk_size}")
        ctx = Context(llama, ContextOptions(n_ctx=chunk_size, n_batch=chunk_size, n_threads=n_threads),
                      eval_callback=collector.callback)
        try:
            for i in range(n_chunks):
                ctx.clear()
                chunk = tokens[i * chunk_size:(i + 1) * chunk_size]
                if llama.add_bos:  # each chunk starts like a document, as llama-imatrix makes them
                    chunk[0] = llama.bos
                # logits for every row, so the last layer runs on all tokens (not just the last)
                ctx.decode(chunk, 0, logits_last=False, logits_from=0)
                if collector.error:
                    raise collector.error
                collector.imatrix.chunks += 1
        finally:
            ctx.close()
    return n_chunks


def save_imatrix(imatrix: Imatrix, path: str | Path) -> None:
    """llama.cpp's imatrix GGUF: <name>.in_sum2 (ne0 × 1) and <name>.counts (1 × 1) per weight."""
    from .export import atomic_path

    with atomic_path(Path(path)) as tmp:
        w = gguf.GGUFWriter(tmp, arch="imatrix")
        w.add_string("general.type", "imatrix")
        w.add_array("imatrix.datasets", imatrix.datasets or ["unknown"])
        w.add_uint32("imatrix.chunk_count", imatrix.chunks)
        w.add_uint32("imatrix.chunk_size", imatrix.chunk_size)
        for name in sorted(imatrix.sums):
            w.add_tensor(f"{name}.in_sum2", imatrix.sums[name].astype(np.float32).reshape(1, -1))
            w.add_tensor(f"{name}.counts", np.array([[imatrix.counts[name]]], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def load_imatrix(path: str | Path) -> Imatrix:
    g = read_gguf(path)
    if g.get("general.type") != "imatrix":
        raise ConversionError(f"{path}: not an imatrix GGUF (general.type is {g.get('general.type')!r})")
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: np.asarray(t.data, dtype=np.float32).reshape(-1) for t in reader.tensors}
    imatrix = Imatrix(chunks=int(g.get("imatrix.chunk_count", 0)), chunk_size=int(g.get("imatrix.chunk_size", 0)),
                      datasets=list(g.get("imatrix.datasets", [])))
    for key, values in tensors.items():
        if key.endswith(".in_sum2"):
            name = key[: -len(".in_sum2")]
            counts = tensors.get(f"{name}.counts")
            if counts is None or counts.size != 1:
                raise ConversionError(f"{path}: {name} has no single .counts entry")
            imatrix.sums[name] = values.astype(np.float64)
            imatrix.counts[name] = int(counts[0])
    return imatrix
