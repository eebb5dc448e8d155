"""Perplexity from llama.cpp logits agrees with the same definition computed in transformers."""
from __future__ import annotations

import math

import pytest

from edgelm import corpus
from edgelm.errors import UsageError
from edgelm.runtime.perplexity import perplexity

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def reference_perplexity(model, tokens, window, stride):
    """The sliding-window definition, written independently in torch."""
    nll, n, prev_end = 0.0, 0, 1
    for begin in range(0, len(tokens) - 1, stride):
        end = min(begin + window, len(tokens))
        ids = torch.tensor([tokens[begin:end]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        for t in range(max(prev_end, begin + 1), end):
            nll -= logp[t - 1 - begin, tokens[t]].item()
            n += 1
        prev_end = end
        if end == len(tokens):
            break
    return math.exp(nll / n), n


def test_matches_transformers(tiny_model, tiny_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    tokens = tiny_model.tokenize(corpus.text("heldout")[:6000])
    got = perplexity(tiny_model.llama, tokens, window=128, stride=48, n_threads=2)
    want, n = reference_perplexity(hf, tokens, 128, 48)
    assert got.n_scored == n == len(tokens) - 1
    assert got.perplexity == pytest.approx(want, rel=1e-3)


def test_overlapping_windows_score_every_token_with_more_context(tiny_model):
    tokens = tiny_model.tokenize(corpus.text("heldout")[:4000])
    a = perplexity(tiny_model.llama, tokens, window=128, stride=128, n_threads=2)
    b = perplexity(tiny_model.llama, tokens, window=128, stride=32, n_threads=2)
    assert b.n_scored == len(tokens) - 1
    assert a.n_scored == len(tokens) - a.n_windows  # disjoint windows: a window's first token has no context
    assert b.perplexity < a.perplexity  # more context per scored token


@pytest.mark.parametrize("window,stride,tokens,phrase", [
    (1, None, [0, 1, 2], "window"), (64, 100, [0, 1, 2], "stride"), (64, None, [0], "two tokens"),
])
def test_bad_arguments(tiny_model, window, stride, tokens, phrase):
    with pytest.raises(UsageError, match=phrase):
        perplexity(tiny_model.llama, tokens, window=window, stride=stride)
