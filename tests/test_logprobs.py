"""Token logprobs (OpenAI's `logprobs`): the model's own log-softmax at each generated position, checked against
an independent evaluation of the same tokens, through the single-sequence path and the batching engine."""
from __future__ import annotations

import math

import numpy as np
import pytest

import edgelm
from edgelm.runtime.context import Context, ContextOptions
from edgelm.runtime.logprobs import token_logprob

PROMPT = "def fibonacci(n):"


def reference_logprobs(model, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """log-softmax rows, in float64, of a fresh context that evaluates prompt + tokens in one batch: row i is the
    distribution tokens[i] was drawn from."""
    ctx = Context(model.llama, ContextOptions(n_ctx=512, n_batch=512, n_threads=2))
    try:
        ctx.decode(prompt + tokens, 0, logits_from=len(prompt) - 1)
        rows = ctx.all_logits(len(tokens) + 1)[:len(tokens)].astype(np.float64)
    finally:
        ctx.close()
    top = rows.max(axis=1, keepdims=True)
    return rows - top - np.log(np.exp(rows - top).sum(axis=1, keepdims=True))


@pytest.fixture(scope="module")
def model():
    with edgelm.load(n_ctx=512, n_threads=2, prefix_cache_bytes=0) as m:
        yield m


def test_token_logprob_of_a_row():
    row = np.array([1.0, 3.0, 3.0, -np.inf, 0.5], dtype=np.float32)
    lp = token_logprob(row, 4, n_top=3)
    z = math.log(math.exp(1) + 2 * math.exp(3) + math.exp(0.5))
    assert lp.token == 4 and lp.logprob == pytest.approx(0.5 - z, abs=1e-6)
    assert [t for t, _ in lp.top] == [1, 2, 0]  # most likely first, equal logits by id
    assert [v for _, v in lp.top] == pytest.approx([3 - z, 3 - z, 1 - z], abs=1e-6)
    assert token_logprob(row, 3).logprob == -math.inf and token_logprob(row, 3).top == ()
    assert token_logprob(row, 0, n_top=5).top[-1] == (3, -math.inf)


def test_greedy_logprobs_are_the_models_distribution(model):
    out = model.generate(PROMPT, max_tokens=16, temperature=0, logprobs=3)
    assert len(out.logprobs) == len(out.tokens) == 16
    ref = reference_logprobs(model, model.tokenize(PROMPT), out.tokens)
    for i, (token, lp) in enumerate(zip(out.tokens, out.logprobs)):
        assert lp.token == token and len(lp.top) == 3
        assert lp.top[0] == (token, lp.logprob)  # greedy: the chosen token is the most likely one
        assert lp.logprob == pytest.approx(ref[i, token], abs=1e-4)
        assert [v for _, v in lp.top] == pytest.approx(np.sort(ref[i])[::-1][:3], abs=1e-4)
    assert model.generate(PROMPT, max_tokens=16, temperature=0).logprobs is None  # only when asked


def test_sampled_logprobs_leave_the_sampling_alone(model):
    kw = dict(max_tokens=12, temperature=1.2, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    plain = model.generate(PROMPT, **kw)
    out = model.generate(PROMPT, logprobs=0, **kw)
    assert out.tokens == plain.tokens and all(lp.top == () for lp in out.logprobs)
    ref = reference_logprobs(model, model.tokenize(PROMPT), out.tokens)
    assert [lp.logprob for lp in out.logprobs] == pytest.approx([ref[i, t] for i, t in enumerate(out.tokens)],
                                                                abs=1e-4)
    assert any(ref[i, t] < ref[i].max() for i, t in enumerate(out.tokens))  # the raw distribution, not the argmax


def test_streamed_chunks_carry_their_tokens_logprobs(model):
    whole = model.generate(PROMPT, max_tokens=10, temperature=0, logprobs=1, stop=["\n\n"])
    chunks = list(model.stream(PROMPT, max_tokens=10, temperature=0, logprobs=1, stop=["\n\n"]))
    assert all(len(c.logprobs) == len(c.tokens) for c in chunks)
    assert [lp for c in chunks for lp in c.logprobs] == whole.logprobs


def test_batched_logprobs_match_single_sequences(model):
    prompts = [PROMPT, "import os\n", "class Stack:"]
    batch = model.generate_batch(prompts, n_parallel=3, max_tokens=8, temperature=0, logprobs=2)
    for prompt, out in zip(prompts, batch):
        alone = model.generate(prompt, max_tokens=8, temperature=0, logprobs=2)
        assert out.tokens == alone.tokens and len(out.logprobs) == len(out.tokens)
        for a, b in zip(out.logprobs, alone.logprobs):  # batched kernels may round differently in the last bits
            assert a.token == b.token and a.logprob == pytest.approx(b.logprob, abs=1e-3)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_the_response_cache_does_not_answer_a_logprobs_request():
    with edgelm.load(n_ctx=512, n_threads=2, prefix_cache_bytes=0, response_cache=True) as m:
        first = m.generate(PROMPT, max_tokens=4, temperature=0, logprobs=1)
        again = m.generate(PROMPT, max_tokens=4, temperature=0, logprobs=1)
        assert again.timings.response_cache is None and again.logprobs == first.logprobs
        m.generate(PROMPT, max_tokens=4, temperature=0)
        assert m.generate(PROMPT, max_tokens=4, temperature=0).timings.response_cache == "exact"


@pytest.mark.parametrize("speculative", [{"lookup": True}, {"early_exit": True}])
def test_speculative_decoding_reports_the_verifiers_logprobs(model, speculative):
    """Drafted and verified tokens get the logprobs of the verifier's row that chose them: the full model's."""
    prompt = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n" * 2
    plain = model.generate(prompt, max_tokens=24, temperature=0, logprobs=2)
    with edgelm.load(n_ctx=512, n_threads=2, prefix_cache_bytes=0, draft_threshold=0.0, **speculative) as m:
        out = m.generate(prompt, max_tokens=24, temperature=0, logprobs=2)
        assert out.timings.speculative.accepted > 0  # some tokens came from accepted drafts
        chunks = list(m.stream(prompt, max_tokens=24, temperature=0, logprobs=2))
    assert out.tokens == plain.tokens and [lp.token for lp in out.logprobs] == out.tokens
    for a, b in zip(out.logprobs, plain.logprobs):  # verify batches round differently from one-token steps
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3) and [t for t, _ in a.top] == [t for t, _ in b.top]
    assert [lp for c in chunks for lp in c.logprobs] == out.logprobs
