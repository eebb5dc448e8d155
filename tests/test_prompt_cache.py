"""Prefix KV reuse and the persistent prompt cache, on the bundled small model.

Every hit is checked against a cold run of the same prompt: greedy output with a cache hit
must equal the output without it. Damaged, foreign, old and half-written entries must be misses.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import edgelm
from edgelm import corpus
from edgelm.cache.prefix import PrefixTree
from edgelm.cache.prompt import FIXED, PromptCache
from edgelm.gguf_reader import read_gguf
from edgelm.runtime.canonical import FA_TILE, ROW_GROUP, SHORT_ROWS, batch_plan
from edgelm.runtime.model import default_model_path

from conftest import reweight_gguf

ROOT = Path(__file__).resolve().parents[1]
N_CTX = 1024
GEN = dict(max_tokens=16, temperature=0)


@pytest.fixture(scope="module")
def doc() -> str:
    """About 400 tokens of held-out text: the shared prefix."""
    return corpus.text("heldout", max_chars=1600)


@pytest.fixture(scope="module")
def cold():
    """Answers without any cache: every call starts from an empty KV."""
    with edgelm.load(n_ctx=N_CTX, n_threads=2, prefix_cache_bytes=0) as m:
        def answer(prompt, **kw):
            m.reset()
            return m.generate(prompt, **{**GEN, **kw})
        yield answer


def run_py(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


# ------------------------------------------------------------ the prefix index


def test_prefix_tree_agrees_with_brute_force():
    rng = random.Random(0)

    def lcp(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    for _ in range(200):
        tree, ref = PrefixTree(), {}
        for _ in range(50):
            if rng.random() < 0.6 or not ref:
                base = rng.choice(list(ref.values())) if ref and rng.random() < 0.7 else ()
                tokens = base[:rng.randrange(len(base) + 1)] + tuple(rng.randrange(4) for _ in range(rng.randrange(6)))
                key = rng.randrange(20)
                tree.insert(key, tokens)
                ref[key] = tokens
            else:
                key = rng.choice(list(ref))
                tree.remove(key)
                del ref[key]
            query = tuple(rng.randrange(4) for _ in range(rng.randrange(8)))
            if ref and rng.random() < 0.5:
                b = rng.choice(list(ref.values()))
                query = b[:rng.randrange(len(b) + 1)] + query
            best = max((lcp(v, query) for v in ref.values()), default=0)
            want = {k for k, v in ref.items() if lcp(v, query) == best} if best else set()
            assert tree.longest(query) == (best, want)
            assert len(tree) == len(ref)


# ------------------------------------------------------------ in process


def test_shared_prefix_is_reused_and_output_is_unchanged(doc, cold):
    a, b = doc + "\nThe end of the story is", doc + "\nAnd then the dragon"
    with edgelm.load(n_ctx=N_CTX, n_threads=2) as m:
        first = m.generate(a, **GEN)
        second = m.generate(b, **GEN)
        n_doc = len(m.tokenize(doc))
    assert first.timings.cached_tokens == 0
    # exact reuse leaves the last FA_TILE positions (and a row-group remainder) to evaluate canonically
    assert second.timings.cached_tokens >= second.timings.prompt_tokens - FA_TILE - ROW_GROUP
    assert second.timings.cached_tokens <= n_doc
    assert first.text == cold(a).text and second.text == cold(b).text


@pytest.mark.parametrize("model", ["small", "small q4_k_m"])
def test_without_flash_attention_exact_reuse_leaves_only_a_short_batch(model, small_q4_k_m, doc):
    """No tiled attention kernel to match: a hit re-evaluates SHORT_ROWS positions, not FA_TILE, and the output
    is still exactly a cold run's, from the live KV and from a RAM entry."""
    path = small_q4_k_m if model == "small q4_k_m" else None
    a, b = doc + "\nThe end of the story is", doc + "\nAnd then the dragon"
    options = dict(n_ctx=N_CTX, n_threads=2, flash_attn=False)
    with edgelm.load(path, prefix_cache_bytes=0, **options) as m:
        want = m.generate(b, **GEN).text
    with edgelm.load(path, **options) as m:
        m.generate(a, **GEN)
        live = m.generate(b, **GEN)
        m.generate("Something entirely different, about ships and the sea and sailors.", **GEN)
        restored = m.generate(b, **GEN)
        assert m.prompt_cache.stats["hits"] == 1
    for hit in (live, restored):
        assert hit.timings.prompt_tokens - SHORT_ROWS - ROW_GROUP < hit.timings.cached_tokens, hit.timings
        assert hit.text == want


