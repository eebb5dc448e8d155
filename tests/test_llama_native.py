"""llama-server's native API on `edgelm serve`: /completion, /infill, /embedding, /apply-template, in llama-server's
shapes, against the Python API's replies and against token layouts the tests build themselves."""
from __future__ import annotations

import json
import math

import httpx
import numpy as np
import pytest
from conftest import FIM_TOKENS, fim_checkpoint
from test_server import KEY, ServerProcess, client, server  # noqa: F401 (fixtures: a server with an API key)

import edgelm

H = {"Authorization": f"Bearer {KEY}"}
PROMPT = "def fibonacci(n):"


def post(server, path: str, body: dict, status: int = 200):
    r = httpx.post(server.base + path, json=body, headers=H, timeout=120)
    assert r.status_code == status, r.text
    return r.json()


def events(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", server.base + path, json={**body, "stream": True}, headers=H, timeout=120) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and "data: [DONE]" not in lines  # llama-server's
    return [json.loads(line[6:]) for line in lines]


@pytest.fixture(scope="module")
def reference():
    with edgelm.load(n_ctx=512, n_threads=2, prefix_cache_bytes=0) as m:
        yield m


def test_completion_is_the_python_apis_reply(server, reference):
    ref = reference.generate(PROMPT, max_tokens=24, temperature=0, logprobs=3)
    body = {"prompt": PROMPT, "n_predict": 24, "temperature": 0, "n_probs": 3, "return_tokens": True}
    out = post(server, "/completion", body)
    assert out["content"] == ref.text and out["tokens"] == ref.tokens and out["stop"] is True
    assert out["tokens_predicted"] == len(ref.tokens) and out["tokens_evaluated"] == ref.timings.prompt_tokens
    assert out["stop_type"] == ("limit" if ref.finish_reason == "length" else "eos") and out["stopping_word"] == ""
    assert out["truncated"] is False and out["model"] == "edgelm-small-q8_0" and out["id_slot"] in (0, 1)
    assert out["prompt"] == reference.llama.detokenize(reference.tokenize(PROMPT), special=True)
    settings = out["generation_settings"]
    assert (settings["n_predict"], settings["temperature"], settings["n_ctx"], settings["top_k"]) == (24, 0, 2048, 40)
    assert out["timings"]["predicted_n"] == len(ref.tokens) and out["timings"]["prompt_n"] >= 0
    probs = out["completion_probabilities"]
    assert [p["id"] for p in probs] == ref.tokens and all(len(p["top_logprobs"]) == 3 for p in probs)
    assert np.allclose([p["logprob"] for p in probs], [lp.logprob for lp in ref.logprobs], atol=1e-3)
    assert all(p["top_logprobs"][0]["id"] == p["id"] for p in probs)  # greedy: each token is the likeliest
    assert "".join(bytes(p["bytes"]).decode("utf-8", "replace") for p in probs) == ref.text
    assert post(server, "/completions", body)["content"] == ref.text  # llama-server's other name for it

    streamed = events(server, "/completion", body)
    assert all(e["stop"] is False for e in streamed[:-1]) and streamed[-1]["stop"] is True
    assert "".join(e["content"] for e in streamed) == ref.text
    assert [t for e in streamed[:-1] for t in e["tokens"]] == ref.tokens
    assert [p["id"] for e in streamed[:-1] for p in e["completion_probabilities"]] == ref.tokens
    assert streamed[-1]["stop_type"] == out["stop_type"] and streamed[-1]["tokens_predicted"] == len(ref.tokens)
    assert "completion_probabilities" not in streamed[-1] and "timings" not in streamed[0]
    timed = events(server, "/completion", {**body, "timings_per_token": True})
    assert all("timings" in e for e in timed)


def test_prompt_shapes(server, reference):
    tokens = reference.tokenize(PROMPT)
    body = {"n_predict": 8, "temperature": 0}
    text = post(server, "/completion", {**body, "prompt": PROMPT})
    assert post(server, "/completion", {**body, "prompt": tokens})["content"] == text["content"]
    # ids and texts mixed: one prompt, only a leading text gets BOS, special tokens in texts are parsed
    mixed = post(server, "/completion", {**body, "prompt": [tokens[0], "def", " fib<|im_end|>"], "return_tokens": True})
    assert mixed["tokens_evaluated"] == 1 + len(reference.tokenize("def", add_special=False)) + len(
        reference.tokenize(" fib<|im_end|>", add_special=False, parse_special=True))
    # several prompts: a reply each, in order, each the prompt's own reply
    other = "class Stack:"
    several = post(server, "/completion", {**body, "prompt": [PROMPT, other]})
    assert [r["index"] for r in several] == [0, 1] and several[0]["content"] == text["content"]
    assert several[1]["content"] == post(server, "/completion", {**body, "prompt": other})["content"]
    # n_cmpl: completions of one prompt, choice i sampling with seed + i as /v1/completions' n
    two = post(server, "/completion", {"prompt": PROMPT, "n_predict": 8, "seed": 7, "n_cmpl": 2})
    ref = [reference.generate(PROMPT, max_tokens=8, seed=seed).text for seed in (7, 8)]
    assert [r["content"] for r in two] == ref


def test_stop_types_and_logit_bias(server, reference):
    full = reference.generate(PROMPT, max_tokens=32, temperature=0, ignore_eos=True)
    word = full.text.strip().split()[3]
    out = post(server, "/completion", {"prompt": PROMPT, "n_predict": 32, "temperature": 0, "stop": [word],
                                       "ignore_eos": True})
    assert (out["stop_type"], out["stopping_word"]) == ("word", word)
    assert out["content"] == full.text[:full.text.index(word)]
    # n_predict 0: the prompt evaluated, nothing generated (the engine used to sample one token)
    out = post(server, "/completion", {"prompt": PROMPT, "n_predict": 0})
    assert (out["content"], out["tokens_predicted"], out["stop_type"]) == ("", 0, "limit")
    eos = reference.llama.eos
    out = post(server, "/completion", {"prompt": PROMPT, "n_predict": 8, "temperature": 0,
                                       "logit_bias": [[eos, 1000]]})
    assert (out["stop_type"], out["content"]) == ("eos", "")
    # a text's tokens, banned with false, as {token: bias} or [[token, bias]]
    banned = reference.tokenize(word, add_special=False)
    ref = reference.generate(PROMPT, max_tokens=32, temperature=0, ignore_eos=True,
                             logit_bias={t: -math.inf for t in banned})
    for bias in ([[word, False]], {str(banned[0]): False, **{str(t): False for t in banned}}):
        out = post(server, "/completion", {"prompt": PROMPT, "n_predict": 32, "temperature": 0, "ignore_eos": True,
                                           "logit_bias": bias, "return_tokens": True})
        assert out["content"] == ref.text != full.text and not set(out["tokens"]) & set(banned)
        assert {b["token"] for b in out["generation_settings"]["logit_bias"]} == set(banned)


def test_samplers_pick_the_chain(server, reference):
    """llama-server's `samplers`: those named run, in that order; one left out is off whatever its value."""
    kw = dict(max_tokens=16, seed=3, ignore_eos=True)
    ref = reference.generate(PROMPT, top_k=0, top_p=1.0, min_p=0.0, temperature=0.7, **kw)
    named = reference.generate(PROMPT, top_k=5, top_p=0.3, min_p=0.2, temperature=0.7, samplers=["temperature"],
                               **kw)
    assert named.text == ref.text
    assert reference.generate(PROMPT, top_k=5, top_p=0.3, temperature=0.7, **kw).text != ref.text
    out = post(server, "/completion", {"prompt": PROMPT, "n_predict": 16, "seed": 3, "ignore_eos": True,
                                       "top_k": 5, "top_p": 0.3, "min_p": 0.2, "temperature": 0.7,
                                       "samplers": ["temperature"]})
    assert out["content"] == ref.text and out["generation_settings"]["samplers"] == ["temperature"]
    # without temperature in the chain the draw is at 1, as llama.cpp's
    assert reference.generate(PROMPT, temperature=0.0, samplers=["top_k"], top_k=0, **kw).text == \
        reference.generate(PROMPT, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, **kw).text
    for bad in (["bogus"], ["top_k", "penalties"], ["top_k", "top_k"], "top_k;x"):
        post(server, "/completion", {"prompt": PROMPT, "samplers": bad}, status=400)


def first_short_line(text: str, n_indent: int) -> int | None:
    """Where llama-server's n_indent ends `text`: the first character of the first line after the first whose
    indentation is below n_indent."""
    lines = text.split("\n")
    pos = len(lines[0]) + 1
    for line in lines[1:]:
        stripped = line.lstrip(" \t")
        if stripped and len(line) - len(stripped) < n_indent:
            return pos + len(line) - len(stripped)
        pos += len(line) + 1
    return None


def test_n_indent_and_response_fields(server, reference):
    prompt = "class A:\n    def f(self):\n        return 1\n\n    def g(self):\n        "
    full = reference.generate(prompt, max_tokens=96, temperature=0, ignore_eos=True).text
    cut = first_short_line(full, 8)
    assert cut is not None  # the reply has a line less indented than 8 after its first: a method's "def"
    body = {"prompt": prompt, "n_predict": 96, "temperature": 0, "ignore_eos": True, "n_indent": 8}
    out = post(server, "/completion", body)
    assert out["content"] == full[:cut] and out["stop_type"] == "limit" and out["has_new_line"] is True
    assert "".join(e["content"] for e in events(server, "/completion", body)) == full[:cut]
    assert first_short_line(full, 1) is None or post(server, "/completion", {**body, "n_indent": 1})["content"] == \
        full[:first_short_line(full, 1)]
    picked = post(server, "/completion", {**body, "response_fields": ["content", "timings/predicted_n", "nothing",
                                                                      "generation_settings/n_predict"]})
    assert picked == {"content": full[:cut], "timings/predicted_n": picked["timings/predicted_n"],
                      "generation_settings/n_predict": 96}
    # a time limit ends the reply at a newline once it has passed
    out = post(server, "/completion", {**body, "n_indent": 0, "t_max_predict_ms": 1})
    assert out["stop_type"] == "limit" and "\n" in out["content"] and full.startswith(out["content"])
    assert len(out["content"]) < len(full)


def test_embedding_and_apply_template(server, client, reference):
    vec = np.array(client.embeddings.create(model="x", input="hello there").data[0].embedding)
    out = post(server, "/embedding", {"content": "hello there"})
    assert [o["index"] for o in out] == [0] and np.allclose(out[0]["embedding"][0], vec, atol=1e-5)
    raw = np.array(post(server, "/embeddings", {"input": ["hello there"], "embd_normalize": -1})[0]["embedding"][0])
    assert np.allclose(raw / np.linalg.norm(raw), vec, atol=1e-5) and not np.isclose(np.linalg.norm(raw), 1.0)
    taxicab = np.array(post(server, "/embedding", {"content": "hello there", "embd_normalize": 1})[0]["embedding"][0])
    assert np.isclose(np.abs(taxicab).sum(), 1.0, atol=1e-4)
    post(server, "/embedding", {"content": ""}, status=400)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    prompt = post(server, "/apply-template", {"messages": messages})["prompt"]
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    post(server, "/apply-template", {"messages": [{"role": "user"}]}, status=400)


@pytest.mark.parametrize("body, param", [
    ({"prompt": PROMPT, "bogus": 1}, "bogus"), ({"prompt": PROMPT, "n_predict": -2}, "n_predict"),
    ({"prompt": PROMPT, "n_probs": 21}, "n_probs"), ({"prompt": PROMPT, "id_slot": 9}, "id_slot"),
    ({"prompt": PROMPT, "post_sampling_probs": True}, "post_sampling_probs"),
    ({"prompt": PROMPT, "lora": [{"id": 0, "scale": 0.5}]}, "lora"),
    ({"prompt": PROMPT, "logit_bias": 3}, "logit_bias"),
    ({"prompt": {"x": 1}}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": [10**9]}, "prompt"), ({}, "prompt"),
    ({"prompt": PROMPT, "n_predict": 5000}, "n_predict"), ({"prompt": PROMPT, "n_indent": -1}, "n_indent"),
    ({"prompt": PROMPT, "stream": "yes"}, "stream"),
    ({"prompt": PROMPT, "response_fields": "content"}, "response_fields"),
])
def test_bad_requests_are_400(server, body, param):
    out = post(server, "/completion", body, status=400)
    assert out["error"]["param"] in (param, None) and out["error"]["message"]


def test_slots(server):
    """llama-server's /slots: each slot's last request, and a 503 with ?fail_on_no_slot=1 while all are busy."""
    out = post(server, "/completion", {"prompt": "def slots_test():", "n_predict": 6, "temperature": 0})
    slots = httpx.get(server.base + "/slots", headers=H).json()
    assert [s["id"] for s in slots] == [0, 1] and not any(s["is_processing"] for s in slots)
    mine = next(s for s in slots if s.get("id_task") is not None and s["prompt"].endswith("def slots_test():"))
    assert mine["id"] == out["id_slot"] and mine["generated"] == out["content"]
    assert mine["next_token"][0]["n_decoded"] == out["tokens_predicted"] and mine["params"]["n_predict"] == 6
    assert httpx.get(server.base + "/slots?fail_on_no_slot=1", headers=H).status_code == 200
    body = {"prompt": "Once upon a time", "n_predict": 2000, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=120, headers=H) as c, c.stream("POST", server.base + "/completion", json=body) as a, \
            c.stream("POST", server.base + "/completion", json=body) as b:
        lines = [r.iter_lines() for r in (a, b)]  # kept: a dropped iterator closes its connection
        for it in lines:
            next(it)  # both are generating
        busy = httpx.get(server.base + "/slots?fail_on_no_slot=1", headers=H)
        assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
        assert all(s["is_processing"] for s in httpx.get(server.base + "/slots", headers=H).json())


def test_the_native_routes_need_the_key(server):
    for path in ("/completion", "/completions", "/infill", "/embedding", "/apply-template", "/chat/completions"):
        assert httpx.post(server.base + path, json={}).status_code == 401
    assert httpx.get(server.base + "/slots").status_code == 401
    assert httpx.get(server.base + "/v1/health").json() == {"status": "ok"}  # public, as /health
    with edgelm.load(n_ctx=256, n_threads=2) as m, pytest.raises(edgelm.EdgelmError, match="no FIM prefix"):
        m.infill("a", "b")
    refused = post(server, "/infill", {"input_prefix": "a", "input_suffix": "b"}, status=400)
    assert refused["error"]["message"].startswith("Infill is not supported by this model")


# ---------------------------------------------------------------------------- /infill on a model with FIM tokens


@pytest.fixture(scope="module")
def fim_server(tmp_path_factory):
    """A server of the tiny model with FIM tokens (conftest.fim_checkpoint), converted by edgelm."""
    from edgelm.converters import convert

    d = tmp_path_factory.mktemp("fim")
    gguf = convert(fim_checkpoint(d / "ckpt"), d / "fim.gguf", outtype="f32").path
    s = ServerProcess(str(gguf), "--parallel", "1", "--ctx", "256", "--batch", "64", "--api-key", KEY)
    s.gguf = gguf
    yield s, 8192
    assert "Traceback" not in s.stop()


def test_infill_lays_out_the_fim_prompt(fim_server):
    server, first = fim_server
    pre, suf, mid, _, repo, sep = range(first, first + len(FIM_TOKENS))

    def tok(text: str) -> list[int]:
        return post(server, "/tokenize", {"content": text, "parse_special": False})["tokens"]

    prefix = "def total(values):\n" + "".join(f"    x{i} = values[{i}]\n" for i in range(12))
    suffix = "    return result\n" * 6
    extra = [{"filename": "util.py", "text": "def helper():\n    pass\n"}, {"text": "import os\n"}]
    body = {"input_prefix": prefix, "input_suffix": suffix, "input_extra": extra, "prompt": "    ",
            "n_predict": 8, "temperature": 0, "return_tokens": True}
    # the layout, built here: the extra files, BOS, then FIM; 64-token batches give the prefix its last 48 tokens
    # and the suffix its first 16 - 2 - len(prompt) tokens; the extra files fit
    head = [repo, *tok("myproject\n")]
    for chunk in extra:
        head += [sep, *tok(chunk.get("filename", "tmp") + "\n"), *tok(chunk["text"])]
    head += [sep, *tok("filename\n")]
    middle = tok("    ")
    fim = [0, pre, *tok(prefix)[-48:], *middle, suf, *tok(suffix)[:16 - 2 - len(middle)], mid]
    want = [*head, *fim]
    assert len(tok(prefix)) > 48 and len(tok(suffix)) > 16
    out = post(server, "/infill", body)
    assert out["tokens_evaluated"] == len(want)
    assert out["prompt"] == post(server, "/detokenize", {"tokens": want})["content"]
    same = post(server, "/completion", {"prompt": want, "n_predict": 8, "temperature": 0, "return_tokens": True})
    assert out["content"] == same["content"] and out["tokens"] == same["tokens"]
    with edgelm.load(server.gguf, n_ctx=256, n_batch=64, n_threads=2) as m:  # the Python API's infill
        local = m.infill(prefix, suffix, middle="    ", extra=extra, max_tokens=8, temperature=0)
    assert (local.text, local.tokens, local.timings.prompt_tokens) == (out["content"], out["tokens"], len(want))
    # llama.vim's request: its samplers, with the infill sampler, and its time limit
    vim = post(server, "/infill", {**body, "samplers": ["top_k", "top_p", "infill"], "top_k": 40, "top_p": 0.99,
                                   "t_max_prompt_ms": 500, "t_max_predict_ms": 500, "cache_prompt": True, "seed": 1})
    assert vim["tokens_evaluated"] == len(want) and vim["stop"] is True
    # many extra files: their last tokens, as many as leave the reply its n_predict tokens in the context (256)
    many = post(server, "/infill", {**body, "input_extra": extra * 30, "n_predict": 4})
    assert many["tokens_evaluated"] == 256 - 4
    assert many["prompt"].endswith(post(server, "/detokenize", {"tokens": fim})["content"])
    for bad in ({"input_suffix": ""}, {**body, "input_extra": [{"filename": "x"}]}, {**body, "prompt": 3}):
        post(server, "/infill", bad, status=400)


def test_suffix_asks_ollama_and_openai_to_insert(fim_server, server):
    """Ollama's /api/generate `suffix` (what Continue sends for code completion) and OpenAI's /v1/completions
    `suffix`: BOS, FIM prefix, the prompt, FIM suffix, the suffix, FIM middle, as a FIM template lays it out."""
    fim, first = fim_server
    pre, suf, mid = first, first + 1, first + 2

    def tok(text: str) -> list[int]:
        return post(fim, "/tokenize", {"content": text})["tokens"]

    prompt, suffix = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
    want = post(fim, "/completion", {"prompt": [0, pre, *tok(prompt), suf, *tok(suffix), mid], "n_predict": 12,
                                     "temperature": 0})
    out = post(fim, "/api/generate", {"model": "x", "prompt": prompt, "suffix": suffix, "stream": False,
                                      "options": {"temperature": 0, "num_predict": 12}})
    assert out["response"] == want["content"] and out["prompt_eval_count"] == want["tokens_evaluated"]
    out = post(fim, "/v1/completions", {"model": "x", "prompt": prompt, "suffix": suffix, "max_tokens": 12,
                                        "temperature": 0})
    assert out["choices"][0]["text"] == want["content"]
    assert "insert" in post(fim, "/api/show", {"model": "x"})["capabilities"]
    assert "insert" not in post(server, "/api/show", {"model": "x"})["capabilities"]
    error = post(server, "/api/generate", {"model": "x", "prompt": "a", "suffix": "b", "stream": False}, status=400)
    assert error["error"].endswith("does not support insert: no FIM prefix, suffix, middle token")
    post(server, "/v1/completions", {"model": "x", "prompt": "a", "suffix": "b"}, status=400)


def test_slot_files(tmp_path):
    """llama-server's /slots/N?action=save|restore|erase with --slot-save-path: a slot's prompt KV saved, erased,
    restored in this server and in a new one; the restored prefix is reused and the reply is the cold one."""
    folder = tmp_path / "slots"
    prompt = "def fibonacci(n):\n    " + "a, b = b, a + b\n    " * 40
    body = {"prompt": prompt, "n_predict": 8, "temperature": 0, "return_tokens": True}

    def start():
        return ServerProcess("--parallel", "1", "--ctx", "1024", "--api-key", KEY, "--slot-save-path", str(folder))

    server = start()
    try:
        cold = post(server, "/completion", body)
        warm = post(server, "/completion", body)["tokens_cached"]  # what exact reuse takes of the slot's KV
        assert warm > 0
        saved = post(server, "/slots/0?action=save", {"filename": "fib.bin"})
        assert saved["id_slot"] == 0 and saved["filename"] == "fib.bin" and saved["n_written"] > 0
        assert 0 < saved["n_saved"] <= cold["tokens_evaluated"] and (folder / "fib.bin").is_file()
        assert post(server, "/slots/0?action=erase", {})["n_erased"] == saved["n_saved"]
        assert post(server, "/completion", body)["tokens_cached"] == 0  # erased: evaluated again
        post(server, "/slots/0?action=erase", {})
        restored = post(server, "/slots/0?action=restore", {"filename": "fib.bin"})
        assert (restored["n_restored"], restored["n_read"]) == (saved["n_saved"], saved["n_written"])
        again = post(server, "/completion", body)
        assert again["tokens_cached"] == warm and again["tokens"] == cold["tokens"]
        for name, status in (("../x.bin", 400), ("a/b", 400), ("missing.bin", 404)):
            post(server, "/slots/0?action=restore", {"filename": name}, status=status)
        (folder / "bad.bin").write_bytes(b"EDGELMKV" + b"\0" * 40)
        assert "not a slot file" in post(server, "/slots/0?action=restore", {"filename": "bad.bin"},
                                          status=400)["error"]["message"]
        post(server, "/slots/3?action=save", {"filename": "x.bin"}, status=400)
        post(server, "/slots/0?action=load", {"filename": "x.bin"}, status=400)
        assert httpx.post(server.base + "/slots/0?action=erase").status_code == 401
    finally:
        assert "Traceback" not in server.stop()
    server = start()  # a new process restores what the last one saved
    try:
        post(server, "/slots/0?action=restore", {"filename": "fib.bin"})
        again = post(server, "/completion", body)
        assert again["tokens_cached"] == warm and again["tokens"] == cold["tokens"]
    finally:
        assert "Traceback" not in server.stop()


BAD = [None, {}, [], [[]], [1.5], ["a", {}], "x", -1, 10**12, True, [[1, 2], "x"], [{"id": 0}], {"a": "b"}, [["x"]]]
ROUTES = {"/completion": ({"prompt": "hi", "n_predict": 2}, ["prompt", "n_predict", "n_probs", "samplers", "logit_bias",
                                                           "lora", "response_fields", "id_slot", "n_indent", "stop"]),
          "/infill": ({"input_prefix": "a", "input_suffix": "b"}, ["input_prefix", "input_extra", "prompt"]),
          "/v1/completions": ({"prompt": "hi", "max_tokens": 2}, ["prompt", "echo", "suffix", "logprobs", "lora"]),
          "/embedding": ({"content": "hi"}, ["content", "embd_normalize"]),
          "/apply-template": ({"messages": [{"role": "user", "content": "hi"}]}, ["messages", "tools"])}


def test_bad_values_are_never_a_server_error(server):
    """Every field of the new routes, given values of the wrong shape: an answer below 500 each time."""
    with httpx.Client(headers=H, timeout=60) as c:
        for path, (body, fields) in ROUTES.items():
            for field in fields:
                for value in BAD:
                    r = c.post(server.base + path, json={**body, field: value})
                    assert r.status_code < 500, (path, field, value, r.text)
        for value in BAD:
            assert c.post(server.base + "/lora-adapters", json=value).status_code < 500
            assert c.post(server.base + "/slots/0?action=save", json={"filename": value}).status_code < 500
