"""`edgelm serve` as a real server process, driven by the official openai client and raw HTTP."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

import edgelm

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-edgelm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *args: str, env: dict | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "edgelm", "serve", "--port", str(self.port),
                                      "--threads", "2", *args], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()[-3000:]}")
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("server did not come up")

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in httpx.get(self.base + "/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self) -> str:
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err


def assert_cancelled_since(server: ServerProcess, before: float) -> None:
    """Within 10 s the server counts one more cancelled request and has no sequence running."""
    deadline = time.time() + 10
    while time.time() < deadline:
        m = server.metrics()
        if m["edgelm_requests_cancelled_total"] > before and m["edgelm_active_sequences"] == 0:
            break
        time.sleep(0.1)
    assert m["edgelm_requests_cancelled_total"] > before and m["edgelm_active_sequences"] == 0


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--parallel", "2", "--ctx", "2048", "--api-key", KEY, "--max-tokens-cap", "2048")
    yield s
    err = s.stop()
    assert "Traceback" not in err, err[-3000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models_and_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["edgelm-small-q8_0"]
    assert httpx.get(server.base + "/health").json() == {"status": "ok"}  # public even with a key
    assert httpx.get(server.base + "/props").status_code == 401
    props = httpx.get(server.base + "/props", headers={"X-Api-Key": KEY}).json()  # llama-server's shape
    assert props["total_slots"] == 2 and props["default_generation_settings"]["n_ctx"] == 2048
    assert props["chat_template"] and props["default_generation_settings"]["params"]["top_k"] == 40


def test_completion_matches_the_python_api(client):
    with edgelm.load(n_ctx=512, n_threads=2, prefix_cache_bytes=0) as m:
        ref = m.generate("def fibonacci(n):", max_tokens=24, temperature=0)
    out = client.completions.create(model="x", prompt="def fibonacci(n):", max_tokens=24, temperature=0)
    assert out.choices[0].text == ref.text and out.choices[0].finish_reason == ref.finish_reason
    assert out.usage.prompt_tokens == ref.timings.prompt_tokens and out.usage.completion_tokens == len(ref.tokens)
    streamed = client.completions.create(model="x", prompt="def fibonacci(n):", max_tokens=24, temperature=0,
                                         stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason


def test_llama_servers_sampling_fields(client):
    """llama-server's DRY, XTC, mirostat, top-n-sigma and dynamic-temperature fields reach the sampler chain."""
    prompt, dry = "import os\nimport os\nimport", {"dry_multiplier": 0.8, "dry_sequence_breakers": []}
    with edgelm.load(n_ctx=512, n_threads=2, prefix_cache_bytes=0) as m:
        plain = m.generate(prompt, max_tokens=32, temperature=0, ignore_eos=True)
        ref = m.generate(prompt, max_tokens=32, temperature=0, ignore_eos=True, **dry)
    out = client.completions.create(model="x", prompt=prompt, max_tokens=32, temperature=0,
                                    extra_body={"ignore_eos": True, **dry})
    assert out.choices[0].text == ref.text != plain.text
    for fields in ({"mirostat": 2, "mirostat_tau": 3.0, "mirostat_eta": 0.2}, {"xtc_probability": 0.5},
                   {"top_n_sigma": 1.0, "dynatemp_range": 0.3, "dynatemp_exponent": 1.5}):
        out = client.completions.create(model="x", prompt=prompt, max_tokens=8, seed=1, extra_body=fields)
        assert out.usage.completion_tokens >= 1