def test_cached_sequence_is_restored_after_other_requests(doc, cold):
    a, b = doc + " Later that day", doc + " Early next morning"
    with edgelm.load(n_ctx=N_CTX, n_threads=2) as m:
        m.generate(a, **GEN)
        m.generate("Something entirely different, about ships and the sea and sailors.", **GEN)
        again = m.generate(b, **GEN)
        assert m.prompt_cache.stats["hits"] == 1
    assert again.timings.cached_tokens > 300
    assert again.text == cold(b).text


def test_a_whole_prompt_hit_still_evaluates_its_last_token(doc, cold):
    with edgelm.load(n_ctx=N_CTX, n_threads=2) as m:
        one = m.generate(doc, **GEN)
        two = m.generate(doc, **GEN)
    assert two.timings.prompt_tokens - FA_TILE - ROW_GROUP < two.timings.cached_tokens
    assert one.text == two.text == cold(doc).text


def test_chat_next_turn_reuses_its_history():
    messages = [{"role": "system", "content": "You are a storyteller. " * 20},
                {"role": "user", "content": "Tell me about a cat."}]
    with edgelm.load(n_ctx=N_CTX, n_threads=2) as m:
        first = m.chat(messages, **GEN)
        n_first = first.timings.prompt_tokens
        messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And a dog?"}]
        second = m.chat(messages, **GEN)
    assert second.timings.cached_tokens >= n_first - FA_TILE


def test_fast_reuse_takes_every_shared_token_and_off_takes_none(doc):
    a, b = doc + " The end of the story is", doc + " And then the dragon"
    with edgelm.load(n_ctx=N_CTX, n_threads=2, kv_reuse="fast") as m:
        m.generate(a, **GEN)
        n_doc = len(m.tokenize(doc))
        assert m.generate(b, **GEN).timings.cached_tokens >= n_doc - 2
    with edgelm.load(n_ctx=N_CTX, n_threads=2, kv_reuse="off") as m:
        m.generate(a, **GEN)
        assert m.generate(b, **GEN).timings.cached_tokens == 0
    with pytest.raises(edgelm.errors.UsageError, match="kv_reuse"):
        edgelm.load(n_ctx=256, kv_reuse="always")


@pytest.fixture(scope="module")
def small_q4_k_m(tmp_path_factory) -> Path:
    """The small model at Q4_K_M, whose K-quant weights llama.cpp repacks for the CPU's wide kernels."""
    from edgelm.converters import convert
    from edgelm.converters.quantize import quantize

    out = tmp_path_factory.mktemp("small")
    quantize(convert(ROOT / "models" / "small", out / "f16.gguf", outtype="f16").path, out / "q4_k_m.gguf", "q4_k_m")
    return out / "q4_k_m.gguf"


@pytest.mark.parametrize("model, flash_attn", [("small", None), ("tiny q8_0", None), ("tiny f16", None),
                                               ("small", False), ("small q4_k_m", False), ("small q4_k_m", None)])
