"""Memory-fit checks (edgelm/runtime/memory.py): the estimate against llama.cpp's own buffer sizes, and a load
that would not fit refused before llama.cpp allocates anything."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

import edgelm
from edgelm.errors import InsufficientMemoryError
from edgelm.gguf_reader import read_gguf
from edgelm.runtime import memory
from edgelm.runtime.model import default_model_path

MIB = 1 << 20


def llama_cpp_sizes(model, *flags: str) -> tuple[float, float]:
    """(KV cache MiB, compute buffer MiB) as llama.cpp's own log reports them for `edgelm run --verbose`."""
    r = subprocess.run([sys.executable, "-m", "edgelm", "run", str(model), "--verbose", "-p", "x", "-n", "1",
                        "--threads", "2", *flags], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    kv = re.search(r"llama_kv_cache: size =\s*([0-9.]+) MiB", r.stderr)
    compute = re.search(r"CPU compute buffer size =\s*([0-9.]+) MiB", r.stderr)
    return float(kv.group(1)), float(compute.group(1))


@pytest.mark.parametrize("which, ctx, flags", [
    ("small", 2048, ()),
    ("small", 4096, ("-ctk", "q8_0", "-ctv", "q8_0")),
    ("small", 1024, ("-fa", "off", "-ctk", "f32")),
    ("tiny", 512, ()),
])
def test_estimate_against_llama_cpp(tiny_gguf, which, ctx, flags):
    model = default_model_path() if which == "small" else tiny_gguf["q8_0"]
    kv, compute = llama_cpp_sizes(model, "--ctx", str(ctx), *flags)
    opts = dict(zip(flags[::2], flags[1::2]))
    est = memory.estimate([read_gguf(model, keep_arrays=False)], n_ctx=ctx, type_k=opts.get("-ctk", "f16"),
                          type_v=opts.get("-ctv", "f16"), flash_attn=False if opts.get("-fa") == "off" else None)
    assert est.kv / MIB == pytest.approx(kv, abs=0.01)  # the KV cache exactly
    assert compute <= est.compute / MIB <= 1.5 * compute  # the compute buffer from above, not far
    assert est.weights == sum(t.n_bytes for t in read_gguf(model, keep_arrays=False).tensors)


def test_a_load_that_would_not_fit_is_refused_before_llama_cpp(monkeypatch):
    monkeypatch.setattr(memory, "available", lambda: 40 * MIB)  # a small board's free memory
    with pytest.raises(InsufficientMemoryError, match=r"needs about .* \(weights .*KV cache 16 MiB for 2,048 "
                                                      r"tokens.*but 40 MiB is available"):
        edgelm.load(n_ctx=2048)
    with edgelm.load(n_ctx=2048, n_threads=2, memory_check=False) as m:  # the caller's call
        assert m.generate("def f():", max_tokens=2, temperature=0).timings.completion_tokens == 2
    with edgelm.load(n_ctx=256, n_threads=2) as m:  # a context that fits
        assert m.n_ctx == 256


def test_gpu_offload_takes_layers_off_the_host_estimate():
    g = read_gguf(default_model_path(), keep_arrays=False)
    host = memory.estimate([g], n_ctx=2048)
    half = memory.estimate([g], n_ctx=2048, n_gpu_layers=8)
    assert half.weights < host.weights and half.kv == host.kv // 2


@pytest.mark.parametrize("command", [("run", "-p", "hi"), ("serve",), ("batch", "x.jsonl", "-o", "y.jsonl")])
def test_cli_refuses_in_one_line(command, tmp_path):
    if command[0] == "batch":
        (tmp_path / "x.jsonl").write_text('"hi"\n')
    r = subprocess.run([sys.executable, "-m", "edgelm", *command, "--ctx", "50000000"], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    line, = r.stderr.strip().splitlines()
    assert "needs about" in line and "is available" in line and "--no-mem-check" in line


def test_a_draft_model_counts_toward_the_fit(monkeypatch, tiny_gguf):
    """A draft model gets a context of its own beside the target's: both must fit, and the error says so."""
    alone = memory.ensure_fits(default_model_path(), n_ctx=1024)
    both = memory.ensure_fits(default_model_path(), n_ctx=1024, draft=tiny_gguf["q8_0"])
    draft = memory.estimate([read_gguf(tiny_gguf["q8_0"], keep_arrays=False)], n_ctx=1024)
    assert both.total == alone.total + draft.total and draft.kv > 0
    monkeypatch.setattr(memory, "available", lambda: (alone.total + both.total) // 2)  # room for the target alone
    with pytest.raises(InsufficientMemoryError, match=r"draft model \d+ MiB\).* is available"):
        edgelm.load(n_ctx=1024, draft=tiny_gguf["q8_0"])
    with edgelm.load(n_ctx=1024, n_threads=2) as m:
        assert m.n_ctx == 1024


def test_cgroup_room_leaves_out_the_page_cache_it_can_reclaim(tmp_path):
    from edgelm.runtime.memory import _cgroup_room

    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text("0::/app.slice/edgelm\n")
    group = tmp_path / "sys/fs/cgroup/app.slice/edgelm"
    group.mkdir(parents=True)
    (group / "memory.max").write_text("8000\n")
    (group / "memory.current").write_text("7000\n")  # 3000 of it inactive page cache
    (group / "memory.stat").write_text("anon 3500\nfile 3500\nactive_file 500\ninactive_file 3000\n")
    assert _cgroup_room(tmp_path) == 8000 - 4000
    (group / "memory.stat").unlink()  # without the breakdown: all of memory.current counts
    assert _cgroup_room(tmp_path) == 1000
    (group / "memory.max").write_text("max\n")
    assert _cgroup_room(tmp_path) is None
    assert _cgroup_room(tmp_path / "elsewhere") is None  # not cgroup v2
