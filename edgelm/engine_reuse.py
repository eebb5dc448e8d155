"""How the batching engine's slots reuse KV they or others already hold: a request keeps the prefix its slot
holds, copies a longer one from another slot or the prompt cache, or waits for another slot that is prefilling the
same prefix and copies it then (requests that arrive together behind one system prompt, the n choices of one).
Every reuse keeps to the exact-reuse rule (runtime/canonical.py), so a reused prefix gives a cold run's output,
and only KV computed under a request's own LoRA scales is reused (per-request `lora`: each step runs under one set
of scales, the sets taking turns).
"""
from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import llama_cpp as lib

from .cache.prefix import common_prefix
from .runtime.canonical import reusable

if TYPE_CHECKING:
    from .engine import _Slot

_ALL = object()  # SlotReuse._adapter_turn: every request runs with the model's own LoRA scales
TURN_STEPS = 16  # steps one set of LoRA scales keeps the context while requests of another set wait


class SlotReuse:
    """Engine methods over its slots (`_slots`), context (`ctx`), prompt cache, options and stats."""

    def _reuse(self, slot: _Slot, tokens: list[int], adapters=None) -> int:
        """Positions of `tokens` the slot's sequence can keep (from its own KV, another slot's or the prompt
        cache), computed under the same LoRA scales `adapters`."""
        def usable(shared: int, exact: int) -> int:
            return self._usable(shared, exact, len(tokens))

        n = usable(common_prefix(slot.held, tokens), slot.exact) if slot.adapters == adapters else 0
        slot.adapters = adapters
        # another slot may hold more of it (a shared system prompt): copy that sequence's state over
        # (each sequence has its own KV stream, so attention never scans the other sequences' cells)
        donor, best = None, n
        for other in self._slots:
            if other is not slot and other.adapters == adapters:
                m = usable(common_prefix(other.held, tokens), other.exact)
                if m > best:
                    donor, best = other, m
        if donor is not None and self._copy_sequence(donor.seq, slot.seq):
            slot.held, slot.exact, n = tokens[:best], best, best
            self.stats["shared_prefix_hits"] += 1
        cache = self.prompt_cache
        if cache is not None and adapters is None:
            shared, entry = cache.lookup(tokens)
            if entry is not None and usable(shared, entry.exact) > n and cache.restore(slot.seq, entry):
                slot.held, slot.exact = list(entry.tokens), entry.exact
                n = usable(shared, entry.exact)
        if not self.ctx.remove(slot.seq, n):
            self.ctx.remove(slot.seq)
            n = 0
        del slot.held[n:]
        slot.exact = min(slot.exact, n)
        return n

    def _usable(self, shared: int, exact: int, n_tokens: int) -> int:
        return reusable(shared, exact, n_tokens, "exact", self.ctx.canonical_rows)

    def _await_donor(self, slot: _Slot) -> None:
        """If another slot is prefilling a longer prefix of this prompt (n choices of one prompt, prompts arriving
        together behind one system prompt), wait for it and copy its KV rather than evaluate the prefix again."""
        if not self.options.share_prefill:
            return
        tokens = slot.req.tokens
        best, until = None, slot.cursor + self.ctx.canonical_rows  # less than this is not worth a step's wait
        for other in self._slots:
            if other is not slot and other.evaluating and other.req.adapters == slot.req.adapters:
                shared = common_prefix(other.req.tokens, tokens)
                m = self._usable(shared, shared, len(tokens))
                if m > until:
                    best, until = other, m
        slot.donor = None if best is None else (best, best.req, until)

    @staticmethod
    def _still_waiting(slot: _Slot) -> bool:
        donor, req, until = slot.donor
        return donor.req is req and donor.evaluating and donor.cursor < until

    def _take_from_donor(self, slot: _Slot) -> None:
        """A waiting slot whose donor has finished prefilling (or left) takes what the donor's KV offers exactly,
        and evaluates the rest itself."""
        donor, tokens = slot.donor[0], slot.req.tokens
        slot.donor = None
        n = self._usable(common_prefix(donor.held, tokens), donor.exact, len(tokens))
        if n > slot.cursor and self._copy_sequence(donor.seq, slot.seq) and self.ctx.remove(slot.seq, n):
            slot.held, slot.exact, slot.cursor = tokens[:n], n, n
            slot.req.timings.cached_tokens = n
            self.stats["shared_prefix_hits"] += 1
        elif not self.ctx.remove(slot.seq, slot.cursor):  # a failed copy left a part: start over
            self.ctx.remove(slot.seq)
            slot.held, slot.exact, slot.cursor = [], 0, 0
            slot.req.timings.cached_tokens = 0

    def _copy_sequence(self, src: int, dst: int) -> bool:
        size = lib.llama_state_seq_get_size(self.ctx.ptr, src)
        buf = (ctypes.c_uint8 * size)()
        if size == 0 or lib.llama_state_seq_get_data(self.ctx.ptr, buf, size, src) != size:
            return False
        self.ctx.remove(dst)
        if lib.llama_state_seq_set_data(self.ctx.ptr, buf, size, dst) != size:
            self.ctx.remove(dst)
            return False
        return True

    def _adapter_turn(self, slots: list[_Slot]):
        """The LoRA scales this step decodes with, set on the context: one set per step (llama-server never
        batches requests of other scales together either), kept for up to TURN_STEPS steps while its requests
        run, then the next set's turn (a switch makes llama.cpp reserve its graphs again); _ALL when every request
        has the model's own."""
        wanted = sorted({s.req.adapters for s in slots}, key=lambda a: (a is not None, a or ()))
        if wanted == [None] and self._adapters is None:
            return _ALL
        if self._adapters in wanted and (len(wanted) == 1 or self._turn_steps < TURN_STEPS):
            self._turn_steps += 1
            return self._adapters
        turn = wanted[(wanted.index(self._adapters) + 1) % len(wanted)] if self._adapters in wanted else wanted[0]
        self.model.lora.apply(self.ctx.ptr, turn)
        self._adapters, self._turn_steps = turn, 1
        self.stats["lora_switches"] += 1
        return turn
