"""edgelm's perplexity against llama.cpp's llama-perplexity on the same GGUF and the same text.

The two tools score different tokens, so their headline numbers differ by design:

- edgelm (runtime/perplexity.py): sliding windows of W tokens every W/2; the first window scores
  all its tokens, every later one only the W/2 it adds, each with W/2..W-1 tokens of context.
  Every token after the first is scored once. No BOS is inserted inside the text.
- llama-perplexity (default): non-overlapping chunks of W tokens, the first token of each chunk
  replaced by BOS, only the second half scored (W/2..W-1 tokens of context); the text's tail
  after the last whole chunk is dropped.
- llama-perplexity --ppl-stride S: windows of W every S, scoring the last S tokens of each (the
  first window too), tail dropped. Its BOS substitution happens after the decode, so windows
  see the text as is.

To tell a scheme difference from a logits difference, both llama.cpp schemes are also computed
here from edgelm's own llama.cpp context; those numbers must match llama-perplexity's closely.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from common import ROOT, run_measured, tool

from edgelm.runtime.context import default_threads


def _scored_nll(ctx, tokens: list[int], first_row: int, targets: list[int]) -> float:
    """Decode `tokens` from position 0; minus the summed log p of `targets`, predicted from row `first_row` on."""
    from edgelm.runtime.perplexity import log_softmax_at

    ctx.clear()
    ctx.decode(tokens, 0, logits_last=False, logits_from=first_row)
    rows = ctx.all_logits(len(tokens) - first_row)[: len(targets)]
    return -float(log_softmax_at(rows, np.asarray(targets)).sum())


def llama_chunks_ppl(model_path: Path, text: str, window: int = 512, threads: int | None = None,
                     lora: Path | None = None) -> tuple[float, int]:
    """llama-perplexity's default scheme through edgelm's runtime: (perplexity, tokens scored)."""
    from edgelm.runtime.context import Context, ContextOptions
    from edgelm.runtime.model import LlamaModel

    with LlamaModel(model_path, lora=lora) as llama:
        tokens = llama.tokenize(text)
        ctx = Context(llama, ContextOptions(n_ctx=window, n_batch=window, n_threads=threads))
        try:
            first, nll, count = window // 2, 0.0, 0
            for i in range(len(tokens) // window):
                chunk = tokens[i * window:(i + 1) * window]
                if llama.add_bos:
                    chunk[0] = llama.bos
                # rows first..W-2 predict tokens first+1..W-1
                nll += _scored_nll(ctx, chunk, first, chunk[first + 1:])
                count += window - first - 1
        finally:
            ctx.close()
    return math.exp(nll / count), count


def llama_stride_ppl(model_path: Path, text: str, window: int, stride: int,
                     threads: int | None = None) -> tuple[float, int]:
    """llama-perplexity --ppl-stride through edgelm's runtime: (perplexity, tokens scored)."""
    from edgelm.runtime.context import Context, ContextOptions
    from edgelm.runtime.model import LlamaModel

    with LlamaModel(model_path) as llama:
        tokens = llama.tokenize(text)
        ctx = Context(llama, ContextOptions(n_ctx=window, n_batch=window, n_threads=threads))
        try:
            nll, count = 0.0, 0
            n_windows = (len(tokens) - window + stride - 1) // stride
            for i in range(n_windows):
                chunk = tokens[i * stride:i * stride + window]
                first = window - stride - 1
                nll += _scored_nll(ctx, chunk, first, chunk[first + 1:])
                count += stride
        finally:
            ctx.close()
    return math.exp(nll / count), count


def run_llama_perplexity(model_path: Path, text_file: Path, *, ctx: int, stride: int | None = None,
                         threads: int | None = None, attempts: int = 5, lora: Path | None = None) -> dict:
    """llama-perplexity's result: perplexity, the window it used, wall seconds.

    llama.cpp's logger is a deliberately leaked singleton whose worker thread is not flushed at
    exit (common/log.cpp, common_log_main), so with output to a file the last lines, the final
    estimate included, are sometimes lost. The running value after the last window equals the
    final estimate; a run is accepted once that line is there, else it is repeated.
    """
    cmd = [tool("llama-perplexity"), "-m", model_path, "-f", text_file, "-c", ctx, "-b", max(ctx, 512),
           "-t", threads or default_threads(), "--no-warmup"]
    if stride:
        cmd += ["--ppl-stride", stride]
    if lora:
        cmd += ["--lora", lora]
    for _ in range(attempts):
        r = run_measured(cmd).check()
        log = r.stdout + r.stderr
        total = re.search(r"(?:calculating perplexity|computing) over (\d+) chunks", log)
        values = dict(re.findall(r"\[(\d+)\]([0-9.]+),", log))
        if total and total.group(1) in values:
            break
    else:
        raise RuntimeError(f"llama-perplexity's output lost its last line {attempts} times: {r.cmd}")
    final = re.search(r"Final estimate: PPL = ([0-9.]+)", log)
    ppl = float(final.group(1)) if final else float(values[total.group(1)])
    window = int(re.search(r"Calculation chunk = (\d+)", log).group(1)) if stride else ctx
    shown = " ".join(c[len(str(ROOT)) + 1:] if c.startswith(str(ROOT)) else c for c in r.cmd)
    return {"perplexity": ppl, "window": window, "seconds": r.seconds, "cmd": shown}


def cross_check(model_path: Path, text: str, text_file: Path, edgelm_ppl: float, window: int = 512,
                strided: bool = True, threads: int | None = None) -> list[dict]:
    """Rows: scheme, llama-perplexity's number, edgelm's runtime on that scheme, edgelm's own scheme."""
    # llama-perplexity -f drops one trailing newline; tokenize the same string here
    same_text = text[:-1] if text.endswith("\n") else text
    rows = []
    ref = run_llama_perplexity(model_path, text_file, ctx=window, threads=threads)
    mine, n = llama_chunks_ppl(model_path, same_text, window, threads)
    rows.append({"scheme": f"llama.cpp chunks ({window}, BOS, 2nd half scored)", "llama": ref["perplexity"],
                 "edgelm_same_scheme": mine, "scored": n, "cmd": ref["cmd"]})
    stride = window // 2
    if not strided:
        return [r | {"edgelm_own": edgelm_ppl} for r in rows]
    # --ppl-stride grows the context by stride/2, so ask for window - stride/2 to get a window of `window`
    ref = run_llama_perplexity(model_path, text_file, ctx=window - stride // 2, stride=stride, threads=threads)
    mine, n = llama_stride_ppl(model_path, same_text, ref["window"], stride, threads)
    rows.append({"scheme": f"llama.cpp --ppl-stride {stride} (window {ref['window']})", "llama": ref["perplexity"],
                 "edgelm_same_scheme": mine, "scored": n, "cmd": ref["cmd"]})
    for r in rows:
        r["edgelm_own"] = edgelm_ppl
    return rows
