"""Named models from Ollama-style Modelfiles (edgelm/modelfile.py): `edgelm create`, then run, serve and load."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

import edgelm
from conftest import write_peft_adapter
from edgelm import modelfile
from edgelm.errors import ModelNotFoundError, TemplateSecurityError, UsageError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "models" / "tiny"
SYSTEM = "You answer in one line."
MODELFILE = '''# a named tiny model
FROM ./tiny.gguf
ADAPTER ./adapter.gguf
PARAMETER temperature 0
PARAMETER num_predict 7
PARAMETER num_ctx 256
PARAMETER stop "<|im_end|>"
SYSTEM """{system}"""
MESSAGE user Hello
MESSAGE assistant Hi there.
LICENSE """MIT
(test)"""
'''


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_gguf):
    """A folder with the tiny model, a LoRA adapter for it (a PEFT-layout adapter written with numpy) and a
    Modelfile naming both."""
    from edgelm.converters.lora import convert_lora

    d = tmp_path_factory.mktemp("named")
    (d / "tiny.gguf").write_bytes(tiny_gguf["f32"].read_bytes())
    convert_lora(write_peft_adapter(d / "peft"), TINY, d / "adapter.gguf")
    (d / "Modelfile").write_text(MODELFILE.format(system=SYSTEM))
    return d


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_parse():
    text = 'FROM x.gguf\n# comment\n\nsystem """two\nlines"""\nPARAMETER stop "a b"\nTEMPLATE "{{ x }}"\n'
    assert modelfile.parse(text) == [("FROM", "x.gguf"), ("SYSTEM", "two\nlines"), ("PARAMETER", 'stop "a b"'),
                                      ("TEMPLATE", "{{ x }}")]
    with pytest.raises(UsageError, match="never closes"):
        modelfile.parse('SYSTEM """open\nstill open')


def test_a_named_model_loads_with_its_adapter_parameters_and_preamble(folder, home):
    profile = modelfile.create("tiny-helper", folder / "Modelfile")
    assert profile.name == "tiny-helper:latest" and profile.license == "MIT\n(test)"
    assert (home / "models" / "tiny-helper@latest.json").is_file()
    question = [{"role": "user", "content": "What is 2 + 2?"}]
    with edgelm.load("tiny-helper", n_threads=2) as named:
        assert named.n_ctx == 256 and named.llama.lora is not None
        prompt = named.chat_prompt(question)
        assert prompt.index(SYSTEM) < prompt.index("Hello") < prompt.index("Hi there.") < prompt.index("2 + 2")
        got = named.chat(question)
        assert got.timings.completion_tokens <= 7  # num_predict
        override = named.chat(question, max_tokens=3)
        assert override.timings.completion_tokens <= 3  # the caller's own value wins
    explicit = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi there."}, *question]
    with edgelm.load(folder / "tiny.gguf", n_ctx=256, n_threads=2, lora=folder / "adapter.gguf") as plain:
        assert got.text == plain.chat(explicit, temperature=0, max_tokens=7, stop=["<|im_end|>"]).text


def test_the_record_writes_its_modelfile_again(folder, home):
    profile = modelfile.create("helper", folder / "Modelfile")
    again = modelfile.build("helper", profile.modelfile(), folder)
    assert {**vars(again), "created": 0} == {**vars(profile), "created": 0}
    assert "num_predict 7" in profile.parameters() and 'stop "<|im_end|>"' in profile.parameters()


def test_from_another_name_inherits_and_overrides(folder, home):
    modelfile.create("base", folder / "Modelfile")
    (folder / "Child").write_text('FROM base\nPARAMETER num_predict 3\nSYSTEM "Be terse."\n')
    child = modelfile.create("child:v2", folder / "Child")
    assert child.model == str(folder / "tiny.gguf") and child.adapters == (str(folder / "adapter.gguf"),)
    assert child.sampling["max_tokens"] == 3 and child.sampling["temperature"] == 0 and child.system == "Be terse."
    assert [p.name for p in modelfile.profiles()] == ["base:latest", "child:v2"]


