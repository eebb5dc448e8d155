"""OpenAI's legacy /v1/completions as evaluation harnesses use it (lm-evaluation-harness's local-completions):
several prompts in one request, and `echo` with `logprobs`, the prompt's own token log-probabilities."""
from __future__ import annotations

import json

import httpx
import numpy as np
from test_server import KEY, client, server  # noqa: F401 (fixtures: a server with an API key, its OpenAI client)

import edgelm

H = {"Authorization": f"Bearer {KEY}"}
TEXTS = ["The quick brown fox jumps over the lazy dog because it was", "def fibonacci(n):\n    if n < 2:\n"]


def test_several_prompts_are_a_choice_each(client):
    one = [client.completions.create(model="x", prompt=t, max_tokens=6, temperature=0) for t in TEXTS]
    both = client.completions.create(model="x", prompt=TEXTS, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices] == [one[0].choices[0].text] * 2 + [one[1].choices[0].text] * 2
    assert both.usage.prompt_tokens == sum(o.usage.prompt_tokens for o in one)


def test_echo_scores_the_prompt_as_lm_eval_reads_it(server, client):
    with edgelm.load(n_ctx=512, n_threads=2) as m:
        prompts = [m.tokenize(t) for t in TEXTS]  # token ids (BOS first), as lm-eval sends them
        nll = [m.perplexity(t, window=256) for t in TEXTS]  # an independent sum of the same log-probabilities
    out = client.completions.create(model="x", prompt=prompts, max_tokens=1, temperature=0, logprobs=1, echo=True,
                                    seed=1234)
    for choice, tokens, text, result in zip(out.choices, prompts, TEXTS, nll):
        lp = choice.logprobs
        assert len(lp.tokens) == len(tokens) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert choice.text.startswith(text) and "".join(lp.tokens) == choice.text
        assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
        # perplexity() scores the same tokens after the first, in one window: the sums agree
        scored = np.array(lp.token_logprobs[1:len(tokens)], dtype=np.float64)
        assert result.n_scored == len(tokens) - 1 and result.n_windows == 1
        assert np.isclose(scored.sum(), -result.nll * result.n_scored, rtol=1e-4)
        # lm-eval's parse: a continuation is greedy when each token's logprob is the best of its top_logprobs
        for value, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
            assert len(top) == 1 and max(top.values()) >= value - 1e-5
        plain = client.completions.create(model="x", prompt=tokens, max_tokens=1, temperature=0, logprobs=1)
        assert choice.text == text + plain.choices[0].text
        assert np.isclose(lp.token_logprobs[-1], plain.choices[0].logprobs.token_logprobs[0], atol=1e-4)
    # max_tokens 0: the prompt alone, scored
    only = client.completions.create(model="x", prompt=prompts[0], max_tokens=0, logprobs=0, echo=True)
    assert only.choices[0].text == TEXTS[0] and only.usage.completion_tokens == 0
    assert only.choices[0].logprobs.top_logprobs is None
    assert np.allclose(only.choices[0].logprobs.token_logprobs[1:], out.choices[0].logprobs.token_logprobs[1:-1],
                       atol=1e-4)
    # streamed: the prompt first, then the reply
    with httpx.stream("POST", server.base + "/v1/completions", headers=H, timeout=60, json={
            "model": "x", "prompt": TEXTS[1], "max_tokens": 4, "temperature": 0, "echo": True, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events[0]["choices"][0]["text"] == TEXTS[1]
    assert "".join(e["choices"][0]["text"] for e in events) == TEXTS[1] + client.completions.create(
        model="x", prompt=TEXTS[1], max_tokens=4, temperature=0).choices[0].text
    for body, param in (({"messages": [{"role": "user", "content": "hi"}], "echo": True}, "echo"),):
        r = httpx.post(server.base + "/v1/chat/completions", json=body, headers=H)
        assert r.status_code == 400 and r.json()["error"]["param"] == param
    r = httpx.post(server.base + "/v1/completions", json={"prompt": "x", "best_of": 2}, headers=H)
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"
