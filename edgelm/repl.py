"""The interactive chat behind `edgelm run` without -p: history, slash commands, Ctrl-C per reply."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, TextIO

from .errors import ContextOverflowError, EdgelmError, UsageError
from .fsutil import atomic_write
from .runtime.chat import fit_messages

HELP = """commands:
  /reset        forget the conversation (keeps --system)
  /save FILE    save the conversation as JSON
  /load FILE    load a conversation saved with /save
  /help         this help
  /exit, /bye   leave (Ctrl-D too); Ctrl-C stops the current reply"""


class ReplyPrinter:
    """Writes a chat reply as it streams, a reasoning model's thinking first and set apart (dim at a terminal),
    as Ollama's CLI shows it; the thinking stays out of the conversation's history."""

    def __init__(self, write: Callable[[str], None], dim: bool = False):
        self.write, self.dim = write, dim
        self.state = "before"  # -> "thinking" -> "after"

    def __call__(self, chunk) -> None:
        if chunk.reasoning and self.state == "before":
            self.write("Thinking...\n" + ("\x1b[2m" if self.dim else ""))
            self.state = "thinking"
        if chunk.reasoning:
            self.write(chunk.reasoning)
        if chunk.text:
            self.end_thinking()
            self.write(chunk.text)

    def end_thinking(self) -> None:
        if self.state == "thinking":
            self.write(("\x1b[0m" if self.dim else "") + "\n...done thinking.\n\n")
            self.state = "after"


class ChatSession:
    """A conversation: the message history and the model call that extends it."""

    def __init__(self, model, system: str | None = None, **sampling):
        self.model, self.system, self.sampling = model, system, sampling
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def fitted(self, messages: list[dict]) -> list[dict]:
        """`messages` without their oldest turns (never the system message or the newest message), so that the
        conversation leaves room for a reply in the context, as Ollama does."""
        n_ctx, profile = self.model.n_ctx, getattr(self.model, "profile", None)
        reply = self.sampling.get("max_tokens") or (profile.sampling.get("max_tokens") if profile else None) or 256
        return fit_messages(messages, self.n_tokens, n_ctx - min(reply, n_ctx // 2))

    def n_tokens(self, messages: list[dict]) -> int:
        return len(self.model.tokenize(self.model.chat_prompt(messages), parse_special=True))

    def reply(self, text: str, write: Callable[[str], None], dim: bool = False,
              note: Callable[[str], None] | None = None):
        """Stream the assistant's reply to `write`; Ctrl-C ends it early. Returns the last chunk (None if cut).
        `note` hears when older turns were dropped to fit the context."""
        messages = self.fitted([*self.messages, {"role": "user", "content": text}])
        try:
            chunks = self.model.chat_stream(messages, **self.sampling)
        except ContextOverflowError as e:  # the message alone does not fit: the conversation stays as it was
            raise UsageError(f"this message does not fit the context: {e}") from None
        dropped = len(self.messages) + 1 - len(messages)
        self.messages = messages
        if dropped and note is not None:
            note(f"(dropped the {dropped} oldest message{'s' * (dropped > 1)} to fit the "
                 f"{self.model.n_ctx}-token context)")
        parts, last = [], None
        printer = ReplyPrinter(write, dim)
        try:
            for last in chunks:
                parts.append(last.text)
                printer(last)
        except KeyboardInterrupt:
            chunks.close()  # releases the model for the next turn
            printer.end_thinking()
            write(" [interrupted]")
            last = None
        # a cut reply stays in the history as far as it got, so the next turn can refer to it
        self.messages.append({"role": "assistant", "content": "".join(parts)})
        return last

    def save(self, path: str) -> None:
        data = json.dumps({"messages": self.messages}, ensure_ascii=False, indent=1)
        atomic_write(Path(path).expanduser(), data.encode("utf-8"))  # a failed save never clobbers an older file

    def load(self, path: str) -> None:
        try:
            data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UsageError(f"{path}: cannot load a conversation: {e}") from None
        messages = data.get("messages") if isinstance(data, dict) else None
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise UsageError(f"{path}: not a conversation saved by /save")
        self.messages = [{"role": m["role"], "content": m["content"]} for m in messages]


def repl(session: ChatSession, inp: TextIO = sys.stdin, out: TextIO = sys.stdout, err: TextIO = sys.stderr,
         on_reply: Callable | None = None) -> int:
    """Read lines until /exit or end of input. Errors in one turn are reported, not fatal."""
    interactive = inp.isatty()

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    if interactive:
        print("edgelm chat: /help for commands, Ctrl-D to leave", file=err)
    while True:
        if interactive:
            write(">>> ")
        try:
            line = inp.readline()
        except KeyboardInterrupt:  # at the prompt: drop the line, keep going
            write("\n")
            continue
        if not line:
            return 0
        line = line.rstrip("\n")
        if not line.strip():
            continue
        cmd, _, arg = line.strip().partition(" ")
        try:
            if cmd in ("/exit", "/bye", "/quit"):
                return 0
            if cmd == "/help":
                print(HELP, file=err)
            elif cmd == "/reset":
                session.reset()
                print("(conversation cleared)", file=err)
            elif cmd in ("/save", "/load"):
                if not arg.strip():
                    raise UsageError(f"{cmd} needs a file name")
                getattr(session, cmd[1:])(arg.strip())
                print(f"({'saved to' if cmd == '/save' else 'loaded'} {arg.strip()})", file=err)
            elif cmd.startswith("/") and " " not in cmd and len(cmd) > 1 and cmd[1:].isalpha():
                raise UsageError(f"unknown command {cmd} (/help lists them)")
            else:
                last = session.reply(line, write, dim=out.isatty(), note=lambda text: print(text, file=err))
                write("\n")
                if on_reply is not None and last is not None:
                    on_reply(last)
        except EdgelmError as e:  # a turn's error (a template that rejects the conversation, ...): the chat goes on
            print(f"edgelm: {e}", file=err)
        except KeyboardInterrupt:
            write("\n")
