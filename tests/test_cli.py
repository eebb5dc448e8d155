"""The `edgelm` command as a user runs it: a real subprocess, real models, one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgelm.api import load
from edgelm.runtime.model import default_model_path


def edgelm(*args: str, timeout: float = 300, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgelm", *args], capture_output=True, text=True,
                          timeout=timeout, input=stdin)


def test_version():
    r = edgelm("--version")
    assert r.returncode == 0 and r.stdout.startswith("edgelm ")


def test_run_bundled_model_prints_text_and_stats():
    assert default_model_path().is_file()
    r = edgelm("run", "-p", "def fibonacci(n):", "-n", "24", "--temp", "0")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) > 0
    assert "tok/s" in r.stderr and "ttft" in r.stderr and "peak RSS" in r.stderr


def test_run_json(tiny_gguf):
    r = edgelm("run", str(tiny_gguf["q8_0"]), "-p", "import os", "-n", "8", "--temp", "0", "--json", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    assert record["completion_tokens"] == 8 and record["finish_reason"] == "length"
    assert set(record) == {"text", "prompt_tokens", "cached_tokens", "completion_tokens", "prompt_tps", "gen_tps", "ttft_ms",
                           "peak_rss_mb", "finish_reason"}


def test_run_reads_prompt_from_stdin(tiny_gguf):
    r = edgelm("run", str(tiny_gguf["q8_0"]), "-n", "4", "--temp", "0", "--json", stdin="class Foo:")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["prompt_tokens"] > 1


def _not_gguf(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("this is not a model\n" * 100)
    return p


def _truncated(tmp_path, src):
    p = tmp_path / "truncated.gguf"
    p.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return p


@pytest.mark.parametrize("make,phrase", [
    (lambda tmp, src: tmp / "missing.gguf", "no such model file"),
    (lambda tmp, src: _not_gguf(tmp), "not a GGUF file"),
    (lambda tmp, src: _truncated(tmp, src), "truncated"),
    (lambda tmp, src: tmp, "is a directory"),
])
def test_bad_model_is_one_line_and_nonzero(tmp_path, tiny_gguf, make, phrase):
    path = make(tmp_path, tiny_gguf["f16"])
    r = edgelm("run", str(path), "-p", "x", "-n", "1")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgelm: error:") and phrase in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    debug = edgelm("--debug", "run", str(path), "-p", "x", "-n", "1")
    assert debug.returncode == r.returncode and "Traceback" in debug.stderr


def test_bad_sampling_value_is_one_line():
    r = edgelm("run", "-p", "x", "--temp", "nan")
    assert r.returncode == 2 and "temperature" in r.stderr and "Traceback" not in r.stderr


def test_run_attention_and_kv_cache_flags(tiny_gguf):
    """llama.cpp's -fa / -ctk / -ctv: the model runs with them, and a combination llama.cpp would refuse with a
    bare 'could not create a context' is named in one line before it sees it."""
    model = str(tiny_gguf["q8_0"])
    outputs = set()
    for flags in (["-fa", "off"], ["--flash-attn", "on", "-ctk", "q8_0", "-ctv", "q8_0"], ["-fa", "off", "-ctk", "q8_0"]):
        r = edgelm("run", model, "-p", "import os", "-n", "8", "--temp", "0", "--json", "--ignore-eos", *flags)
        assert r.returncode == 0, (flags, r.stderr)
        outputs.add(json.loads(r.stdout)["completion_tokens"])
    assert outputs == {8}
    for flags, phrase in ((["-fa", "off", "-ctv", "q4_0"], "needs flash attention"),
                          (["-ctk", "q9_0"], "type_k must be one of"), (["-fa", "maybe"], "invalid choice")):
        r = edgelm("run", model, "-p", "x", "-n", "1", *flags)
        assert r.returncode == 2 and phrase in r.stderr and "Traceback" not in r.stderr, (flags, r.stderr)


def test_unknown_command():
    r = edgelm("frobnicate")
    assert r.returncode == 2 and "unknown command" in r.stderr


def test_convert_cli(tiny_dir, tmp_path):
    out = tmp_path / "t.gguf"
    r = edgelm("convert", str(tiny_dir), "-o", str(out), "--outtype", "q8_0")
    assert r.returncode == 0, r.stderr
    assert out.is_file() and "bits/weight" in r.stderr
    r = edgelm("convert", str(tmp_path), "-o", str(tmp_path / "x.gguf"))
    assert r.returncode == 1 and "missing config.json" in r.stderr and not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("which", ["bundled", "stories"])
def test_info(which, stories):
    path = default_model_path() if which == "bundled" else stories
    r = edgelm("info", str(path), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    text = json.dumps(info).lower()
    assert "llama" in text
    r = edgelm("info", str(path))
    assert r.returncode == 0 and "llama" in r.stdout.lower()


def test_bench_runs(tiny_gguf):
    r = edgelm("bench", str(tiny_gguf["q8_0"]), "-p", "32", "-n", "8", "-r", "1", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["pp32"] > 0 and result["tg8"] > 0


def test_chat_repl_history_save_load_reset(tiny_gguf, tmp_path):
    saved = tmp_path / "chat.json"
    script = f"hello\n/save {saved}\n/reset\n/load {saved}\nagain\n/nosuch\n/exit\n"
    r = edgelm("run", str(tiny_gguf["q8_0"]), "-i", "-n", "6", "--temp", "0", "--ignore-eos", "--system", "Be brief.",
               stdin=script)
    assert r.returncode == 0, r.stderr
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[1]["content"] == "hello" and messages[0]["content"] == "Be brief."
    assert "unknown command /nosuch" in r.stderr
    assert r.stderr.count("peak RSS") == 2  # a stats line per reply
    assert len([line for line in r.stdout.splitlines() if line.strip()]) == 2


def test_chat_repl_bad_load_keeps_going(tiny_gguf, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"messages": [{"role": 1}]}')
    r = edgelm("run", str(tiny_gguf["q8_0"]), "-i", "-n", "4", "--temp", "0", stdin=f"/load {bad}\n/load\nhi\n")
    assert r.returncode == 0, r.stderr
    assert "not a conversation" in r.stderr and "needs a file name" in r.stderr
    assert "tok/s" in r.stderr  # the turn after the errors still ran


def test_ctrl_c_stops_the_reply_not_the_program():
    import os
    import signal
    import time

    # the bundled model, not tiny: tiny fills a 4096-token context in well under a second, and a reply that
    # ended before the signal came would leave nothing to interrupt
    p = subprocess.Popen([sys.executable, "-m", "edgelm", "run", "-i", "-n", "100000", "--threads", "1",
                          "--ignore-eos", "--ctx", "4096"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         # the child must not inherit an ignored SIGINT: a shell starts background jobs (`cmd &`)
                         # with SIGINT and SIGQUIT ignored, a test run launched that way passes that on, and a
                         # program started with SIGINT ignored rightly keeps ignoring it
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    p.stdin.write("go on forever\n")
    p.stdin.flush()
    os.set_blocking(p.stdout.fileno(), False)
    deadline = time.time() + 120
    while time.time() < deadline and not (p.stdout.read(4096) or ""):
        time.sleep(0.05)  # wait until the reply is streaming
    p.send_signal(signal.SIGINT)
    time.sleep(0.5)
    os.set_blocking(p.stdout.fileno(), True)
    out, err = p.communicate("/exit\n", timeout=120)
    assert p.returncode == 0, err
    assert "[interrupted]" in out


def test_run_grammar_and_json_schema_flags(tiny_gguf, tmp_path):
    grammar = tmp_path / "yn.gbnf"
    grammar.write_text('root ::= "yes" | "no"\n')
    r = edgelm("run", str(tiny_gguf["q8_0"]), "-p", "ok?", "--grammar-file", str(grammar), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["text"] in ("yes", "no")
    schema = tmp_path / "s.json"
    schema.write_text('{"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}')
    r = edgelm("run", str(tiny_gguf["q8_0"]), "-p", "{", "--json-schema", f"@{schema}", "-n", "64", "--json")
    assert r.returncode == 0, r.stderr
    assert isinstance(json.loads(json.loads(r.stdout)["text"])["n"], int)
    r = edgelm("run", str(tiny_gguf["q8_0"]), "-p", "x", "--grammar-file", str(tmp_path / "none.gbnf"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot read the grammar" in r.stderr
    r = edgelm("run", str(tiny_gguf["q8_0"]), "-p", "ok?", "--grammar", 'root ::= "yes" | "no"', "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["text"] in ("yes", "no"), r.stderr
    r = edgelm("run", str(tiny_gguf["q8_0"]), "-p", "{", "--json-schema-file", str(schema), "-n", "64", "--json")
    assert r.returncode == 0 and isinstance(json.loads(json.loads(r.stdout)["text"])["n"], int), r.stderr
    r = edgelm("run", str(tiny_gguf["q8_0"]), "-p", "x", "--grammar", "root ::= [a]", "--grammar-file", str(grammar))
    assert r.returncode == 2 and "not both" in r.stderr


def test_run_dry_mirostat_xtc_flags(tiny_gguf):
    """llama.cpp's sampler flags reach the chain: DRY (no breakers) changes a greedy loop as the API's DRY does."""
    from edgelm import load

    prompt, model = "import os\nimport os\nimport", str(tiny_gguf["q8_0"])
    with load(model, n_threads=2) as m:
        ref = m.generate(prompt, max_tokens=32, temperature=0, ignore_eos=True, dry_multiplier=0.8,
                         dry_sequence_breakers=()).text
    r = edgelm("run", model, "-p", prompt, "-n", "32", "--temp", "0", "--ignore-eos", "--dry-multiplier", "0.8",
               "--dry-sequence-breaker", "none", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["text"] == ref
    r = edgelm("run", model, "-p", prompt, "-n", "8", "--mirostat", "2", "--mirostat-ent", "3", "--mirostat-lr",
               "0.2", "--xtc-probability", "0.5", "--top-nsigma", "1", "--dynatemp-range", "0.3", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["completion_tokens"] >= 1, r.stderr
    r = edgelm("run", model, "-p", "x", "--dry-base", "0.5")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "dry_base" in r.stderr
    # --samplers: only top-k (1) then temperature run, so the draw is the argmax whatever top-p and the seed say
    r = edgelm("run", model, "-p", prompt, "-n", "12", "--ignore-eos", "--samplers", "top_k;temperature", "--top-k",
               "1", "--top-p", "0.01", "--temp", "0.9", "--seed", "4", "--json")
    with load(model, n_threads=2) as m:
        assert json.loads(r.stdout)["text"] == m.generate(prompt, max_tokens=12, temperature=0, ignore_eos=True).text
    r = edgelm("run", model, "-p", "x", "--samplers", "top_k;nucleus")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nucleus" in r.stderr


def test_run_context_shift(tiny_gguf):
    args = ("run", str(tiny_gguf["q8_0"]), "-p", "x", "--ctx", "64", "-n", "600", "--temp", "0", "--ignore-eos",
            "--json")
    r = edgelm(*args)
    assert r.returncode == 0 and json.loads(r.stdout)["completion_tokens"] < 600, r.stderr
    r = edgelm(*args, "--context-shift", "--keep", "-1")
    out = json.loads(r.stdout)
    assert r.returncode == 0 and out["completion_tokens"] == 600 and out["finish_reason"] == "length", r.stderr


def test_run_prompt_cache_is_reused_by_a_later_run(tmp_path):
    from edgelm import corpus

    doc = corpus.text("heldout", max_chars=1600)
    cache = tmp_path / "kv"

    def run(prompt: str) -> dict:
        r = edgelm("run", "-p", prompt, "-n", "12", "--temp", "0", "--json", "--prompt-cache", str(cache),
                   "--prompt-cache-size", "64M")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    first = run(doc + " The first question")
    assert first["cached_tokens"] == 0 and list(cache.glob("*.kvc"))
    cold = edgelm("run", "-p", doc + " The second question", "-n", "12", "--temp", "0", "--json")
    second = run(doc + " The second question")
    assert second["cached_tokens"] > 300
    assert second["text"] == json.loads(cold.stdout)["text"]
    bad = edgelm("run", "-p", "x", "--prompt-cache", str(cache), "--prompt-cache-size", "lots")
    assert bad.returncode != 0 and "not a size" in bad.stderr


def test_run_chat_template_flags(tiny_gguf, tmp_path):
    """--chat-template NAME|JINJA and --chat-template-file replace the model's template, checked before use."""
    model = str(tiny_gguf["q8_0"])
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] ")
    base = ("run", model, "--chat", "-p", "Say hi", "-n", "8", "--temp", "0", "--json")
    for flags, override in ((("--chat-template", "chatml"), "chatml"),
                            (("--chat-template-file", str(template)), template.read_text())):
        with load(model, n_threads=2, chat_template=override) as m:
            want = m.chat([{"role": "user", "content": "Say hi"}], max_tokens=8, temperature=0).text
        r = edgelm(*base, *flags)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["text"] == want
    evil = tmp_path / "evil.jinja"
    evil.write_text("{{ messages.__class__.__mro__ }}")
    r = edgelm(*base, "--chat-template-file", str(evil))
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = edgelm(*base, "--chat-template", "chatml", "--chat-template-file", str(template))
    assert r.returncode == 2 and "not both" in r.stderr