def test_canonical_batches_reproduce_a_cold_prefill_bit_for_bit(model, flash_attn, tiny_gguf, small_q4_k_m, doc):
    """What exact reuse rests on: llama.cpp's logits do not depend on how a prompt is cut into
    canonical batches (each at least Context.canonical_rows long, starting at a multiple of ROW_GROUP):
    FA_TILE rows where the tiled flash attention kernel may run, SHORT_ROWS without flash attention."""
    import numpy as np

    if model.startswith("tiny "):
        path = tiny_gguf[model.removeprefix("tiny ")]
    else:
        path = small_q4_k_m if model == "small q4_k_m" else None  # None: the bundled model
    with edgelm.load(path, n_ctx=N_CTX, n_threads=2, n_batch=256, kv_reuse="off", prefix_cache_bytes=0,
                     flash_attn=flash_attn) as m:
        ids = m.tokenize(doc + doc)[:700]
        ctx = m.ctx
        rows = ctx.canonical_rows
        assert rows == (SHORT_ROWS if flash_attn is False else FA_TILE)

        def logits(start_points):
            ctx.clear()
            for i, n in enumerate(start_points):
                end = start_points[i + 1] if i + 1 < len(start_points) else len(ids)
                for lo, hi in batch_plan(n, end, ctx.n_batch, rows):
                    ctx.decode(ids[lo:hi], lo, logits_last=hi == len(ids))
            return ctx.logits()

        cold = logits([0])
        last = len(ids) - rows - len(ids) % ROW_GROUP  # the latest start with a canonical batch after it
        for points in ([0, 300], [0, 64, 400], [0, last], [0, 128, 256, 512], [0, 256, last - rows]):
            assert np.array_equal(logits(points), cold), points
        ctx.clear()
        ctx.decode(ids[:-8], 0)
        ctx.decode(ids[-8:], len(ids) - 8)  # a short batch: llama.cpp's other kernels round differently
        short = ctx.logits()
    if model == "small" and flash_attn is None:
        assert not np.array_equal(short, cold), "if this starts to hold, exact reuse could take more"


def test_batch_plan():
    assert batch_plan(0, 63, 512) is None and batch_plan(2, 200, 512) is None
    assert batch_plan(0, 64, 512) == [(0, 64)]
    assert batch_plan(0, 1030, 512) == [(0, 512), (512, 964), (964, 1030)]
    for start, end in ((0, 1100), (4, 517), (64, 640), (0, 513)):
        plan = batch_plan(start, end, 512)
        assert plan[0][0] == start and plan[-1][1] == end
        assert all(b - a >= FA_TILE and b - a <= 512 for a, b in plan)
        assert all(a % ROW_GROUP == 0 for a, _ in plan)


def test_ram_budget_is_kept(doc):
    with edgelm.load(n_ctx=N_CTX, n_threads=2) as m:
        m.generate(doc, max_tokens=1, temperature=0)
        one = m.prompt_cache.ram_used
        assert one > 0
    budget = int(one * 2.5)
    with edgelm.load(n_ctx=N_CTX, n_threads=2, prefix_cache_bytes=budget) as m:
        for i in range(6):
            m.generate(f"Story number {i}. " + doc, max_tokens=1, temperature=0)
            assert 0 < m.prompt_cache.ram_used <= budget


def test_bad_cache_options_are_clear_errors(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(edgelm.errors.UsageError, match="prompt cache"):
        edgelm.load(n_ctx=256, prompt_cache=blocker)
    with pytest.raises(edgelm.errors.UsageError, match="ram_bytes"):
        edgelm.load(n_ctx=256, prefix_cache_bytes=-1)


# ------------------------------------------------------------ on disk, across processes

WRITER = """
import json, sys
import edgelm
path, n_ctx, prompt = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with edgelm.load(n_ctx=n_ctx, n_threads=2, prompt_cache=path, prefix_cache_bytes=0) as m:
    out = m.generate(prompt, max_tokens=16, temperature=0)
print(json.dumps({"text": out.text, "cached": out.timings.cached_tokens, "ttft": out.timings.ttft_s}))
"""


def write_entry(path: Path, prompt: str, n_ctx: int = N_CTX) -> dict:
    r = run_py(WRITER, str(path), str(n_ctx), prompt)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.splitlines()[-1])


def entries(path: Path) -> list[Path]:
    return sorted(path.glob("*.kvc"))


def test_a_later_process_reuses_the_prompt_cache(tmp_path, doc, cold):
    first = write_entry(tmp_path, doc + " The moral of the story")
    assert first["cached"] == 0 and len(entries(tmp_path)) == 1
    assert entries(tmp_path)[0].stat().st_mode & 0o777 == 0o600  # what prompts said stays the owner's
    prompt = doc + " Meanwhile, far away"
    later = write_entry(tmp_path, prompt)
    assert later["cached"] > 300
    assert later["text"] == cold(prompt).text


