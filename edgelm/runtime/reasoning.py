"""Reasoning models' thinking, kept apart from their answer: `<think> ... </think>` at the start of a reply.

DeepSeek-R1 distills, Qwen3 and QwQ think before they answer, inside <think> tags; their templates sometimes
open the tag themselves at the end of the prompt. The thinking goes to `reasoning` (OpenAI-style servers call it
`reasoning_content`, Ollama `thinking`), the rest is the reply's content; a reply without the tag is all content.
"""
from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def prompt_opens_thinking(model, tokens: list[int]) -> bool:
    """Whether a rendered chat prompt ends inside an opened <think> (the template started the thinking)."""
    return model.detokenize(tokens[-8:], special=True).rstrip().endswith(OPEN)


def _partial(text: str, tag: str) -> int:
    """How many characters at the end of `text` could begin `tag`."""
    return max((n for n in range(len(tag) - 1, 0, -1) if text.endswith(tag[:n])), default=0)


class ThinkSplitter:
    """Splits a streamed reply into (reasoning, content) pieces as they become certain."""

    def __init__(self, open_already: bool = False):
        self.state = "think" if open_already else "start"  # start -> think -> answer -> content; or start -> content
        self.buf = ""
        self.thought = False  # any reasoning passed on yet (its leading newlines are dropped)
        self.opened = open_already  # the reply thinks (the tag was opened, by it or by the prompt)

    def feed(self, text: str) -> tuple[str, str]:
        self.buf += text
        reasoning = content = ""
        while self.buf:
            if self.state == "start":
                lead = self.buf.lstrip()
                if lead.startswith(OPEN):
                    self.buf, self.state, self.opened = lead[len(OPEN):], "think", True
                elif not lead or OPEN.startswith(lead):
                    break  # not known yet
                else:
                    self.state = "content"
            elif self.state == "think":
                end = self.buf.find(CLOSE)
                cut = end if end >= 0 else len(self.buf) - _partial(self.buf, CLOSE)
                piece = self.buf[:cut] if self.thought else self.buf[:cut].lstrip("\n")
                reasoning += piece
                self.thought = self.thought or bool(piece)
                if end < 0:
                    self.buf = self.buf[cut:]
                    break
                self.buf, self.state = self.buf[end + len(CLOSE):], "answer"
            elif self.state == "answer":  # the blank lines between the thinking and the answer
                self.buf = self.buf.lstrip()
                if self.buf:
                    self.state = "content"
            else:
                content, self.buf = content + self.buf, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What is still held: unfinished thinking stays reasoning; anything else is content."""
        rest, self.buf = self.buf, ""
        if self.state == "think":
            return rest, ""
        return "", "" if self.state == "answer" else rest


def split_reasoning(text: str, open_already: bool = False) -> tuple[str | None, str]:
    """(reasoning, content) of a whole reply; reasoning None when it has none."""
    splitter = ThinkSplitter(open_already)
    parts = [splitter.feed(text), splitter.finish()]
    reasoning, content = "".join(r for r, _ in parts), "".join(c for _, c in parts)
    return (reasoning.rstrip() if splitter.opened else None), content
