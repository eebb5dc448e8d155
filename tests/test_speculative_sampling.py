"""Speculative decoding on a 16-token random model (tests/conftest.py: `rand`): greedy output ends at EOS
where the full model's does, and sampling keeps the full model's distribution, checked with a chi-square
test of the first three tokens' joint distribution against its exact value from the model's logits.

Every llama.cpp context runs on one thread (n_threads=1): the test machine shares its cores.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from math import sqrt
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest

import edgelm
from edgelm import native
from edgelm.converters.early_exit import split_paths
from edgelm.runtime.context import Context, ContextOptions
from edgelm.runtime.model import LlamaModel

from conftest import RAND_VOCAB, check_stats

GEN = dict(n_threads=1, n_ctx=256)  # 256: llama.cpp's smallest context (it pads smaller ones)
RAND_PROMPT = [0, *(t for x in range(3, RAND_VOCAB) for t in (5, x)), 5]  # "c x" for every x: lookup drafts each round
N_SAMPLES = 3000
P_VALUE = 1e-3


def exact_joint(path: Path, prompt: list[int], n: int, parts: list[Path] | None = None) -> dict[tuple, float]:
    """P(first n generated tokens) at temperature 1 without truncation, from the model's logits."""
    with LlamaModel(path, parts=parts) as model, contextlib.closing(
            Context(model, ContextOptions(n_ctx=64, n_threads=1))) as ctx:
        def probs(tokens):
            ctx.clear()
            ctx.decode(tokens, 0)
            z = ctx.logits().astype(np.float64)
            e = np.exp(z - z.max())
            return e / e.sum()

        joint = {(): 1.0}
        for _ in range(n):
            joint = {seq + (t,): pr * p for seq, pr in joint.items() for t, p in enumerate(probs(prompt + list(seq)))}
    return joint


def chi_square(samples: list[tuple], probs: dict[tuple, float]) -> tuple[float, float]:
    """Pearson's statistic of `samples` against exact cell probabilities, and its critical value at
    P_VALUE (Wilson-Hilferty). Cells expected fewer than 5 times are pooled into one."""
    n, counts = len(samples), Counter(samples)
    cells = sorted(probs, key=probs.get)
    pooled, i = 0.0, 0
    while i < len(cells) and (n * probs[cells[i]] < 5 or n * pooled < 5):
        pooled += probs[cells[i]]
        i += 1
    kept = cells[i:]
    stat = sum((counts[c] - n * probs[c]) ** 2 / (n * probs[c]) for c in kept)
    if pooled:  # samples outside the kept cells, impossible ones included
        rest = n - sum(counts[c] for c in kept)
        stat += (rest - n * pooled) ** 2 / (n * pooled)
    df = len(kept) + (1 if pooled else 0) - 1
    z = NormalDist().inv_cdf(1 - P_VALUE)
    return stat, df * (1 - 2 / (9 * df) + z * sqrt(2 / (9 * df))) ** 3


def sample(m, n: int = N_SAMPLES) -> list[tuple]:
    out = [m.generate(RAND_PROMPT, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=3, seed=s,
                      ignore_eos=True) for s in range(n)]
    assert all(len(c.tokens) == 3 for c in out)
    return out


@pytest.fixture(scope="module")
def rand_joint(rand) -> dict[tuple, float]:
    return exact_joint(rand["model"], RAND_PROMPT, 3)


# ---------------------------------------------------------------------------- greedy: EOS


@pytest.mark.parametrize("drafter", ["ee2", "ee3", "lookup", "draft"])
def test_greedy_eos_like_the_full_model(rand, drafter):
    opts = {"ee2": {"early_exit": 2, "draft_threshold": 0.0}, "ee3": {"early_exit": 3, "draft_threshold": 0.0},
            "lookup": {"lookup": True}, "draft": {"draft": rand["draft"], "draft_threshold": 0.0}}[drafter]
    rng = np.random.default_rng(0)
    prompts = [[0, *rng.integers(3, RAND_VOCAB, size=n).tolist()] for n in range(1, 9) for _ in range(5)]
    with edgelm.load(rand["model"], **GEN) as m:
        want = [m.generate(p, temperature=0, max_tokens=12) for p in prompts]
    with edgelm.load(rand["model"], **GEN, **opts) as m:
        got = [m.generate(p, temperature=0, max_tokens=12) for p in prompts]
    for p, w, c in zip(prompts, want, got):
        assert (c.tokens, c.finish_reason) == (w.tokens, w.finish_reason), p
        check_stats(c)
    assert sum(w.finish_reason == "stop" and len(w.tokens) >= 2 for w in want) >= 2  # EOS after some output
    if drafter in ("ee3", "draft"):  # an EOS among accepted drafts ends the run there
        assert any(len(c.tokens) < c.timings.speculative.rounds + c.timings.speculative.accepted for c in got)


# ---------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("sampler", ["plain", "early_exit", "lookup", "draft"])
def test_sampling_keeps_the_full_models_distribution(rand, rand_joint, sampler):
    """Joint distribution of the first three tokens at temperature 1: the first comes from the full
    model, the second and third through the drafter's accept / residual steps (draft_threshold 0)."""
    opts = {"plain": {}, "early_exit": {"early_exit": 2, "draft_threshold": 0.0}, "lookup": {"lookup": True},
            "draft": {"draft": rand["draft"], "draft_threshold": 0.0}}[sampler]
    with edgelm.load(rand["model"], **GEN, **opts) as m:
        out = sample(m)
    samples = [tuple(c.tokens) for c in out]
    stat, limit = chi_square(samples, rand_joint)
    assert stat < limit
    if sampler != "plain":
        drafted = sum(c.timings.speculative.drafted for c in out)
        accepted = sum(c.timings.speculative.accepted for c in out)
        assert 0 < accepted < drafted
    if sampler == "early_exit":
        # the same check rejects the draft's own distribution (what keeping every draft would give)
        p = split_paths(rand["model"], 2)
        stat, limit = chi_square(samples, exact_joint(p.draft, RAND_PROMPT, 3, parts=[p.shared]))
        assert stat > limit


def test_chi_square_rejects_a_wrong_residual(rand, rand_joint, monkeypatch):
    """Power check: on a rejection, drawing from p instead of normalize(max(0, p - q)) favours the drafts."""
    right = native.residual_sample
    monkeypatch.setattr(native, "residual_sample", lambda p, q, u: right(p, np.zeros_like(q), u))
    with edgelm.load(rand["model"], lookup=True, **GEN) as m:
        samples = [tuple(c.tokens) for c in sample(m, 3000)]
    stat, limit = chi_square(samples, rand_joint)
    assert stat > limit
