"""Canonical evaluation: cutting prompts into llama.cpp batches so that reused KV gives exactly a cold run's output.

llama.cpp's CPU kernels round differently depending on how a prompt is cut into batches (see below). These rules
say which cuts are safe (batch_plan), how much of a held prefix a request may keep (reusable), and, for the
batching engine, which prompt chunks llama.cpp evaluated canonically (micro_batches, whole_shares).
benchmarks/canonical_rows.py measures the least batch length on a given machine.
"""
from __future__ import annotations

# Flash attention switches to a tiled kernel at 64 queries per batch (GGML_FA_TILE_Q; only over an f16 or f32 KV
# cache), repacked quantized weights multiply activation rows in groups of 4 and the remainder one by one, and
# batches of fewer than 8 rows round differently again (measured on repacked K-quants; Q8_0 and F16 need fewer). A
# *canonical* evaluation puts every position in a batch of at least canonical_rows() tokens that starts at a
# multiple of ROW_GROUP; positions evaluated that way come out bit for bit the same however the prompt is cut
# (tests/test_prompt_cache.py checks it), so a reused prefix gives exactly the cold output (generate.prefill).
FA_TILE = 64
SHORT_ROWS = 8
ROW_GROUP = 4


def canonical_rows(flash_attn: bool | None, type_k: str, type_v: str) -> int:
    """The least batch whose positions a canonical evaluation reproduces: FA_TILE where the tiled flash attention
    kernel may run (flash attention on or automatic, over an f16 or f32 KV cache), else SHORT_ROWS."""
    tiled = flash_attn is not False and type_k == type_v and type_k in ("f16", "f32")
    return FA_TILE if tiled else SHORT_ROWS


def reusable(shared: int, exact: int, n_tokens: int, reuse: str = "exact", rows: int = FA_TILE) -> int:
    """How many leading positions of an `n_tokens` prompt to keep, of `shared` held ones of which `exact`
    were evaluated canonically (in batches of at least `rows`: canonical_rows). The last token is
    always evaluated again: sampling needs its logits."""
    if reuse == "off":
        return 0
    if reuse == "fast":
        return min(shared, n_tokens - 1)
    n = min(shared, exact, n_tokens - rows)
    return max(0, n - n % ROW_GROUP)


def batch_plan(start: int, end: int, n_batch: int, rows: int = FA_TILE) -> list[tuple[int, int]] | None:
    """Canonical batches for positions [start, end) (start a multiple of ROW_GROUP, each batch at least
    `rows` long), or None if there are none: fewer than `rows` positions, or an n_batch too small."""
    size = n_batch - n_batch % ROW_GROUP
    if end - start < rows or start % ROW_GROUP or (end - start > n_batch and size < 2 * rows):
        return None
    plan, pos = [], start
    while end - pos > n_batch:
        step = size
        rest = end - pos - size
        if 0 < rest < rows:  # leave the last batch `rows` long
            short = rows - rest
            step -= short + (-short) % ROW_GROUP
        plan.append((pos, pos + step))
        pos += step
    plan.append((pos, end))
    return plan


def prefill_batches(n: int, n_tokens: int, n_batch: int, source_exact: int,
                    rows: int = FA_TILE) -> tuple[list[tuple[int, int]], int]:
    """The batches that evaluate positions [n, n_tokens) after n reused ones (canonical where batch_plan can
    make them, else plain n_batch chunks), and how many leading positions are canonical afterwards."""
    plan = batch_plan(n, n_tokens, n_batch, rows)
    if plan is None:
        return [(lo, min(lo + n_batch, n_tokens)) for lo in range(n, n_tokens, n_batch)], min(n, source_exact)
    canonical = n == 0 or source_exact >= n
    return plan, (n_tokens - n_tokens % ROW_GROUP if canonical else min(n, source_exact))


def micro_batches(runs: list[tuple[int, int]], n_ubatch: int) -> list[dict[int, int]]:
    """How llama.cpp cuts a batch for a context with one KV stream per sequence (llama_batch_allocr::split_equal,
    sequential): the batch's tokens come in runs (seq, n_tokens), each sequence once; a micro-batch takes the
    first sequence with tokens left and every later one whose id is one more than the last taken, then an equal
    number of tokens from each. Returns the micro-batches as {seq: tokens}. The engine reads from it the shares
    each prompt chunk was evaluated in (see Engine._step); tests/test_engine.py checks it against llama.cpp."""
    left = dict(runs)
    out = []
    while any(left.values()):
        group: list[int] = []
        for seq, n in left.items():
            if n and (not group or seq == group[-1] + 1):
                group.append(seq)
        take = min(min(left[s] for s in group), max(1, n_ubatch // len(group)))
        for s in group:
            left[s] -= take
        out.append(dict.fromkeys(group, take))
    return out


def canonical_sequences(runs: list[tuple[int, int]], n_ubatch: int, rows: int) -> set[int]:
    """The sequences of a batch's `runs` (as micro_batches takes them) whose tokens llama.cpp evaluated in whole
    canonical shares (whole_shares)."""
    shares: dict[int, list[tuple[int, int]]] = {}  # seq -> (tokens, sequences in the micro-batch), in order
    for ub in micro_batches(runs, n_ubatch):
        for seq, m in ub.items():
            shares.setdefault(seq, []).append((m, len(ub)))
    return {seq for seq, own in shares.items() if whole_shares(own, rows)}


def whole_shares(shares: list[tuple[int, int]], rows: int) -> bool:
    """Whether a prompt chunk evaluated in `shares` ((tokens, sequences in the micro-batch) each, in order, from
    micro_batches) was evaluated canonically: every share at least `rows` long and a whole number of row groups
    (the row groups of a micro-batch run across its sequences); only a last share alone in its micro-batch may
    end in a partial one."""
    return all(m >= rows and (m % ROW_GROUP == 0 or (i == len(shares) - 1 and group == 1))
               for i, (m, group) in enumerate(shares))
