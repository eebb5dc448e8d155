"""Router mode (edgelm/router.py): several models behind one server, chosen by each request's "model".

The router's rules run in-process on real servers (leases, least-recently-used eviction, keep-alive, memory);
the HTTP surface runs as a real `edgelm serve --models-dir` process, driven by the openai and ollama clients."""
from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import gguf
import httpx
import ollama
import openai
import pytest

import edgelm
from edgelm.metrics import Metrics
from edgelm.openai_api import APIError
from edgelm.router import RELEASE, Router, RouterOptions, parse_keep_alive
from edgelm.runtime import memory
from edgelm.runtime.model import default_model_path
from edgelm.server import Server, ServerOptions

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = default_model_path().stem
PROMPT = "def fibonacci(n):"


class Lease:
    """What Router.get needs of a request: its ASGI scope, where the lease's release goes."""

    def __init__(self):
        self.scope = {}

    def end(self) -> None:
        for release in self.scope.pop(RELEASE, []):
            release()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tiny_gguf) -> Path:
    """Two tiny models, and files a models folder may hold that are not models of their own."""
    d = tmp_path_factory.mktemp("models")
    for t in ("f16", "q8_0"):
        os.symlink(tiny_gguf[t], d / f"tiny-{t}.gguf")
    (d / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 24)  # counts past the end
    (d / "tiny-f16.ee4-draft.gguf").write_bytes(b"not read: an early-exit split's piece")
    w = gguf.GGUFWriter(str(d / "adapter.gguf"), "llama")  # a LoRA adapter: no model of its own
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    return d


def router(models_dir: Path, **options) -> Router:
    base = ServerOptions(n_parallel=1, n_ctx=256, n_threads=2, warmup=False)
    return Router(base, RouterOptions(models_dir=str(models_dir), **options), Metrics(), Server)


def test_keep_alive_durations():
    cases = [(0, 0.0), (300, 300.0), ("5m", 300.0), ("1h30m", 5400.0), ("300ms", 0.3), ("0", 0.0), ("10", 10.0),
             (-1, math.inf), ("-1", math.inf), ("-5m", math.inf)]
    assert [parse_keep_alive(v) for v in (v for v, _ in cases)] == [want for _, want in cases]
    for bad in ("soon", "5x", "5m3", "", True, None, float("nan"), [5]):
        with pytest.raises(ValueError, match="keep_alive"):
            parse_keep_alive(bad)


def test_catalog_skips_what_is_not_a_model(models_dir):
    r = router(models_dir)
    names = set(r.catalog())
    assert {"tiny-f16", "tiny-q8_0", BUNDLED} <= names
    assert not names & {"broken", "adapter", "tiny-f16.ee4-draft"}
    assert r.find("tiny-q8_0:latest").name == "tiny-q8_0"  # Ollama's clients may add the tag
    with pytest.raises(APIError) as e:
        r.find("tiny-q4_0")
    assert e.value.status == 404 and e.value.code == "model_not_found"


def test_leases_keep_a_model_loaded_and_the_least_recently_used_idle_one_goes(models_dir):
    r = router(models_dir, models_max=2, keep_alive=60)

    async def go():
        a, b, c = Lease(), Lease(), Lease()
        first = await r.get(a, "tiny-f16")
        second = await r.get(b, "tiny-q8_0")
        assert (first.model_id, second.model_id) == ("tiny-f16", "tiny-q8_0")
        with pytest.raises(APIError) as e:  # both serving: nothing is unloaded under a request
            await r.get(c, BUNDLED)
        assert e.value.status == 503 and e.value.headers["Retry-After"] == "1"
        assert set(r.models) == {"tiny-f16", "tiny-q8_0"} and r.unloads == 0
        a.end()
        b.end()  # tiny-f16 has been idle longest
        third = await r.get(c, BUNDLED)
        assert set(r.models) == {"tiny-q8_0", BUNDLED} and (r.loads, r.unloads) == (3, 1)
        assert first.llama._ptr is None  # closed: its memory is back
        again = Lease()
        assert await r.get(again, "tiny-q8_0") is second and r.loads == 3  # no reload
        assert third.model_id == BUNDLED
        c.end()
        again.end()

    try:
        asyncio.run(go())
    finally:
        r.close()


def test_requests_that_arrive_together_load_a_model_once(models_dir):
    r = router(models_dir)

    async def go():
        leases = [Lease() for _ in range(4)]
        servers = await asyncio.gather(*(r.get(lease, "tiny-f16") for lease in leases))
        assert all(s is servers[0] for s in servers) and r.loads == 1
        assert r.models["tiny-f16"].leases == 4

    try:
        asyncio.run(go())
    finally:
        r.close()