def test_chat_streaming_with_usage(client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]
    whole = client.chat.completions.create(model="x", messages=messages, max_tokens=16, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="x", messages=messages, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason in ("stop", "length")


def test_logprobs_in_chat_and_completions(client):
    messages = [{"role": "user", "content": "Write a loop."}]
    with edgelm.load(n_ctx=512, n_threads=2, prefix_cache_bytes=0) as m:
        ref = m.chat(messages, max_tokens=8, temperature=0, logprobs=2)
        ref_text = m.generate("def f(x):", max_tokens=8, temperature=0, logprobs=3)
        pieces = [m.llama.token_bytes(t) for t in ref.tokens]
    whole = client.chat.completions.create(model="x", messages=messages, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=2)
    content = whole.choices[0].logprobs.content
    assert [bytes(c.bytes) for c in content] == pieces
    assert [c.logprob for c in content] == pytest.approx([lp.logprob for lp in ref.logprobs], abs=1e-3)
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == c.logprob for c in content)
    stream = client.chat.completions.create(model="x", messages=messages, max_tokens=8, temperature=0,
                                            logprobs=True, stream=True)
    streamed = [c for chunk in stream if chunk.choices and chunk.choices[0].logprobs
                for c in chunk.choices[0].logprobs.content]
    assert [(c.token, c.logprob, c.top_logprobs) for c in streamed] == [(c.token, c.logprob, []) for c in content]

    out = client.completions.create(model="x", prompt="def f(x):", max_tokens=8, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([x.logprob for x in ref_text.logprobs], abs=1e-3)
    assert [len(t) for t in lp.top_logprobs] == [3] * 8
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(8)]
    assert "".join(lp.tokens) == out.choices[0].text == ref_text.text
    plain = client.completions.create(model="x", prompt="def f(x):", max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": 3}, "logprobs"),
    ("/v1/completions", {"logprobs": -1}, "logprobs"),
    ("/v1/completions", {"logprobs": True}, "logprobs"),
])
def test_bad_logprobs_are_400(server, path, body, param):
    body |= {"messages": [{"role": "user", "content": "x"}]} if "chat" in path else {"prompt": "x"}
    r = httpx.post(server.base + path, json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400, r.text
    assert param in r.json()["error"]["message"]


def test_tokenize_and_detokenize(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    text = "def f():\n    return 'café'"
    with edgelm.load(n_ctx=512, n_threads=2, prefix_cache_bytes=0) as m:
        ref = m.llama.tokenize(text, add_special=False, parse_special=True)
        with_bos = m.llama.tokenize(text)
    r = httpx.post(server.base + "/tokenize", json={"content": text}, headers=auth)
    assert r.status_code == 200 and r.json() == {"tokens": ref}
    r = httpx.post(server.base + "/tokenize", json={"content": text, "add_special": True, "with_pieces": True},
                   headers=auth)
    pieces = r.json()["tokens"]
    assert [p["id"] for p in pieces] == with_bos
    assert b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"])
                    for p in pieces[1:]) == text.encode()  # a piece that is not whole characters comes as bytes
    r = httpx.post(server.base + "/detokenize", json={"tokens": ref}, headers=auth)
    assert r.status_code == 200 and r.json() == {"content": text}
    for path, body, param in [("/tokenize", {"content": 3}, "content"), ("/tokenize", {"content": "x",
                              "add_special": "yes"}, "add_special"), ("/detokenize", {"tokens": [1, 10**9]}, "tokens"),
                              ("/detokenize", {"tokens": "abc"}, "tokens"), ("/detokenize", {"tokens": [True]}, "tokens")]:
        r = httpx.post(server.base + path, json=body, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert httpx.post(server.base + "/tokenize", json={"content": text}).status_code == 401


def test_n_choices(client):
    messages = [{"role": "user", "content": "Write a loop."}]
    kw = dict(model="x", messages=messages, max_tokens=12, temperature=0.9, seed=11, n=3, logprobs=True)
    whole = client.chat.completions.create(**kw)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    texts = [c.message.content for c in whole.choices]
    assert len(set(texts)) > 1  # choice i samples with seed + i
    streamed = {}
    for chunk in client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
        usage = chunk.usage or None
    assert [streamed[i] for i in range(3)] == texts
    assert usage.completion_tokens == whole.usage.completion_tokens and usage.prompt_tokens == whole.usage.prompt_tokens
    assert whole.usage.completion_tokens == sum(len(c.logprobs.content) for c in whole.choices)
    greedy = client.completions.create(model="x", prompt="def f(x):", max_tokens=8, temperature=0, n=2)
    assert greedy.choices[0].text == greedy.choices[1].text and greedy.usage.completion_tokens == 16


def test_tool_calls(server, client):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}}}]
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model="x", messages=messages, tools=tools, tool_choice="required", max_tokens=96, temperature=0)
    whole = client.chat.completions.create(**kw)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    deltas = [c.choices[0] for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    assert not any(d.delta.content for d in deltas) and deltas[-1].finish_reason == "tool_calls"
    (streamed,) = [tc for d in deltas for tc in d.delta.tool_calls or []]
    assert (streamed.index, streamed.function.name, streamed.function.arguments) == (
        0, "get_weather", call.function.arguments)
    follow = messages + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                         {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
    reply = client.chat.completions.create(model="x", messages=follow, tools=tools, max_tokens=8, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    for body, param in [({"tools": [{"type": "function"}]}, "tools"), ({"tool_choice": "required"}, "tool_choice"),
                        ({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "x"}}},
                         "tool_choice")]:
        r = httpx.post(server.base + "/v1/chat/completions", json={"messages": messages, **body},
                       headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_cors_only_for_the_origins_given(server):
    pre = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    assert "access-control-allow-origin" not in httpx.options(server.base + "/v1/chat/completions", headers=pre).headers
    cors = ServerProcess("--cors", "http://localhost:3000", "--api-key", KEY)
    try:
        r = httpx.options(cors.base + "/v1/chat/completions", headers=pre)  # the preflight needs no key
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        r = httpx.get(cors.base + "/v1/models", headers={"Origin": "http://localhost:3000",
                                                         "Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        r = httpx.get(cors.base + "/v1/models", headers={"Origin": "http://evil.example"})
        assert r.status_code == 401 and "access-control-allow-origin" not in r.headers
        assert httpx.options(cors.base + "/v1/models", headers={**pre, "Origin": "http://evil.example"}
                             ).status_code == 400
    finally:
        assert "Traceback" not in cors.stop()


def test_reasoning_content(client):
    """A reply that thinks first (forced here by a grammar) has its thinking in reasoning_content, not in content."""
    grammar = r'root ::= "<think>\n" [a-z]{2,6} " " [a-z]{2,6} "\n</think>\n\n" [a-z]{1,8}'
    kw = dict(model="x", messages=[{"role": "user", "content": "Two plus two?"}], max_tokens=48, temperature=0,
              extra_body={"grammar": grammar})
    message = client.chat.completions.create(**kw).choices[0].message
    thinking = message.model_extra["reasoning_content"]
    assert " " in thinking and "<think>" not in message.content and message.content.isalpha()
    deltas = [c.choices[0].delta for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas).strip() == thinking
    assert "".join(d.content or "" for d in deltas) == message.content


def test_chat_template_kwargs(server, client):
    out = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert out.choices[0].finish_reason in ("stop", "length")
    r = httpx.post(server.base + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"tools": 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"


def test_json_response_format(client):
    out = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "A person:"}],
                                         max_tokens=64, temperature=0, response_format={
                                             "type": "json_schema", "json_schema": {"name": "p", "schema": {
                                                 "type": "object", "properties": {"name": {"type": "string"}},
                                                 "required": ["name"]}}})
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].message.content)["name"], str)


