"""Process-wide llama.cpp state: backend initialisation, log routing, and the CPU backend's worker threads.

llama.cpp prints to stderr unless given a log callback; edgelm is quiet by
default and routes llama.cpp's lines to the `edgelm.llama` logger instead.

Worker threads: llama.cpp's CPU backend, built with GCC's OpenMP (libgomp, the Linux default), keeps a pool of
n_threads - 1 workers for every thread of the process that has run a graph. Once the pools together outnumber
the CPUs, libgomp cuts its spin at every barrier from 300,000 turns to 100 (gomp_throttled_spin_count), the
workers sleep in the kernel between graph nodes, and decoding runs at half speed (measured on 2 cores, 2
threads, the small model: 600-700 t/s instead of 1,300-1,500). Two such threads in one process are common: an
app that loads the model on its UI thread and generates on a worker, a server that loads on its main thread and
decodes on its engine thread, a router's engines (one per model). So a thread lets its pool go
(`release_workers`) after a load and after every call (`running_graphs`), and an engine whenever it goes idle;
its next graph starts a fresh pool, about 0.2 ms. A pool kept between calls would
throttle every later call from another thread, which cannot let it go: libgomp frees only the caller's pool
(measured: a worker thread at 284-540 t/s after one call on the main thread, 836-949 t/s without its pool).
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading

import llama_cpp as lib

log = logging.getLogger("edgelm.llama")
_lock = threading.Lock()
_initialised = False
_verbose = False
_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}  # GGML_LOG_LEVEL_*


@lib.llama_log_callback
def _on_log(level: int, text: bytes, _user_data) -> None:
    if _verbose:
        import sys

        sys.stderr.write(text.decode("utf-8", "replace"))
    elif log.isEnabledFor(logging.DEBUG):
        log.debug(text.decode("utf-8", "replace").rstrip("\n"))


def set_verbose(verbose: bool) -> None:
    """Show llama.cpp's own log lines on stderr (the CLI's --verbose)."""
    global _verbose
    _verbose = verbose


def ensure_backend() -> None:
    global _initialised
    with _lock:
        if _initialised:
            return
        lib.llama_log_set(_on_log, None)
        lib.llama_backend_init()
        _initialised = True


def system_info() -> str:
    ensure_backend()
    return lib.llama_print_system_info().decode()


def supports_rpc() -> bool:
    return bool(lib.llama_supports_rpc())


# ---------------------------------------------------------------- the CPU backend's worker pools

_gomp = None  # omp_pause_resource_all of the libgomp llama.cpp loaded; False: none


def _pause_resource_all():
    global _gomp
    if _gomp is None:
        _gomp = False
        try:  # RTLD_NOLOAD: only a libgomp already in the process, the one llama.cpp's CPU backend uses
            _gomp = ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD | os.RTLD_LAZY).omp_pause_resource_all
            _gomp.argtypes, _gomp.restype = [ctypes.c_int], ctypes.c_int
        except (OSError, AttributeError):  # no OpenMP, another runtime (LLVM's pauses every thread), not Linux
            pass
    return _gomp or None


def release_workers() -> None:
    """Let the calling thread's OpenMP pool go (libgomp frees only the caller's); its next graph starts a new one."""
    pause = _pause_resource_all()
    if pause is not None:
        pause(1)  # omp_pause_soft


@contextlib.contextmanager
def running_graphs():
    """Around a call that runs llama.cpp graphs on this thread: the call lets this thread's pool go when it ends,
    so that the next call, whichever thread makes it, finds no other pool."""
    me = threading.current_thread()
    try:
        yield
    finally:
        # a stream's generator may be closed by the garbage collector, on another thread: only the thread that
        # ran the graphs can let its own pool go
        if threading.current_thread() is me:
            release_workers()