def test_keep_alive_unloads_idle_models(models_dir):
    r = router(models_dir, keep_alive=0.3)

    async def until_unloaded(name: str, within: float) -> bool:
        deadline = time.monotonic() + within
        while name in r.models and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return name not in r.models

    async def go():
        reaper = asyncio.create_task(r.reap())
        short, now, forever = Lease(), Lease(), Lease()
        await r.get(short, "tiny-f16")  # the server's keep-alive: 0.3 s
        await r.get(now, "tiny-q8_0", keep_alive=0)
        await r.get(forever, BUNDLED, keep_alive="-1")
        await asyncio.sleep(0.8)
        assert set(r.models) == {"tiny-f16", "tiny-q8_0", BUNDLED}  # serving: the clock starts at the end
        now.end()
        assert await until_unloaded("tiny-q8_0", 2)
        assert "tiny-f16" in r.models and r.expires_at("tiny-f16") == math.inf
        short.end()
        assert math.isfinite(r.expires_at("tiny-f16"))
        assert await until_unloaded("tiny-f16", 3)
        forever.end()
        await asyncio.sleep(1.0)
        assert set(r.models) == {BUNDLED} and r.expires_at(BUNDLED) == math.inf
        with pytest.raises(APIError, match="keep_alive"):
            await r.get(Lease(), BUNDLED, keep_alive="soon")
        reaper.cancel()

    try:
        asyncio.run(go())
    finally:
        r.close()


def test_a_model_that_does_not_fit_unloads_an_idle_one(models_dir, monkeypatch):
    r = router(models_dir, models_max=0)

    async def go():
        lease = Lease()
        small = (await r.get(lease, "tiny-q8_0")).memory.total
        lease.end()
        await r.unload("tiny-q8_0")
        lease = Lease()
        big = (await r.get(lease, "tiny-f16")).memory.total
        lease.end()
        # memory as the system would report it: a budget that holds either model, not both
        budget = big + small // 2
        monkeypatch.setattr(memory, "available", lambda: budget - sum(s.memory.total for s in r.servers().values()))
        lease = Lease()
        await r.get(lease, "tiny-q8_0")
        assert set(r.models) == {"tiny-q8_0"} and r.unloads == 2
        with pytest.raises(edgelm.errors.InsufficientMemoryError):  # serving, so nothing can make room
            await r.get(Lease(), "tiny-f16")
        lease.end()

    try:
        asyncio.run(go())
    finally:
        r.close()


# ---------------------------------------------------------------------------- over HTTP


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_gguf):
    """EDGELM_HOME with one named model; an empty Hugging Face cache."""
    d = tmp_path_factory.mktemp("router-home")
    (d / "Modelfile").write_text(f'FROM {tiny_gguf["q8_0"]}\nPARAMETER temperature 0\nPARAMETER num_predict 6\n'
                                 'SYSTEM """Answer briefly."""\n')
    env = {**os.environ, "EDGELM_HOME": str(d / "home"), "HF_HOME": str(d / "hf"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "edgelm", "create", "brief", "-f", str(d / "Modelfile")], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return env


@pytest.fixture(scope="module")
def served(models_dir, home):
    from test_server import ServerProcess

    s = ServerProcess("--models-dir", str(models_dir), "--models-max", "2", "--keep-alive", "-1", "--parallel", "2",
                      "--ctx", "512", env=home)
    yield s
    err = s.stop()
    assert "Traceback" not in err, err[-3000:]


def reference(path: Path, **kwargs) -> edgelm.Completion:
    with edgelm.load(path, n_ctx=512, n_threads=2, prefix_cache_bytes=0) as m:
        return m.generate(PROMPT, temperature=0, max_tokens=12, **kwargs)


def test_http_routes_each_request_to_the_model_it_names(served, tiny_gguf):
    c = openai.OpenAI(base_url=served.base + "/v1", api_key="none", max_retries=0, timeout=120)
    listed = {m.id: m.model_extra["status"]["value"] for m in c.models.list().data}
    assert listed == {"brief:latest": "unloaded", "tiny-f16": "unloaded", "tiny-q8_0": "unloaded",
                      BUNDLED: "unloaded"}
    for name, path in (("tiny-f16", tiny_gguf["f16"]), ("tiny-q8_0", tiny_gguf["q8_0"])):
        out = c.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0)
        assert out.model == name and out.choices[0].text == reference(path).text
    with pytest.raises(openai.NotFoundError, match="'gpt-4o' not found") as e:
        c.completions.create(model="gpt-4o", prompt=PROMPT, max_tokens=2)
    assert e.value.code == "model_not_found"
    missing = httpx.post(served.base + "/v1/completions", json={"prompt": PROMPT})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"
    props = httpx.get(served.base + "/props", params={"model": "tiny-f16"}).json()
    assert props["model_alias"] == "tiny-f16" and props["default_generation_settings"]["n_ctx"] == 512
    tokens = httpx.post(served.base + "/tokenize", json={"model": "tiny-q8_0", "content": PROMPT}).json()["tokens"]
    with edgelm.load(tiny_gguf["q8_0"], n_ctx=64) as m:
        assert tokens == m.tokenize(PROMPT, add_special=False)


