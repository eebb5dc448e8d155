"""Ollama's uploads (/api/blobs) and /api/create from them, driven by the official `ollama` client the way `ollama
create` drives them for a Modelfile whose FROM and ADAPTER name local files: a GGUF, a safetensors checkpoint
(converted and quantized on the server), LoRA adapters; and what a delete or a bad upload leaves behind."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import httpx
import ollama
import pytest
from conftest import write_peft_adapter
from test_server import ServerProcess

import edgelm
from edgelm.runtime.model import default_model_path

PROMPT = "def add(a, b):"


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def server(home):
    s = ServerProcess("--router", "--parallel", "1", "--ctx", "256", env={**os.environ, "EDGELM_HOME": str(home)})
    yield s
    err = s.stop()
    assert "Traceback" not in err, err[-3000:]


def upload(client: ollama.Client, paths) -> dict[str, str]:
    return {p.name: client.create_blob(p) for p in paths}


def served(client: ollama.Client, name: str) -> str:
    return client.generate(name, PROMPT, raw=True, options={"temperature": 0, "num_predict": 8}).response


def local(path: Path, lora: Path | None = None) -> str:
    with edgelm.load(path, n_ctx=256, n_threads=2, prefix_cache_bytes=0, lora=[lora] if lora else None) as model:
        return model.generate(PROMPT, max_tokens=8, temperature=0).text


def model_file(client: ollama.Client, name: str) -> Path:
    """The file a named model runs, from the FROM line /api/show gives."""
    line = client.show(name).modelfile.splitlines()[0]
    assert line.startswith("FROM ")
    return Path(line[5:])


def statuses(stream) -> list[str]:
    return [s.status for s in stream]


def test_create_from_uploaded_files(server, home, tmp_path, tiny_dir, tiny_gguf):
    from edgelm.converters import convert
    from edgelm.converters.lora import convert_lora
    from edgelm.converters.quantize import quantize

    client = ollama.Client(host=server.base)
    store = home / "blobs"

    # a GGUF (FROM ./model.gguf): the upload is the model, byte for byte
    gguf = default_model_path()
    files = upload(client, [gguf])
    assert httpx.head(f"{server.base}/api/blobs/{files[gguf.name]}").status_code == 200
    assert statuses(client.create("up", files=files, system="Be brief.", stream=True)) == [
        "reading model metadata", "parsing GGUF", "writing manifest", "success"]
    assert model_file(client, "up") == store / files[gguf.name].replace(":", "-")
    assert model_file(client, "up").read_bytes() == gguf.read_bytes()
    assert 'SYSTEM """Be brief."""' in client.show("up").modelfile
    assert served(client, "up") == local(gguf)

    # a checkpoint's files (FROM ./folder, `ollama create -q q4_K_M`): converted and quantized on the server into
    # the bytes `edgelm convert --quant q4_k_m` writes
    checkpoint = upload(client, sorted(p for p in tiny_dir.iterdir() if p.is_file()))
    assert statuses(client.create("tiny-q4", files=checkpoint, quantize="q4_K_M", stream=True)) == [
        "reading model metadata", "converting model", "quantizing F16 model to Q4_K_M", "writing manifest", "success"]
    reference = convert(tiny_dir, tmp_path / "tiny-q4.gguf", quant="q4_k_m", name="tiny-q4").path
    assert model_file(client, "tiny-q4").read_bytes() == reference.read_bytes()
    assert served(client, "tiny-q4") == local(reference)

    # an uploaded F16 GGUF quantized, as llama.cpp's quantizer does it; or a named F16 model, keeping its settings
    f16 = upload(client, [tiny_gguf["f16"]])
    assert client.create("tiny-q8", files=f16, quantize="q8_0").status == "success"
    quantize(tiny_gguf["f16"], tmp_path / "tiny-q8.gguf", "q8_0")
    assert model_file(client, "tiny-q8").read_bytes() == (tmp_path / "tiny-q8.gguf").read_bytes()
    assert client.create("tiny-f16", files=f16, system="Hi.").status == "success"
    assert client.create("tiny-q8b", from_="tiny-f16", quantize="q8_0").status == "success"
    assert model_file(client, "tiny-q8b") == model_file(client, "tiny-q8")
    assert 'SYSTEM """Hi."""' in client.show("tiny-q8b").modelfile

    # a PEFT adapter's files beside the checkpoint's (ADAPTER ./peft): converted against them
    peft = write_peft_adapter(tmp_path / "peft")
    adapter = upload(client, [peft / "adapter_config.json", peft / "adapter_model.safetensors"])
    assert statuses(client.create("tiny-lora", files=checkpoint, adapters=adapter, stream=True)) == [
        "reading model metadata", "converting model", "converting adapter", "writing manifest", "success"]
    base = convert(tiny_dir, tmp_path / "tiny-f16.gguf", name="tiny-lora").path
    lora = convert_lora(peft, tiny_dir, tmp_path / "adapter.gguf", name="adapter").path
    with_lora = local(base, lora)
    assert served(client, "tiny-lora") == with_lora != local(base)
    # the same two as GGUF files: the same blobs, shared by both models
    made = client.create("tiny-lora2", files=upload(client, [base]), adapters=upload(client, [lora]))
    assert made.status == "success"
    assert served(client, "tiny-lora2") == with_lora
    shown = client.show("tiny-lora2").modelfile
    used = [store / f"sha256-{hashlib.sha256(p.read_bytes()).hexdigest()}" for p in (base, lora)]
    assert f"FROM {used[0]}" in shown and f"ADAPTER {used[1]}" in shown

    # a delete takes the blobs no other model uses
    client.delete("tiny-lora2")
    assert all(p.is_file() for p in used)  # tiny-lora uses them
    client.delete("tiny-lora")
    assert not any(p.is_file() for p in used)
    client.delete("up")
    assert not (store / files[gguf.name].replace(":", "-")).exists()
    names = {m.model for m in client.list().models}
    assert {"tiny-q4:latest", "tiny-q8:latest"} <= names and not names & {"up:latest", "tiny-lora:latest"}
    # no temporary file is left behind
    assert not [p.name for p in store.iterdir() if p.name.startswith(".")]


def test_refused_uploads_and_creates(server, home, tmp_path):
    base, store = server.base, home / "blobs"
    wrong = "sha256:" + "0" * 64
    r = httpx.post(f"{base}/api/blobs/{wrong}", content=b"these bytes hash to something else")
    assert r.status_code == 400 and "SHA-256" in r.json()["error"]
    assert not store.exists() or not list(store.iterdir())  # nothing kept, not even a temporary file
    for digest in ("sha256:xyz", "md5-" + "0" * 32, "..%2F..%2Fetc%2Fpasswd"):
        assert httpx.post(f"{base}/api/blobs/{digest}", content=b"x").status_code in (400, 404)
    assert httpx.head(f"{base}/api/blobs/{wrong}").status_code == 404

    client = ollama.Client(host=base)
    good = client.create_blob(default_model_path())  # 17 MB: past the 4 MiB limit of a JSON body
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 16)
    broken = upload(client, [tmp_path / "config.json", tmp_path / "model.safetensors"])
    peft = write_peft_adapter(tmp_path / "peft")
    adapter = upload(client, [peft / "adapter_config.json", peft / "adapter_model.safetensors"])
    bad = [({"files": {"m.gguf": wrong}}, 404, "upload it first"),
           ({"files": {"../m.gguf": good}}, 400, "plain file name"),
           ({"files": {"a.gguf": good, "b.gguf": good}}, 400, "one GGUF"),
           ({"files": {"notes.txt": good}}, 400, "safetensors"),
           ({"files": {"m.gguf": good}, "from": "edgelm-small-q8_0"}, 400, "files"),
           ({"files": {"m.gguf": good}, "quantize": "q4_K_M"}, 400, "quantized already"),
           ({"files": {"m.gguf": good}, "quantize": "iq2_xxs"}, 400, "quantize"),
           ({"files": {"m.gguf": good}, "adapters": {"x.gguf": good}}, 400, "not a LoRA adapter"),
           ({"files": {"m.gguf": good}, "adapters": adapter}, 400, "PEFT"),
           ({"files": {"m.gguf": good}, "template": "{{ .Prompt }}"}, 400, "Go"),
           ({"files": broken}, 400, "config.json")]
    for fields, status, match in bad:
        r = httpx.post(f"{base}/api/create", json={"model": "x", "stream": False, **fields}, timeout=60)
        assert r.status_code == status and match in r.json()["error"], (fields, r.text)
    # streamed, a failure after the first status is Ollama's error line (the client raises it)
    with pytest.raises(ollama.ResponseError, match="config.json"):
        list(client.create("x", files=broken, stream=True))
    assert "x:latest" not in {m.model for m in client.list().models}
    assert not [p.name for p in store.iterdir() if p.name.startswith(".")]


def test_a_server_start_prunes_what_no_model_uses(home, tmp_path, tiny_dir):
    """As Ollama at its start: uploads no create used go, and temporary files a stopped server left a day ago."""
    env = {**os.environ, "EDGELM_HOME": str(home)}
    s = ServerProcess("--router", "--parallel", "1", env=env)
    try:
        client = ollama.Client(host=s.base)
        used = upload(client, [default_model_path()])
        assert client.create("kept", files=used).status == "success"
        orphan = client.create_blob(tiny_dir / "config.json")
    finally:
        s.stop()
    store = home / "blobs"
    stale, fresh = store / ".upload-stale.part", store / ".upload-fresh.part"
    for p in (stale, fresh):
        p.write_bytes(b"half an upload")
    os.utime(stale, (0, 0))
    s = ServerProcess("--router", "--parallel", "1", env=env)
    try:
        assert served(ollama.Client(host=s.base), "kept") == local(default_model_path())
    finally:
        s.stop()
    names = {p.name for p in store.iterdir()}
    assert names == {used[default_model_path().name].replace(":", "-"), fresh.name}, (names, orphan)
