"""Process-wide llama.cpp state: backend initialisation and log routing.

llama.cpp prints to stderr unless given a log callback; edgelm is quiet by
default and routes llama.cpp's lines to the `edgelm.llama` logger instead.
"""
from __future__ import annotations

import logging
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