@pytest.mark.parametrize("text, error, match", [
    ("PARAMETER temperature 0\n", UsageError, "no FROM"),
    ("FROM ./missing.gguf\n", ModelNotFoundError, "no such GGUF file"),
    ("FROM ./adapter.gguf\n", UsageError, "is a LoRA adapter"),
    ("FROM ./tiny.gguf\nADAPTER ./tiny.gguf\n", UsageError, "not a LoRA adapter"),
    ("FROM ./tiny.gguf\nPARAMETER tfs_z 0.9\n", UsageError, "tfs_z is not supported"),
    ("FROM ./tiny.gguf\nPARAMETER mirostat 3\n", UsageError, "mirostat must be"),
    ("FROM ./tiny.gguf\nPARAMETER temperature hot\n", UsageError, "not a number"),
    ("FROM ./tiny.gguf\nPARAMETER top_k -3\n", UsageError, "top_k"),
    ("FROM ./tiny.gguf\nTEMPLATE {{ .Prompt }}\n", UsageError, "Go template"),
    ("FROM ./tiny.gguf\nTEMPLATE {{ ''.__class__.__mro__ }}\n", TemplateSecurityError, "blocked by the sandbox"),
    ("FROM ./tiny.gguf\nMESSAGE robot hi\n", UsageError, "role"),
    ("FROM ./tiny.gguf\nQUANTIZE q4\n", UsageError, "unknown instruction"),
])
def test_bad_modelfiles_write_nothing(folder, home, tmp_path, text, error, match):
    (folder / "Bad").write_text(text)
    with pytest.raises(error, match=match):
        modelfile.create("bad", folder / "Bad")
    assert modelfile.find("bad") is None


@pytest.mark.parametrize("name", ["Bad", "../up", "a/b", "x:y:z", ""])
def test_names_stay_inside_the_folder(name, home):
    with pytest.raises(UsageError, match="model name"):
        modelfile.check_name(name)


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgelm", *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT)


def test_cli_create_list_run_rm(folder, home):
    import os

    env = {**os.environ, "EDGELM_HOME": str(home)}
    r = cli("create", "helper", "-f", str(folder / "Modelfile"), env=env)
    assert r.returncode == 0 and "created helper:latest" in r.stderr and "1 adapter(s)" in r.stderr, r.stderr
    listed = [json.loads(line) for line in cli("list", "--json", env=env).stdout.splitlines()]
    assert {"ref": "helper:latest", "path": str(folder / "tiny.gguf")} == {k: listed[1][k] for k in ("ref", "path")}
    assert cli("info", "helper", "--modelfile", env=env).stdout == modelfile.find("helper").modelfile()
    assert "architecture     llama" in cli("info", "helper", env=env).stdout
    r = cli("run", "helper", "-p", "What is 2 + 2?", "--threads", "2", "--json", env=env)
    assert r.returncode == 0, r.stderr
    with edgelm.load("helper", n_threads=2) as m:  # `run NAME -p` chats, as `ollama run NAME "..."` does
        assert json.loads(r.stdout)["text"] == m.chat([{"role": "user", "content": "What is 2 + 2?"}]).text
    assert cli("rm", "helper", env=env).returncode == 0
    r = cli("run", "helper", "-p", "hi", env=env)
    assert r.returncode == 1 and "no such model file or named model" in r.stderr and "Traceback" not in r.stderr


