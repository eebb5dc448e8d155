"""What llama-server's /slots routes ask of the batching engine's slots: their states, and their KV saved to a file,
restored from one (in this process or a later one) or erased. A slot file is a prompt-cache state file
(cache/prompt.py: the tokens, the exactly evaluated prefix, llama.cpp's sequence state, checked on reading against
the model, the context and llama.cpp's version). Saving, restoring and erasing run on the engine's thread between
steps, on an idle slot.
"""
from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import llama_cpp as lib

from .cache.prompt import CacheMiss, read_state_header, read_state_payload, state_signature, write_state
from .errors import UsageError

if TYPE_CHECKING:
    from .engine import _Slot
    from .request import Request


class SlotFiles:
    """Engine methods over its slots (`_slots`), context (`ctx`) and options."""

    def slot_states(self) -> list[tuple[int, Request | None, bool]]:
        """(slot, the request it serves or served last, whether it is serving it now), read from any thread."""
        return [(s.seq, s.last, s.req is not None) for s in self._slots]

    def save_slot(self, index: int, path: Path):
        """Write slot `index`'s KV to `path`: a Future of {"n_saved": tokens, "n_written": bytes}."""
        return self.call(lambda: self._save_slot(self._idle_slot(index), path))

    def restore_slot(self, index: int, path: Path):
        """Load slot `index`'s KV from `path`: a Future of {"n_restored": tokens, "n_read": bytes}."""
        return self.call(lambda: self._restore_slot(self._idle_slot(index), path))

    def erase_slot(self, index: int):
        """Drop slot `index`'s KV: a Future of {"n_erased": tokens}."""
        def erase():
            slot = self._idle_slot(index)
            n = len(slot.held)
            self.ctx.remove(slot.seq)
            slot.held, slot.exact, slot.adapters = [], 0, None
            return {"n_erased": n}
        return self.call(erase)

    def _idle_slot(self, index: int) -> _Slot:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self._slots):
            raise UsageError(f"no slot {index!r}: the slots are 0..{len(self._slots) - 1}")
        slot = self._slots[index]
        if slot.req is not None:
            raise UsageError(f"slot {index} is serving a request; try again when it is idle")
        return slot

    def _save_slot(self, slot: _Slot, path: Path) -> dict:
        if not slot.held:
            raise UsageError(f"slot {slot.seq} holds no prompt to save")
        if slot.adapters is not None:
            raise UsageError(f"slot {slot.seq} holds KV computed under per-request LoRA scales; it is not saved")
        size = lib.llama_state_seq_get_size(self.ctx.ptr, slot.seq)
        payload = bytearray(size)
        if size <= 0 or lib.llama_state_seq_get_data(self.ctx.ptr, (ctypes.c_uint8 * size).from_buffer(payload),
                                                     size, slot.seq) != size:
            raise UsageError(f"slot {slot.seq}: llama.cpp could not serialize its KV")
        t0 = time.perf_counter()
        try:
            write_state(path, state_signature(self.ctx), slot.held, slot.exact, payload)
        except OSError as e:
            raise UsageError(f"{path.name}: cannot write ({e.strerror or e})") from None
        return {"n_saved": len(slot.held), "n_written": path.stat().st_size,
                "save_ms": (time.perf_counter() - t0) * 1e3}

    def _restore_slot(self, slot: _Slot, path: Path) -> dict:
        t0 = time.perf_counter()
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path.name}: no such slot file") from None
        except OSError as e:
            raise UsageError(f"{path.name}: cannot open ({e.strerror or e})") from None
        with os.fdopen(fd, "rb") as f:
            try:  # a sequence holds at most a slot's context
                header, tokens = read_state_header(f, path.name, os.fstat(f.fileno()).st_size,
                                                   state_signature(self.ctx), self.options.n_ctx)
                payload = read_state_payload(f, path.name, header, tokens)
            except CacheMiss as why:
                raise UsageError(f"not a slot file this server can restore: {why}") from None
        self.ctx.remove(slot.seq)
        slot.held, slot.exact, slot.adapters = [], 0, None
        buf = (ctypes.c_uint8 * len(payload)).from_buffer(payload)
        if lib.llama_state_seq_set_data(self.ctx.ptr, buf, len(payload), slot.seq) != len(payload):
            self.ctx.remove(slot.seq)
            raise UsageError(f"{path.name}: llama.cpp refused the state")
        slot.held, slot.exact = list(tokens), header["exact"]
        return {"n_restored": len(tokens), "n_read": path.stat().st_size,
                "restore_ms": (time.perf_counter() - t0) * 1e3}