def test_embeddings(client):
    out = client.embeddings.create(model="x", input=["def f(): pass", "hello world"])
    assert len(out.data) == 2 and len(out.data[0].embedding) == 256
    assert abs(sum(v * v for v in out.data[0].embedding) - 1.0) < 1e-3


def test_api_key_is_required(server):
    bad = openai.OpenAI(base_url=server.base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.body["code"] == "invalid_api_key"
    r = httpx.post(server.base + "/v1/completions", json={"prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.base + "/v1/models", headers={"X-Api-Key": KEY}).status_code == 200


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 100000}, "max_tokens"),
    ({"prompt": "x", "top_k": -3}, "top_k"),
    ({"prompt": "x", "frobnicate": 1}, "frobnicate"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 17}, "n"),
    ({"prompt": "x", "n": "2"}, "n"),
    ({"prompt": []}, "prompt"),
    ({"prompt": {"a": 1}}, "prompt"),
    ({"prompt": [1, 2, 10**9]}, "token"),
    ({"prompt": "word " * 5000}, "context"),
    ({"prompt": "x", "grammar": "root ::= ("}, "grammar"),
    ({"prompt": "x", "mirostat": 3}, "mirostat"),
    ({"prompt": "x", "dry_sequence_breakers": ["x" * 41]}, "dry_sequence_breakers"),
])
def test_bad_completion_requests_are_400(server, body, field):
    r = httpx.post(server.base + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", "{\"messages\": 5}".encode(),
                                 b'{"messages": [{"role": "user"}]}', b'{"messages": []}'])
def test_bad_chat_requests_are_400(server, raw):
    r = httpx.post(server.base + "/v1/chat/completions", content=raw,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) >= {"message", "type"}


def test_oversized_body_is_413(server):
    r = httpx.post(server.base + "/v1/completions", content=b"x" * (5 << 20),
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413


def test_disconnect_cancels_the_sequence(server):
    before = server.metrics().get("edgelm_requests_cancelled_total", 0)
    with httpx.stream("POST", server.base + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "Once upon a time", "max_tokens": 256, "ignore_eos": True,
                            "stream": True}) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    assert_cancelled_since(server, before)