def _fresh_answer(path: Path, prompt: str, caplog) -> edgelm.api.Completion:
    with caplog.at_level(logging.DEBUG, logger="edgelm.cache"):
        with edgelm.load(n_ctx=N_CTX, n_threads=2, prompt_cache=path, prefix_cache_bytes=0) as m:
            return m.generate(prompt, **GEN)


def _damage(entry: Path, how: str) -> None:
    raw = bytearray(entry.read_bytes())
    if how == "payload bit flip":
        raw[-100] ^= 0x10
    elif how == "token changed":
        hlen = FIXED.unpack_from(raw)[2]
        raw[FIXED.size + hlen + 8] ^= 0x01
    elif how == "truncated":
        raw = raw[:len(raw) // 2]
    elif how == "old format version":
        raw[8:12] = (0).to_bytes(4, "little")
    elif how == "bad magic":
        raw[:8] = b"GGSQ\0\0\0\0"
    elif how == "header garbage":
        raw[FIXED.size:FIXED.size + 8] = b"\xff" * 8
    elif how == "empty":
        raw = bytearray()
    entry.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["payload bit flip", "token changed", "truncated", "old format version", "bad magic",
                                 "header garbage", "empty"])
def test_damaged_entries_are_misses(tmp_path, doc, cold, caplog, how):
    prompt = doc + " Suddenly"
    write_entry(tmp_path, prompt)
    (entry,) = entries(tmp_path)
    _damage(entry, how)
    out = _fresh_answer(tmp_path, prompt, caplog)
    assert out.timings.cached_tokens == 0
    assert out.text == cold(prompt).text
    assert any(r.name == "edgelm.cache" for r in caplog.records), "a miss leaves a debug line"


def test_other_context_settings_are_misses(tmp_path, doc, caplog):
    prompt = doc + " In the end"
    write_entry(tmp_path, prompt, n_ctx=2048)
    out = _fresh_answer(tmp_path, prompt, caplog)
    assert out.timings.cached_tokens == 0
    assert "n_ctx=2048" in caplog.text


def test_foreign_model_entry_is_a_miss(tmp_path, tiny_gguf, doc, cold, caplog):
    """An entry another model wrote, placed under the very name this model would look for."""
    prompt = doc + " At last"
    r = run_py("""
        import sys, edgelm
        with edgelm.load(sys.argv[1] or None, n_ctx=1024, n_threads=2, prompt_cache=sys.argv[2], prefix_cache_bytes=0) as m:
            ids = m.tokenize(sys.argv[3])
        with edgelm.load(sys.argv[4], n_ctx=1024, n_threads=2, prompt_cache=sys.argv[2], prefix_cache_bytes=0) as t:
            t.generate([i % t.llama.n_vocab for i in ids], max_tokens=4, temperature=0)
        print(m.prompt_cache._key(ids))
        """, "", str(tmp_path), prompt, str(tiny_gguf["q8_0"]))
    assert r.returncode == 0, r.stderr[-2000:]
    (foreign,) = entries(tmp_path)
    foreign.rename(tmp_path / f"{r.stdout.split()[-1]}.kvc")
    out = _fresh_answer(tmp_path, prompt, caplog)
    assert out.timings.cached_tokens == 0 and out.text == cold(prompt).text
    assert "made with model=" in caplog.text


def test_entry_of_the_model_before_its_weights_changed_is_a_miss(tmp_path, doc, caplog):
    """The same header and tensor table with other weights (a retrained or requantized model written over the
    old file): the fingerprint samples the tensor data, so the old KV is never used."""
    model, cache = tmp_path / "m.gguf", tmp_path / "cache"
    shutil.copy(default_model_path(), model)
    prompt = doc + " Years later"
    options = dict(n_ctx=N_CTX, n_threads=2, prompt_cache=cache, prefix_cache_bytes=0)
    with edgelm.load(model, **options) as m:
        m.generate(prompt, **GEN)
    assert len(entries(cache)) == 1
    header = read_gguf(model).data_offset
    before = model.read_bytes()[:header]
    reweight_gguf(model)
    assert model.read_bytes()[:header] == before
    with caplog.at_level(logging.DEBUG, logger="edgelm.cache"), edgelm.load(model, **options) as m:
        assert m.generate(prompt, **GEN).timings.cached_tokens == 0
    assert "made with model=" in caplog.text


