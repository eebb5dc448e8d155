"""llama-server's native replies (llama_native.py's routes): a reply as it comes, with llama-server's fields
(content, tokens, stop_type and stopping_word, timings, completion_probabilities), the cuts n_indent and
t_max_predict_ms make, and the Server-Sent Events of a streamed reply, ending in its final fields."""
from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from fastapi import Request

from .openai_api import stopping_word, token_text
from .serving import follow

if TYPE_CHECKING:
    from .llama_native import Ask

class Output:
    """One reply as it comes: the text sent, its tokens and probabilities, and why it ended."""

    def __init__(self, server, ask: Ask, req, index: int):
        self.server, self.ask, self.req, self.index = server, ask, req, index
        self.text, self.tokens, self.probs = "", [], []
        self.has_new_line, self.done, self.cut = False, False, False
        self.first: float | None = None  # when the first token came

    def feed(self, chunk) -> dict | None:
        """Take a chunk; the partial reply to stream (None once the reply is done). When n_indent or
        t_max_predict_ms end the reply here, `cut` is set and the caller cancels the request."""
        if self.done:
            return None
        start, now = len(self.text), time.perf_counter()
        self.first = self.first if self.first is not None or not chunk.tokens else now
        self.text += chunk.text
        self.tokens += chunk.tokens
        self.probs += chunk.logprobs or []
        cut = self.indent_cut(start) if self.ask.n_indent > 0 else None
        if cut is not None:
            self.text = self.text[:cut]
        if "\n" in chunk.text:
            self.has_new_line = True
            limit = self.ask.t_max_predict_ms
            if limit > 0 and self.first is not None and (now - self.first) * 1000 > limit:
                cut = len(self.text)
        self.done = chunk.finish_reason is not None or cut is not None
        self.cut = cut is not None and chunk.finish_reason is None
        part = {"index": self.index, "content": self.text[start:], "tokens": chunk.tokens, "stop": False,
                "id_slot": self.slot, "tokens_predicted": len(self.tokens),
                "tokens_evaluated": self.req.timings.prompt_tokens}
        if self.ask.timings_per_token:
            part["timings"] = self.timings()
        if chunk.logprobs and self.ask.n_probs:
            part["completion_probabilities"] = self.probabilities(chunk.logprobs)
        return part

    def indent_cut(self, start: int) -> int | None:
        """llama-server's n_indent: where a line after the first starts less indented than n_indent, the reply
        ends before that line's first character."""
        first = self.text.find("\n")
        if first < 0:
            return None
        line = max(first + 1, self.text.rfind("\n", 0, start) + 1)  # the line the new text starts in, or the second
        while line <= len(self.text):
            q = line
            while q < len(self.text) and self.text[q] in " \t":
                q += 1
            if q < len(self.text) and q >= start and self.text[q] != "\n" and q - line < self.ask.n_indent:
                return q
            nxt = self.text.find("\n", line)
            if nxt < 0:
                return None
            line = nxt + 1
        return None

    @property
    def slot(self) -> int:
        return -1 if self.req.slot is None else self.req.slot

    def probabilities(self, logprobs) -> list[dict]:
        def item(token: int, logprob: float) -> dict:
            text, raw = token_text(self.server.llama, token)
            return {"id": token, "token": text, "bytes": list(raw), "logprob": logprob}

        return [{**item(lp.token, lp.logprob), "top_logprobs": [item(t, v) for t, v in lp.top]} for lp in logprobs]

    def timings(self) -> dict:
        t = self.req.timings
        evaluated = t.prompt_tokens - t.cached_tokens
        out = {"cache_n": t.cached_tokens, "prompt_n": evaluated, "prompt_ms": t.prompt_s * 1e3,
               "prompt_per_token_ms": t.prompt_s * 1e3 / evaluated if evaluated else 0.0,
               "prompt_per_second": t.prompt_tps, "predicted_n": t.completion_tokens, "predicted_ms": t.gen_s * 1e3,
               "predicted_per_token_ms": t.gen_s * 1e3 / t.completion_tokens if t.completion_tokens else 0.0,
               "predicted_per_second": t.gen_tps}
        if t.speculative is not None and t.speculative.drafted:
            out |= {"draft_n": t.speculative.drafted, "draft_n_accepted": t.speculative.accepted}
        return out

    def stop_type(self) -> tuple[str, str]:
        """llama-server's stop_type and stopping_word."""
        if self.cut or self.req.finish_reason == "length":
            return "limit", ""
        word = stopping_word(self.server.llama, self.req.completion(), self.ask.params.stop)
        return ("word", word) if word is not None else ("eos", "")

    def final(self, streamed: bool = False) -> dict:
        """The whole reply (its last event when `streamed`: no text, no probabilities)."""
        t, kind = self.req.timings, self.stop_type()
        n_ctx = self.server.options.n_ctx
        truncated = kind[0] == "limit" and not self.cut and t.prompt_tokens + len(self.tokens) >= n_ctx - 1
        reply = {"index": self.index, "content": "" if streamed else self.text,
                 "tokens": self.tokens if self.ask.return_tokens and not streamed else [], "id_slot": self.slot,
                 "stop": True, "model": self.server.model_id, "tokens_predicted": len(self.tokens),
                 "tokens_evaluated": t.prompt_tokens, "generation_settings": self.ask.settings,
                 "prompt": self.server.llama.detokenize(self.req.tokens, special=True),
                 "has_new_line": self.has_new_line, "truncated": truncated, "stop_type": kind[0],
                 "stopping_word": kind[1], "tokens_cached": t.cached_tokens, "timings": self.timings()}
        if self.ask.n_probs and self.probs and not streamed:
            reply["completion_probabilities"] = self.probabilities(self.probs)
        return reply


async def stream(server, request: Request, ask: Ask, reqs: list, outs: list[Output]):
    """The replies' events: a partial reply per chunk, then each reply's final fields."""
    def event(obj: dict) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async for i, chunk in follow(server, request, reqs):
        out = outs[i]
        if out.done:
            continue
        part = out.feed(chunk)
        if out.cut:  # n_indent or t_max_predict_ms ended it
            reqs[i].cancel()
        if part["content"] or part["tokens"]:
            yield event(part)
        if out.done:
            yield event(ask.pick(out.final(streamed=True)))