def test_serve_attention_and_kv_cache_flags():
    """-fa / -ctk / -ctv reach the engine's context; a combination llama.cpp refuses is one line, exit 2."""
    s = ServerProcess("-fa", "on", "-ctk", "q8_0", "-ctv", "q8_0", "--parallel", "2")
    try:
        r = httpx.post(s.base + "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 8,
                                                         "temperature": 0}, timeout=60)
        assert r.status_code == 200 and 0 < r.json()["usage"]["completion_tokens"] <= 8
    finally:
        s.stop()
    bad = subprocess.run([sys.executable, "-m", "edgelm", "serve", "-fa", "off", "-ctv", "q8_0", "--port",
                          str(free_port())], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "needs flash attention" in bad.stderr and "Traceback" not in bad.stderr


def test_metrics_are_prometheus_text(server, client):
    client.completions.create(model="x", prompt="hi", max_tokens=2)
    m = server.metrics()
    assert m["edgelm_requests_completed_total"] >= 1 and m["edgelm_generated_tokens_total"] >= 1
    assert m['edgelm_time_to_first_token_seconds_bucket{le="+Inf"}'] >= 1
    assert "edgelm_queue_length" in m and "edgelm_batch_size" in m and "edgelm_prompt_cache_hits_total" in m
    assert any(k.startswith('edgelm_http_requests_total{endpoint="/v1/completions",status="200"}') for k in m)


def test_full_queue_answers_503_with_retry_after():
    s = ServerProcess("--parallel", "1", "--max-queue", "1", "--ctx", "512")
    try:
        results = []

        def call():
            r = httpx.post(s.base + "/v1/completions", timeout=120,
                           json={"prompt": "Once", "max_tokens": 200, "ignore_eos": True})
            results.append(r)

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in results)
        assert codes.count(200) >= 2 and 503 in codes
        busy = next(r for r in results if r.status_code == 503)
        assert busy.headers["Retry-After"] == "1" and busy.json()["error"]["code"] == "queue_full"
    finally:
        err = s.stop()
    assert "serving edgelm-small-q8_0 on http://127.0.0.1:" in err  # binds this machine only by default


def test_a_non_streaming_client_that_leaves_is_cancelled_too(server):
    before = server.metrics().get("edgelm_requests_cancelled_total", 0)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.base + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   timeout=httpx.Timeout(5, read=0.2),  # leaves long before 2,000 tokens are done
                   json={"prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True, "temperature": 0})
    assert_cancelled_since(server, before)


def test_alias_and_chat_template_file(tiny_gguf, tmp_path):
    """--alias names the model; --chat-template-file replaces the model's template for OpenAI and Ollama chat."""
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>")
    s = ServerProcess(str(tiny_gguf["q8_0"]), "--alias", "my-model", "--chat-template-file", str(template))
    try:
        c = openai.OpenAI(base_url=s.base + "/v1", api_key="none", max_retries=0, timeout=60)
        assert [m.id for m in c.models.list().data] == ["my-model"]
        messages = [{"role": "user", "content": "Say hi"}]
        out = c.chat.completions.create(model="my-model", messages=messages, max_tokens=8, temperature=0)
        assert out.model == "my-model"
        show = httpx.post(s.base + "/api/show", json={"model": "my-model"}).json()
        assert show["template"] == template.read_text()
    finally:
        assert "Traceback" not in s.stop()
    with edgelm.load(tiny_gguf["q8_0"], n_threads=2, chat_template=template.read_text()) as m:
        assert out.choices[0].message.content == m.chat(messages, max_tokens=8, temperature=0).text


def test_a_builtin_chat_template_by_name(tiny_gguf):
    """--chat-template NAME: one of llama.cpp's built-in templates for every chat request; /props and /api/show
    name it."""
    s = ServerProcess(str(tiny_gguf["q8_0"]), "--chat-template", "phi3")
    try:
        assert httpx.get(s.base + "/props").json()["chat_template"] == "phi3"
        assert httpx.post(s.base + "/api/show", json={"model": "x"}).json()["template"] == "phi3"
        messages = [{"role": "user", "content": "Say hi"}]
        body = {"messages": messages, "max_tokens": 8, "temperature": 0}
        reply = httpx.post(s.base + "/v1/chat/completions", json=body, timeout=60).json()
    finally:
        assert "Traceback" not in s.stop()
    with edgelm.load(tiny_gguf["q8_0"], n_threads=2, chat_template="phi3") as m:
        assert m.chat_prompt(messages) == "<|user|>\nSay hi<|end|>\n<|assistant|>\n"
        assert reply["choices"][0]["message"]["content"] == m.chat(messages, max_tokens=8, temperature=0).text
