"""Ollama's REST API on `edgelm serve`, driven by the official `ollama` Python client against a real server."""
from __future__ import annotations

import httpx
import numpy as np
import ollama
import pytest
from test_server import KEY, ServerProcess

import edgelm
from edgelm.runtime.model import default_model_path

PROMPT = "def fibonacci(n):"
GREEDY = {"temperature": 0, "num_predict": 12}


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--parallel", "2", "--ctx", "1024", "--api-key", KEY)
    yield s
    err = s.stop()
    assert "Traceback" not in err, err[-3000:]


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.base, headers={"Authorization": f"Bearer {KEY}"})


@pytest.fixture(scope="module")
def model():
    with edgelm.load(n_ctx=1024, n_threads=2, prefix_cache_bytes=0) as m:
        yield m


def test_model_listing(client):
    (listed,) = client.list().models
    assert listed.model == "edgelm-small-q8_0" and listed.size == default_model_path().stat().st_size
    assert listed.details.format == "gguf" and listed.details.family == "llama"
    assert listed.details.quantization_level == "Q8_0" and listed.details.parameter_size == "17M"
    assert [m.model for m in client.ps().models] == ["edgelm-small-q8_0"]
    shown = client.show("edgelm")
    assert shown.details.family == "llama" and "tools" in shown.capabilities
    assert shown.modelinfo["llama.block_count"] == 16


def test_generate_applies_the_template_and_streams(client, model):
    ref = model.chat([{"role": "user", "content": PROMPT}], temperature=0, max_tokens=12)
    out = client.generate(model="any-name", prompt=PROMPT, options=GREEDY)
    assert out.model == "any-name" and out.done and out.done_reason == "length" and out.eval_count == 12
    assert out.response == ref.text and out.context[-12:] == ref.tokens
    parts = list(client.generate(model="m", prompt=PROMPT, options=GREEDY, stream=True))
    assert "".join(p.response for p in parts) == out.response and [p.done for p in parts].count(True) == 1
    raw = client.generate(model="m", prompt=PROMPT, options=GREEDY, raw=True)
    assert raw.response == model.generate(PROMPT, temperature=0, max_tokens=12).text
    assert client.generate(model="m", prompt="").done_reason == "load"


def test_logprobs_in_generate_and_chat(client, model):
    """Ollama's logprobs (its clients' logprobs / top_logprobs): the model's own, per token, streamed with each
    line's text."""
    ref = model.generate(PROMPT, temperature=0, max_tokens=12, logprobs=3)
    out = client.generate(model="m", prompt=PROMPT, options=GREEDY, raw=True, logprobs=True, top_logprobs=3)
    assert out.response == ref.text and [lp.token for lp in out.logprobs] == [model.detokenize([t]) for t in ref.tokens]
    assert [lp.logprob for lp in out.logprobs] == pytest.approx([lp.logprob for lp in ref.logprobs], abs=1e-3)
    assert all(len(lp.top_logprobs) == 3 and lp.top_logprobs[0].logprob == lp.logprob for lp in out.logprobs)
    parts = list(client.generate(model="m", prompt=PROMPT, options=GREEDY, raw=True, logprobs=True, stream=True))
    streamed = [lp for p in parts for lp in p.logprobs or []]
    assert [(lp.token, lp.logprob) for lp in streamed] == [(lp.token, lp.logprob) for lp in out.logprobs]
    assert all(lp.top_logprobs == [] for lp in streamed)
    assert client.generate(model="m", prompt=PROMPT, options=GREEDY).logprobs is None  # only when asked

    messages = [{"role": "user", "content": "Say hello."}]
    whole = client.chat(model="m", messages=messages, options=GREEDY, logprobs=True, top_logprobs=2)
    assert "".join(lp.token for lp in whole.logprobs) == whole.message.content
    chunks = list(client.chat(model="m", messages=messages, options=GREEDY, logprobs=True, top_logprobs=2,
                              stream=True))
    assert [lp.logprob for c in chunks for lp in c.logprobs or []] == [lp.logprob for lp in whole.logprobs]


