"""The response cache: exact answers for deterministic requests, TTL, size bound, semantic mode."""
from __future__ import annotations

import pytest

import edgelm
from edgelm.cache.response import CachedResponse, ResponseCache
from edgelm.errors import UsageError
from edgelm.runtime.sampling import SamplingParams

PROMPT = "The little robot walked into the garden and"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def model():
    with edgelm.load(n_ctx=512, n_threads=2, response_cache=True) as m:
        yield m


def test_greedy_repeat_is_answered_from_the_cache(model):
    model.response_cache.clear()
    first = model.generate(PROMPT, max_tokens=12, temperature=0)
    second = model.generate(PROMPT, max_tokens=12, temperature=0)
    assert first.timings.response_cache is None and second.timings.response_cache == "exact"
    assert (second.text, second.tokens, second.finish_reason) == (first.text, first.tokens, first.finish_reason)
    streamed = list(model.stream(PROMPT, max_tokens=12, temperature=0))
    assert "".join(c.text for c in streamed) == first.text and streamed[-1].finish_reason == first.finish_reason


def test_parameters_are_part_of_the_key(model):
    model.response_cache.clear()
    model.generate(PROMPT, max_tokens=12, temperature=0)
    assert model.generate(PROMPT, max_tokens=11, temperature=0).timings.response_cache is None
    assert model.generate(PROMPT, max_tokens=12, temperature=0, stop=["zz"]).timings.response_cache is None
    assert model.generate(PROMPT + " then", max_tokens=12, temperature=0).timings.response_cache is None


def test_sampled_requests_are_cached_only_with_a_fixed_seed(model):
    model.response_cache.clear()
    model.generate(PROMPT, max_tokens=8, temperature=0.9)
    assert model.generate(PROMPT, max_tokens=8, temperature=0.9).timings.response_cache is None
    a = model.generate(PROMPT, max_tokens=8, temperature=0.9, seed=7)
    b = model.generate(PROMPT, max_tokens=8, temperature=0.9, seed=7)
    assert b.timings.response_cache == "exact" and a.text == b.text
    assert model.generate(PROMPT, max_tokens=8, temperature=0.9, seed=8).timings.response_cache is None


def test_chat_replies_are_cached(model):
    model.response_cache.clear()
    messages = [{"role": "user", "content": "Say something about cats."}]
    first = model.chat(messages, max_tokens=10, temperature=0)
    again = model.chat(messages, max_tokens=10, temperature=0)
    assert again.timings.response_cache == "exact" and again.text == first.text


def _params(**kw) -> SamplingParams:
    return SamplingParams.from_kwargs(**{"temperature": 0, **kw})


def test_ttl_and_size_bound():
    clock = Clock()
    rc = ResponseCache(max_entries=2, ttl=10, clock=clock)
    p = _params()
    for i in range(3):
        rc.put("model", [1, i], p, CachedResponse(f"answer {i}", (i,), "stop"))
    assert len(rc) == 2 and rc.get("model", [1, 0], p) is None  # the oldest went
    assert rc.get("model", [1, 2], p)[0].text == "answer 2"
    clock.now += 10.5
    assert rc.get("model", [1, 2], p) is None and len(rc) == 0
    assert rc.get("other-model", [1, 2], p) is None


def test_semantic_mode_answers_close_prompts_only_when_greedy():
    vectors = {"What is the capital of France?": [1.0, 0.0, 0.0], "what's the capital of france": [0.98, 0.2, 0.0],
               "How do I bake bread?": [0.0, 1.0, 0.0]}
    rc = ResponseCache(semantic_threshold=0.95, embed=lambda texts: [vectors[t] for t in texts])
    greedy = _params()
    rc.put("m", [1], greedy, CachedResponse("Paris", (5,), "stop"), text="What is the capital of France?")
    hit = rc.get("m", [2], greedy, text="what's the capital of france")
    assert hit is not None and hit[0].text == "Paris" and hit[1] == "semantic"
    assert rc.get("m", [3], greedy, text="How do I bake bread?") is None
    assert rc.get("m", [2], _params(max_tokens=5), text="what's the capital of france") is None  # other params
    sampled = _params(temperature=0.7, seed=1)
    rc.put("m", [1], sampled, CachedResponse("Lyon", (6,), "stop"), text="What is the capital of France?")
    assert rc.get("m", [2], sampled, text="what's the capital of france") is None


def test_semantic_mode_with_the_models_own_embeddings():
    cache = ResponseCache(semantic_threshold=0.98)
    with edgelm.load(n_ctx=512, n_threads=2, response_cache=cache) as m:
        first = m.generate("The cat sat on the mat.", max_tokens=8, temperature=0)
        close = m.generate("The cat sat on the mat", max_tokens=8, temperature=0)
        far = m.generate("def add(a, b): return a + b", max_tokens=8, temperature=0)
    assert close.timings.response_cache == "semantic" and close.text == first.text
    assert far.timings.response_cache is None


@pytest.mark.parametrize("kw, field", [({"max_entries": 0}, "max_entries"), ({"ttl": -1}, "ttl"),
                                       ({"ttl": float("nan")}, "ttl"), ({"semantic_threshold": 1.5}, "semantic")])
def test_bad_settings_are_clear_errors(kw, field):
    with pytest.raises(UsageError, match=field):
        ResponseCache(**kw)


def test_response_cache_option_is_checked():
    with pytest.raises(UsageError, match="response_cache"):
        edgelm.load(n_ctx=256, response_cache="yes")