def test_http_named_models_least_recently_used_and_ollama_unload(served, tiny_gguf):
    client = ollama.Client(host=served.base)
    question = [{"role": "user", "content": "What is 2 + 2?"}]
    out = client.chat(model="brief", messages=question)  # the named model's system message and parameters
    with edgelm.load(tiny_gguf["q8_0"], n_ctx=512, n_threads=2, prefix_cache_bytes=0) as m:
        want = m.chat([{"role": "system", "content": "Answer briefly."}, *question], temperature=0, max_tokens=6)
    assert out.message.content == want.text and out.eval_count == len(want.tokens) <= 6
    # at most 2 loaded: tiny-f16, used least recently by the test before, made room
    assert {m.model for m in client.ps().models} == {"tiny-q8_0", "brief:latest"}, httpx.get(served.base + "/metrics").text[-1500:]
    metrics = httpx.get(served.base + "/metrics").text
    assert 'edgelm_requests_completed_total{model="brief:latest"} 1' in metrics
    assert "edgelm_models_loaded 2" in metrics and "edgelm_model_unloads_total 1" in metrics
    generated = client.generate(model="tiny-f16:latest", prompt=PROMPT, raw=True, options={"temperature": 0,
                                                                                          "num_predict": 12})
    assert generated.model == "tiny-f16:latest" and generated.response == reference(tiny_gguf["f16"]).text
    assert client.generate(model="tiny-f16", keep_alive=0).done_reason == "unload"
    assert "tiny-f16" not in [m.model for m in client.ps().models]
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="llama3.2", prompt=PROMPT)
    assert e.value.status_code == 404 and "not found" in e.value.error
    tags = {m.model: m.size for m in client.list().models}
    assert tags["tiny-q8_0"] == tiny_gguf["q8_0"].stat().st_size and BUNDLED in tags and "adapter" not in tags
    loaded = httpx.post(served.base + "/models/load", json={"model": "tiny-f16"}).json()
    assert loaded.get("success"), loaded
    assert "tiny-f16" in [m.model for m in client.ps().models]
    assert httpx.post(served.base + "/models/unload", json={"model": "tiny-f16"}).json() == {"success": True}
    assert "tiny-f16" not in [m.model for m in client.ps().models]


def test_router_flags_that_belong_to_one_model_are_refused(tiny_gguf):
    for flags in (["--lora", str(tiny_gguf["f16"])], ["--draft", str(tiny_gguf["f16"])], ["--alias", "x"],
                  ["--models-max", "-1"], ["--keep-alive", "soon"], ["--models-dir", "/nonexistent"],
                  ["/nonexistent.gguf"]):
        r = subprocess.run([sys.executable, "-m", "edgelm", "serve", "--router", *flags], capture_output=True,
                           text=True, cwd=ROOT)
        assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_http_a_stream_holds_its_model_until_it_ends_or_its_client_leaves(models_dir, home, tiny_gguf):
    from test_server import ServerProcess

    s = ServerProcess(str(tiny_gguf["f32"]), "--models-dir", str(models_dir), "--models-max", "1", "--parallel", "1",
                      "--ctx", "2048", env=home)  # a default model outside the catalog: loaded first, then made room
    long = {"model": BUNDLED, "prompt": PROMPT, "max_tokens": 1800, "ignore_eos": True, "temperature": 0,
            "stream": True}
    other = {"model": "tiny-f16", "prompt": PROMPT, "max_tokens": 4}
    try:
        with httpx.stream("POST", s.base + "/v1/completions", json=long, timeout=120) as stream:
            lines = stream.iter_lines()  # kept: a dropped iterator closes the response, and the server sees a leaver
            next(lines)  # streaming: the bundled model serves it
            busy = httpx.post(s.base + "/v1/completions", json=other, timeout=120)
            assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
            text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines if line.startswith("data: {"))
        assert text  # it ran to its end, then its model could go
        assert httpx.post(s.base + "/v1/completions", json=other, timeout=120).status_code == 200
        with httpx.stream("POST", s.base + "/v1/completions", json=long, timeout=120) as stream:
            lines = stream.iter_lines()
            next(lines)
        # the client left mid-stream: its request is cancelled and its lease ends within a few decode steps
        deadline = time.time() + 10
        while (status := httpx.post(s.base + "/v1/completions", json=other, timeout=120).status_code) == 503:
            assert time.time() < deadline
            time.sleep(0.1)
        assert status == 200
        default = httpx.post(s.base + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4}, timeout=120)
        assert default.json()["model"] == "tiny-f32"
    finally:
        assert "Traceback" not in s.stop()
