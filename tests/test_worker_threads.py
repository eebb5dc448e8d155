"""One pool of llama.cpp's OpenMP workers per process (edgelm/runtime/backend.py).

libgomp keeps a pool of n_threads - 1 workers for every thread that has run a graph, and decoding slows to half
speed once the pools outnumber the CPUs. The scenarios run in a fresh process, which counts its native threads
(/proc/self/task) while each call decodes: the count says how many pools are alive, with no timing involved.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir() or not sys.platform.startswith("linux"),
                                reason="counts threads through Linux's /proc")

SETUP = r"""
import ctypes, json, os, threading, time
import edgelm
from edgelm.engine import Engine, EngineOptions
from edgelm.runtime.sampling import SamplingParams

def native_threads():  # of this process, minus the calling thread when it is not the main one
    # threads of a pool let go, or of a thread that ended, leave a moment later: count once the number is still
    last, still = -1, 0
    for _ in range(300):
        n = len(os.listdir("/proc/self/task"))
        still = still + 1 if n == last else 0
        if still == 5:
            break
        last = n
        time.sleep(0.01)
    return n - (threading.current_thread() is not threading.main_thread())

seen = {"start": native_threads()}
model = edgelm.load(None, n_threads=2, prefix_cache_bytes=0)
try:
    ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
except OSError:
    print(json.dumps({"openmp": False}))
    raise SystemExit
seen["loaded"] = native_threads()

def generate(tag):
    for i, _ in enumerate(model.stream("def f", max_tokens=4, temperature=0, ignore_eos=True)):
        if i == 2:  # mid-generation
            seen[tag] = native_threads()

def in_thread(tag):
    t = threading.Thread(target=generate, args=(tag,))
    t.start()
    t.join()
"""
SCENARIO = SETUP + r"""
with Engine(model.llama, EngineOptions(n_parallel=2, n_ctx=256, n_threads=2)) as engine:
    seen["engine_warm"] = native_threads() - 1
    req = engine.submit(model.tokenize("def f"), SamplingParams(max_tokens=240, temperature=0, ignore_eos=True))
    for i, _ in enumerate(req):
        if i == 2:  # mid-generation
            seen["engine_decoding"] = native_threads() - 1
    seen["engine_idle"] = native_threads() - 1
in_thread("worker")
in_thread("worker2")
generate("main")  # the only thread alive
seen["after_main"] = native_threads()
in_thread("worker3")  # a worker after a call on the main thread: the case a kept pool would slow down
generate("main2")
seen["idle"] = native_threads()
print(json.dumps(seen))
"""


def run(script: str) -> dict:
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    if seen.get("openmp") is False:
        pytest.skip("llama.cpp's CPU backend runs without libgomp here")
    return seen


@pytest.fixture(scope="module")
def seen() -> dict:
    return run(SCENARIO)


def test_loading_leaves_no_pool_behind(seen):
    # the load's warm-up decode ran on the main thread; a worker thread that generates next must not find its pool
    assert seen["loaded"] == seen["start"]
    assert seen["worker"] == seen["worker2"] == seen["start"] + 1  # one pool: n_threads - 1 = 1 worker


def test_every_call_lets_its_pool_go(seen):
    # even the main thread alone lets its pool go when a call ends, so a worker that generates next finds none
    assert seen["main"] == seen["main2"] == seen["start"] + 1
    assert seen["after_main"] == seen["idle"] == seen["start"]
    assert seen["worker3"] == seen["start"] + 1


def test_a_threaded_engine_keeps_a_pool_only_while_it_decodes(seen):
    # the engine thread itself is not counted. Idle, after its warm-up and after its requests, it has let its pool
    # go, so that another engine (router mode: a model each) decodes without meeting it
    assert seen["engine_decoding"] == seen["start"] + 1
    assert seen["engine_warm"] == seen["engine_idle"] == seen["start"]


# an app's other thread, which runs no graphs, is alive while the main thread generates
COMPANY = SETUP + r"""
generate("main")
seen["after_main"] = native_threads()
company = threading.Event()
idle = threading.Thread(target=company.wait)
idle.start()
generate("main_in_company")
seen["after_company"] = native_threads() - 1  # minus the idle thread
company.set()
idle.join()
in_thread("worker")
print(json.dumps(seen))
"""


def test_a_call_lets_its_pool_go_with_or_without_another_thread():
    seen = run(COMPANY)
    assert seen["main"] == seen["start"] + 1 and seen["after_main"] == seen["start"]
    assert seen["main_in_company"] == seen["start"] + 2  # its pool's worker and the idle thread
    assert seen["after_company"] == seen["start"]
    assert seen["worker"] == seen["start"] + 1  # one pool: the worker's own
