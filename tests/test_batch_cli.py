"""`edgelm batch`: a JSONL file of prompts through the continuous-batching engine, resumable."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["def main():\n", {"id": "hist", "prompt": "The history of the"}, "import numpy as np\n",
           {"prompt": "class Stack:\n", "max_tokens": 3},
           {"id": "chat", "messages": [{"role": "user", "content": "Say hello."}]}, "Once upon a time"]


def batch(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgelm", "batch", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def write_prompts(path: Path, prompts) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts), encoding="utf-8")
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_batch_writes_one_line_per_prompt(tmp_path):
    src, out = write_prompts(tmp_path / "in.jsonl", PROMPTS), tmp_path / "out.jsonl"
    r = batch(str(src), "-o", str(out), "--parallel", "3", "--temp", "0", "-n", "8", "--threads", "2")
    assert r.returncode == 0, r.stderr
    rows = sorted(read(out), key=lambda row: row["index"])
    assert [row["index"] for row in rows] == list(range(len(PROMPTS)))
    assert [row["id"] for row in rows] == [None, "hist", None, None, "chat", None]
    assert all(row["finish_reason"] in ("stop", "length") and row["completion_tokens"] <= 8 for row in rows)
    assert rows[3]["completion_tokens"] <= 3  # a per-line override
    again = batch(str(src), "-o", str(out), "--temp", "0", "-n", "8")
    assert again.returncode == 0 and "already" in again.stderr and len(read(out)) == len(PROMPTS)


def test_resume_skips_done_lines_and_drops_a_torn_one(tmp_path):
    src, out = write_prompts(tmp_path / "in.jsonl", PROMPTS), tmp_path / "out.jsonl"
    out.write_text(json.dumps({"index": 1, "id": "hist", "text": "PRESERVED", "finish_reason": "stop",
                               "prompt_tokens": 1, "completion_tokens": 1}) + "\n" + '{"index": 2, "te')
    r = batch(str(src), "-o", str(out), "--temp", "0", "-n", "4", "--threads", "2")
    assert r.returncode == 0, r.stderr
    rows = read(out)
    assert sorted(row["index"] for row in rows) == list(range(len(PROMPTS)))
    assert next(row for row in rows if row["index"] == 1)["text"] == "PRESERVED"


def test_a_killed_run_resumes_where_it_stopped(tmp_path):
    prompts = [f"Story number {i}:" for i in range(24)]
    src, out = write_prompts(tmp_path / "in.jsonl", prompts), tmp_path / "out.jsonl"
    p = subprocess.Popen([sys.executable, "-m", "edgelm", "batch", str(src), "-o", str(out), "--parallel", "2",
                          "-n", "48", "--temp", "0", "--ignore-eos", "--threads", "2"], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out.exists() and out.read_text().count("\n") >= 3):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    first = out.read_text().count("\n")
    assert 3 <= first < len(prompts), "killed part-way"
    r = batch(str(src), "-o", str(out), "--parallel", "2", "-n", "48", "--temp", "0", "--ignore-eos",
              "--threads", "2")
    assert r.returncode == 0, r.stderr
    indices = [row["index"] for row in read(out)]
    assert sorted(indices) == list(range(len(prompts)))  # every prompt once: none lost, none twice


def test_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"fine"\n{not json\n')
    r = batch(str(bad), "-o", str(tmp_path / "o.jsonl"))
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "bad.jsonl:2" in r.stderr
    bad.write_text('{"text": "no prompt"}\n')
    r = batch(str(bad), "-o", str(tmp_path / "o.jsonl"))
    assert r.returncode != 0 and "bad.jsonl:1" in r.stderr
    bad.write_text('{"prompt": "x", "temperature": -1}\n')
    r = batch(str(bad), "-o", str(tmp_path / "o.jsonl"))
    assert r.returncode != 0 and "temperature" in r.stderr and not (tmp_path / "o.jsonl").exists()
    for line in ({"prompt": "word " * 300}, {"messages": [{"role": "user", "content": "word " * 300}]}):
        bad.write_text(json.dumps("fine") + "\n" + json.dumps(line) + "\n")
        r = batch(str(bad), "-o", str(tmp_path / "o.jsonl"), "--ctx", "128")
        assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
        assert "bad.jsonl:2" in r.stderr and "context" in r.stderr and not (tmp_path / "o.jsonl").exists()


def test_batch_outputs_are_the_python_apis(tmp_path):
    import edgelm

    prompts = ["def main():\n", {"prompt": "import numpy as np\n", "logprobs": 2}, "Once upon a time"]
    src, out = write_prompts(tmp_path / "in.jsonl", prompts), tmp_path / "out.jsonl"
    r = batch(str(src), "-o", str(out), "--parallel", "3", "--temp", "0", "-n", "12", "--threads", "2",
              "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = sorted(read(out), key=lambda row: row["index"])
    with edgelm.load(n_ctx=512, n_threads=2, prefix_cache_bytes=0) as m:
        ref = m.generate("import numpy as np\n", max_tokens=12, temperature=0, logprobs=2)
        assert [row["text"] for row in rows] == [
            m.generate(p if isinstance(p, str) else p["prompt"], max_tokens=12, temperature=0).text for p in prompts]
    assert "logprobs" not in rows[0]
    assert [x["token"] for x in rows[1]["logprobs"]] == ref.tokens
    assert [x["logprob"] for x in rows[1]["logprobs"]] == pytest.approx([lp.logprob for lp in ref.logprobs],
                                                                        abs=1e-3)