def test_chat(client, model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
    ref = model.chat(messages, temperature=0, max_tokens=12)
    out = client.chat(model="m", messages=messages, options=GREEDY)
    assert out.message.role == "assistant" and out.message.content == ref.text and out.eval_count == 12
    parts = list(client.chat(model="m", messages=messages, options=GREEDY, stream=True))
    assert "".join(p.message.content for p in parts) == ref.text and parts[-1].done


def test_a_call_the_model_writes_becomes_tool_calls(client):
    """The format schema makes the model write a Llama 3.x style call, which the reply turns into tool_calls."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"]}}}]
    call = {"type": "object", "properties": {"name": {"const": "get_weather"},
                                             "parameters": tools[0]["function"]["parameters"]},
            "required": ["name", "parameters"]}
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    for stream in (False, True):
        out = client.chat(model="m", messages=messages, tools=tools, format=call, stream=stream,
                          options={"temperature": 0, "num_predict": 64})
        parts = list(out) if stream else [out]
        calls = [c for p in parts for c in p.message.tool_calls or []]
        assert [c.function.name for c in calls] == ["get_weather"], parts
        assert isinstance(calls[0].function.arguments["city"], str)
        assert "".join(p.message.content for p in parts) == ""
    plain = client.chat(model="m", messages=messages, tools=tools, options=GREEDY)
    assert plain.message.tool_calls is None and plain.message.content


def test_embed_matches_the_python_api(client, model):
    out = client.embed(model="m", input=["def f(): pass", "hello world"])
    ref = model.embed(["def f(): pass", "hello world"])
    assert np.allclose(np.array(out.embeddings), ref, atol=1e-5)
    legacy = client.embeddings(model="m", prompt="hello world")
    assert np.allclose(legacy.embedding, ref[1], atol=1e-5)


@pytest.mark.parametrize("call, match", [
    (lambda c: c.generate(model="m", prompt="x", options={"temperature": -1}), "temperature"),
    (lambda c: c.generate(model="m", prompt="x", options={"warp_speed": 9}), "unknown option"),
    (lambda c: c.generate(model="m", prompt="x", options={"mirostat": 3}), "mirostat"),  # applied, so checked
    (lambda c: c.chat(model="m", messages=[{"role": "user", "content": "x", "images": ["aGk="]}]), "images"),
    (lambda c: c.chat(model="m", messages=[{"role": "robot", "content": "x"}]), "role"),
    (lambda c: c.generate(model="m", prompt="x", logprobs=True, top_logprobs=21), "top_logprobs"),
    (lambda c: c.chat(model="m", messages=[{"role": "user", "content": "x"}], top_logprobs=2), "top_logprobs"),
])
def test_bad_requests_are_400_with_ollamas_error_body(client, call, match):
    with pytest.raises(ollama.ResponseError, match=match) as e:
        call(client)
    assert e.value.status_code == 400


def test_bad_raw_requests(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    chat = {"messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 2}}
    assert httpx.post(server.base + "/api/chat", json={**chat, "think": False, "stream": False},
                      headers=auth).status_code == 200
    r = httpx.post(server.base + "/api/chat", json={**chat, "think": "high"}, headers=auth)
    assert r.status_code == 400 and "think" in r.json()["error"]
    for body, match in [({"prompt": "x", "format": "yaml"}, "format"), ({"prompt": 3}, "prompt"),
                        ({"prompt": "x", "context": [1, "a"]}, "context"), ({"prompt": "x", "options": 5}, "options")]:
        r = httpx.post(server.base + "/api/generate", json=body, headers=auth)
        assert r.status_code == 400 and match in r.json()["error"], r.text
    r = httpx.post(server.base + "/api/embed", json={"input": []}, headers=auth)
    assert r.status_code == 400 and "input" in r.json()["error"]


def test_the_api_key_guards_ollamas_routes(server):
    r = httpx.post(server.base + "/api/generate", json={"model": "m", "prompt": "x"})
    assert r.status_code == 401 and "API key" in r.json()["error"]
    assert httpx.get(server.base + "/api/tags", headers={"X-Api-Key": KEY}).status_code == 200


@pytest.fixture(scope="module")
def short():
    """A server whose context is 128 tokens per request."""
    s = ServerProcess("--parallel", "2", "--ctx", "128")
    yield s
    err = s.stop()
    assert "Traceback" not in err, err[-3000:]


def test_a_prompt_longer_than_the_context_is_truncated_unless_asked_not_to(short, model):
    """As in Ollama: a chat loses its oldest turns (never the system message, never the newest), a long prompt its
    oldest tokens (after the BOS); with "truncate": false either is a 400."""
    turns = [{"role": "system", "content": "Be brief."}]
    for i in range(8):
        turns += [{"role": "user", "content": f"Question {i}: what is {i} times three, and why is it so?"},
                  {"role": "assistant", "content": f"It is {3 * i}, because {i} plus {i} plus {i} makes {3 * i}."}]
    turns.append({"role": "user", "content": "And the last one?"})
    body = {"model": "m", "messages": turns, "stream": False, "options": {"temperature": 0, "num_predict": 8}}
    out = httpx.post(short.base + "/api/chat", json=body, timeout=60).json()
    room = 128 - 1 - 8  # the context less the reply's tokens

    def size(messages):
        return len(model.tokenize(model.chat_prompt(messages), parse_special=True))
    # the system message and the newest turns that fit, from a user's turn on
    kept = next(turns[:1] + turns[k:] for k in range(1, len(turns), 2) if size(turns[:1] + turns[k:]) <= room)
    assert 1 < len(kept) < len(turns) and out["prompt_eval_count"] == size(kept)
    ref = model.chat(kept, temperature=0, max_tokens=8)
    assert out["message"]["content"] == ref.text and out["eval_count"] == 8
    r = httpx.post(short.base + "/api/chat", json={**body, "truncate": False}, timeout=60)
    assert r.status_code == 400 and "context" in r.json()["error"]

    long = {"model": "m", "prompt": "word " * 300, "raw": True, "stream": False, "options": {"num_predict": 4}}
    out = httpx.post(short.base + "/api/generate", json=long, timeout=60).json()
    tokens = model.tokenize("word " * 300)
    assert out["context"][:-4] == tokens[:1] + tokens[len(tokens) - 122:]  # BOS and the newest, room for 4 more
    r = httpx.post(short.base + "/api/generate", json={**long, "truncate": False}, timeout=60)
    assert r.status_code == 400 and "does not fit" in r.json()["error"]
    for bad in ({"truncate": "yes"}, {"shift": 1}, {"options": {"num_keep": -2}}):
        r = httpx.post(short.base + "/api/generate", json={**long, **bad}, timeout=60)
        assert r.status_code == 400 and "must be" in r.json()["error"], r.text


def test_embed_truncates_a_long_input_unless_asked_not_to(short):
    """As Ollama's /api/embed: a text longer than the context is embedded by its first tokens."""
    head = "def main():\n    return 1\n" * 40  # longer than the 128-token context alone
    body = {"model": "m", "input": [head + "one tail", head + "another, quite different, tail"]}
    first, second = httpx.post(short.base + "/api/embed", json=body, timeout=60).json()["embeddings"]
    assert first == second and len(first) > 0
    r = httpx.post(short.base + "/api/embed", json={**body, "truncate": False}, timeout=60)
    assert r.status_code == 400 and "tokens" in r.json()["error"]


def test_a_generation_shifts_the_context_unless_asked_not_to(short):
    """Ollama's API shifts the context at its end by default ("shift": false ends there, with done_reason
    "length"); OpenAI's routes shift only with `edgelm serve --context-shift`, as llama-server's do."""
    body = {"model": "m", "prompt": "def main():\n", "raw": True, "stream": False,
            "options": {"temperature": 0, "num_predict": 300}}
    before = short.metrics()["edgelm_context_shifts_total"]
    out = httpx.post(short.base + "/api/generate", json=body, timeout=120).json()
    assert out["done_reason"] == "length" and out["eval_count"] == 300
    assert short.metrics()["edgelm_context_shifts_total"] >= before + 3
    out = httpx.post(short.base + "/api/generate", json={**body, "shift": False}, timeout=60).json()
    assert out["done_reason"] == "length" and out["eval_count"] == 128 - out["prompt_eval_count"]
    openai = {"model": "m", "prompt": "def main():\n", "max_tokens": 300, "temperature": 0, "ignore_eos": True}
    r = httpx.post(short.base + "/v1/completions", json=openai, timeout=60).json()
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] < 128
    shifting = ServerProcess("--parallel", "1", "--ctx", "128", "--context-shift", "--keep", "-1")
    try:
        r = httpx.post(shifting.base + "/v1/completions", json=openai, timeout=120).json()
        assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 300
    finally:
        assert "Traceback" not in shifting.stop()
