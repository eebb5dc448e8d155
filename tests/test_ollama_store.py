"""Ollama's model management over HTTP (/api/pull, /api/create, /api/copy, /api/delete) on `edgelm serve --router`,
driven by the official `ollama` client; downloads come from the stand-in Hub of test_hub.py."""
from __future__ import annotations

import httpx
import ollama
import pytest
from test_hub import GGUF, REPO, hub_env, standin  # noqa: F401 (fixtures)
from test_server import ServerProcess

import edgelm
from edgelm.runtime.model import default_model_path

PULLED = f"hf.co/{REPO}:Q8_0"  # Ollama's own way to name a Hub model
CACHED = f"hf://{REPO}/{GGUF}"  # how the catalog lists it once cached


@pytest.fixture
def server(hub_env, tmp_path):  # noqa: F811
    s = ServerProcess("--router", "--parallel", "1", "--ctx", "256",
                      env={**hub_env, "EDGELM_HOME": str(tmp_path / "home")})
    yield s
    err = s.stop()
    assert "Traceback" not in err, err[-3000:]


def test_pull_create_copy_delete(server, standin):  # noqa: F811
    client = ollama.Client(host=server.base)
    assert CACHED not in [m.model for m in client.list().models]
    statuses = list(client.pull(PULLED, stream=True))
    assert statuses[0].status == "pulling manifest" and statuses[-1].status == "success"
    parts = [s for s in statuses if s.status.startswith("pulling ") and s.total]  # Ollama's progress, by chunk
    size = default_model_path().stat().st_size
    assert {(s.status, s.digest, s.total) for s in parts} == {(f"pulling {GGUF}", GGUF, size)}
    done = [s.completed for s in parts]
    assert done == sorted(done) and 0 < done[0] < size and done[-1] == size
    assert CACHED in [m.model for m in client.list().models]
    assert client.pull(PULLED).status == "success"
    assert len([g for g in standin.gets() if g.startswith("/cdn/")]) == 1  # cached: not downloaded again

    with edgelm.load(n_ctx=256, n_threads=2, prefix_cache_bytes=0) as model:
        ref = model.generate("def add(a, b):", max_tokens=6, temperature=0).text
    greedy = {"temperature": 0, "num_predict": 6}
    assert client.generate(PULLED, "def add(a, b):", raw=True, options=greedy).response == ref  # by its pulled name

    client.copy(PULLED, "mine")
    assert client.generate("mine", "def add(a, b):", raw=True, options=greedy).response == ref
    done = list(client.create("tutor", from_="mine", system="Answer in one word.", stream=True,
                              parameters={"num_predict": 3, "stop": ["\n"]}))
    assert done[-1].status == "success"
    shown = client.show("tutor")
    assert 'SYSTEM """Answer in one word."""' in shown.modelfile and "num_predict 3" in shown.parameters
    assert client.generate("tutor", "Hello?").eval_count <= 3  # its parameters are the requests' defaults
    client.copy("tutor", "tutor2")  # a named model's copy keeps its settings
    assert client.show("tutor2").modelfile.replace("tutor2", "tutor") == shown.modelfile
    names = [m.model for m in client.list().models]
    assert {"mine:latest", "tutor:latest", "tutor2:latest"} <= set(names)

    for name in ("tutor", "tutor2", "mine"):
        client.delete(name)
    with pytest.raises(ollama.ResponseError) as e:
        client.show("tutor")
    assert e.value.status_code == 404
    client.delete(CACHED)
    assert CACHED not in [m.model for m in client.list().models]
    with pytest.raises(ollama.ResponseError) as e:
        client.delete(CACHED)
    assert e.value.status_code == 404


def test_what_the_api_may_not_do(server):
    """No request names a file on the server, or deletes one of the server owner's; failures say why."""
    base = server.base
    bad = [("/api/create", {"model": "x", "from": str(default_model_path())}, 404, "not found"),
           ("/api/create", {"model": "x", "modelfile": "FROM ./model.gguf"}, 404, "not found"),
           ("/api/create", {"model": "x", "modelfile": "FROM edgelm-small-q8_0\nADAPTER /tmp/a.gguf"}, 400, "ADAPTER"),
           ("/api/create", {"model": "x", "from": "edgelm-small-q8_0", "quantize": "q4_K_M"}, 400, "quantized already"),
           ("/api/create", {"model": "x", "from": "edgelm-small-q8_0", "template": "{{ .Prompt }}"}, 400, "Go"),
           ("/api/create", {"model": "Bad Name", "from": "edgelm-small-q8_0"}, 400, "model name"),
           ("/api/create", {"model": "x", "from": "edgelm-small-q8_0", "parameters": {"nope": 1}}, 400, "nope"),
           ("/api/copy", {"source": "nothing-here", "destination": "y"}, 404, "not found"),
           ("/api/pull", {"model": "llama3.2"}, 400, "Hugging Face"),
           ("/api/pull", {"model": "hf.co/../x"}, 400, "repository"),
           ("/api/pull", {"model": f"hf.co/{REPO}-missing:Q8_0", "stream": False}, 404, "")]
    for path, body, status, match in bad:
        r = httpx.post(base + path, json=body, timeout=60)
        assert r.status_code == status and match in r.json()["error"], (path, body, r.text)
    lines = httpx.post(base + "/api/pull", json={"model": f"hf.co/{REPO}-missing:Q8_0"}, timeout=60).text
    assert lines.splitlines()[0] == '{"status": "pulling manifest"}' and '"error"' in lines.splitlines()[-1]
    r = httpx.request("DELETE", base + "/api/delete", json={"model": "edgelm-small-q8_0"}, timeout=60)
    assert r.status_code == 404 and "server owner" in r.json()["error"]
    assert default_model_path().is_file()
    # a good create works
    r = httpx.post(base + "/api/create", json={"model": "x", "from": "edgelm-small-q8_0", "stream": False,
                                                "parameters": {"temperature": 0.2}}, timeout=60)
    assert r.status_code == 200 and r.json() == {"status": "success"}