def test_symlinked_entries_are_not_followed(tmp_path, doc, caplog):
    outside, inside = tmp_path / "outside", tmp_path / "cache"
    prompt = doc + " The next day"
    write_entry(outside, prompt)
    inside.mkdir()
    (entry,) = entries(outside)
    (inside / entry.name).symlink_to(entry)
    out = _fresh_answer(inside, prompt, caplog)
    assert out.timings.cached_tokens == 0


def test_disk_budget_evicts_oldest_entries(tmp_path, doc):
    write_entry(tmp_path, doc + " Zero")
    size = entries(tmp_path)[0].stat().st_size
    budget = int(size * 2.5)
    code = """
        import sys, edgelm
        with edgelm.load(n_ctx=1024, n_threads=2, prompt_cache=sys.argv[1], prompt_cache_bytes=int(sys.argv[2]),
                         prefix_cache_bytes=0) as m:
            for i in range(5):
                m.reset()
                m.generate(f"Chapter {i}. " + sys.argv[3], max_tokens=1, temperature=0)
                print(m.prompt_cache.disk_used(), flush=True)
        """
    r = run_py(code, str(tmp_path), str(budget), doc)
    assert r.returncode == 0, r.stderr[-2000:]
    assert all(int(used) <= budget for used in r.stdout.split())
    assert sum(p.stat().st_size for p in entries(tmp_path)) <= budget
    assert len(entries(tmp_path)) == 2


def _check_every_entry(path: Path, n_ctx: int = N_CTX) -> int:
    """Read every entry in `path` as a restore would; returns how many were sound (raises on a torn one)."""
    with edgelm.load(n_ctx=n_ctx, n_threads=2, prompt_cache=path, prefix_cache_bytes=0) as m:
        cache: PromptCache = m.prompt_cache
        cache.lookup([1])  # index the folder
        sound = list(cache._entries.values())
        for entry in sound:
            assert cache._read(entry)  # CacheMiss on a bad checksum or a short file
    assert len(sound) == len(entries(path)), "every file in the folder is a valid entry"
    return len(sound)


def test_concurrent_writers_leave_no_torn_entry(tmp_path, doc):
    code = """
        import sys, edgelm
        with edgelm.load(n_ctx=1024, n_threads=1, prompt_cache=sys.argv[1], prefix_cache_bytes=0) as m:
            for i in range(8):
                m.reset()
                m.generate(f"Part {i % 4}. " + sys.argv[2], max_tokens=2, temperature=0)
        """
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(tmp_path), doc[:800]], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    assert _check_every_entry(tmp_path) == 4  # both wrote the same four prompts: one entry each
    assert not list(tmp_path.glob(".*.part"))


def test_writer_killed_mid_write_leaves_no_entry(tmp_path, doc, cold):
    """The writer is stopped inside the fsync of its temporary file and killed with SIGKILL there."""
    code = """
        import os, sys, time, edgelm
        def stalled_fsync(fd):
            print("writing", flush=True)
            time.sleep(60)
        os.fsync = stalled_fsync
        with edgelm.load(n_ctx=1024, n_threads=2, prompt_cache=sys.argv[1], prefix_cache_bytes=0) as m:
            m.generate(sys.argv[2], max_tokens=2, temperature=0)
        """
    prompt = doc + " Once more"
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(tmp_path), prompt], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert p.stdout.readline().strip() == "writing"
        assert list(tmp_path.glob(".*.part")), "the kill lands while the temporary file exists"
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait(timeout=30)
    assert entries(tmp_path) == []
    (part,) = tmp_path.glob(".*.part")
    with edgelm.load(n_ctx=N_CTX, n_threads=2, prompt_cache=tmp_path, prefix_cache_bytes=0) as m:
        out = m.generate(prompt, **GEN)
        assert out.timings.cached_tokens == 0 and out.text == cold(prompt).text
        old = time.time() - 2 * 3600  # a dead writer's leftovers are swept once they are old
        os.utime(part, (old, old))
        m.generate("Another story. " + doc, **GEN)  # its store makes the cache look at its folder again
    assert not part.exists()
    assert _check_every_entry(tmp_path) == 2