def test_serve_a_named_model(folder, home, monkeypatch):
    from test_server import ServerProcess

    modelfile.create("helper", folder / "Modelfile")
    monkeypatch.chdir(ROOT)
    s = ServerProcess("helper")  # the child inherits EDGELM_HOME
    try:
        c = openai.OpenAI(base_url=s.base + "/v1", api_key="none", max_retries=0, timeout=60)
        assert [m.id for m in c.models.list().data] == ["helper:latest"]
        question = [{"role": "user", "content": "What is 2 + 2?"}]
        out = c.chat.completions.create(model="helper", messages=question)  # the Modelfile's parameters
        ollama = httpx.post(s.base + "/api/chat", json={"model": "helper", "messages": question,
                                                        "stream": False}).json()
        show = httpx.post(s.base + "/api/show", json={"model": "helper"}).json()
        assert show["system"] == SYSTEM and "num_predict 7" in show["parameters"]
        assert show["modelfile"].startswith(f"FROM {folder / 'tiny.gguf'}\nADAPTER ")
    finally:
        assert "Traceback" not in s.stop()
    with edgelm.load("helper", n_threads=2) as m:
        want = m.chat(question)
    assert out.choices[0].message.content == want.text == ollama["message"]["content"]
    assert out.usage.completion_tokens == want.timings.completion_tokens <= 7


def test_batch_a_named_model(folder, home, tmp_path):
    import os

    env = {**os.environ, "EDGELM_HOME": str(home)}
    modelfile.create("helper", folder / "Modelfile")
    questions = ["What is 2 + 2?", "Name a colour."]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n"
                                               for q in questions))
    r = cli("batch", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"), "-m", "helper", "--threads", "2",
            "--no-progress", env=env)
    assert r.returncode == 0, r.stderr
    got = sorted((json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()),
                 key=lambda rec: rec["index"])
    with edgelm.load("helper", n_threads=2) as m:
        assert [rec["text"] for rec in got] == [m.chat([{"role": "user", "content": q}]).text for q in questions]


def test_cli_create_converts_a_checkpoint_and_its_adapter(folder, home, tmp_path):
    """FROM a safetensors checkpoint's folder and ADAPTER a PEFT adapter's, with `-q`, as `ollama create -q`:
    converted and quantized into $EDGELM_HOME/blobs, the bytes `edgelm convert` writes; the blobs go with the
    model."""
    import os

    from edgelm.converters import convert
    from edgelm.converters.lora import convert_lora
    from edgelm.runtime.model import default_model_path

    (tmp_path / "Modelfile").write_text(f"FROM {TINY}\nADAPTER {folder / 'peft'}\nPARAMETER temperature 0\n")
    env = {**os.environ, "EDGELM_HOME": str(home)}
    r = cli("create", "tuned", "-f", str(tmp_path / "Modelfile"), "-q", "q4_K_M", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines()[:3] == ["converting model", "quantizing F16 model to Q4_K_M", "converting adapter"]
    made = modelfile.find("tuned")
    model = convert(TINY, tmp_path / "tuned.gguf", quant="q4_k_m", name="tuned").path
    adapter = convert_lora(folder / "peft", TINY, tmp_path / "adapter.gguf", name="adapter").path
    assert Path(made.model).parent == home / "blobs" and Path(made.model).read_bytes() == model.read_bytes()
    assert [Path(a).read_bytes() for a in made.adapters] == [adapter.read_bytes()]
    with edgelm.load("tuned", n_threads=2) as m, edgelm.load(model, n_threads=2, lora=[adapter]) as ref:
        assert m.generate("Once", max_tokens=8).text == ref.generate("Once", max_tokens=8, temperature=0).text
    assert cli("rm", "tuned", env=env).returncode == 0
    assert not list((home / "blobs").iterdir())
    for text, flags, match in ((f"FROM {folder / 'tiny.gguf'}\nADAPTER {folder / 'peft'}\n", (), "PEFT"),
                               (f"FROM {default_model_path()}\n", ("-q", "q4_0"), "quantized already"),
                               (f"FROM {TINY}\n", ("-q", "q9_z"), "quantize"),
                               (f"FROM {tmp_path}\n", (), "config.json")):
        (tmp_path / "Modelfile").write_text(text)
        r = cli("create", "bad", "-f", str(tmp_path / "Modelfile"), *flags, env=env)
        assert r.returncode != 0 and match in r.stderr and "Traceback" not in r.stderr, (text, r.stderr)
