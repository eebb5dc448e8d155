"""Tool (function) calling, OpenAI-style: tools offered to the chat template, calls parsed from the reply.

A model's own template decides how tools are shown to it (Qwen 2.5/3, Hermes, Llama 3.x and Mistral templates
read a `tools` variable). A template that does not mention tools gets them in the system message instead,
with the Hermes convention the other formats are parsed alongside: `<tool_call>{"name": ..., "arguments":
{...}}</tool_call>`. Replies are parsed in three formats:

- Hermes / Qwen: `<tool_call>{json}</tool_call>` blocks anywhere in the reply (text around them is content);
- Mistral: `[TOOL_CALLS]` followed by a JSON array of calls;
- Llama 3.x: the whole reply one JSON object `{"name": ..., "parameters": {...}}` (after an optional
  `<|python_tag|>`).

A call counts only when it names one of the offered tools and its arguments are a JSON object; anything else
stays content. `tool_choice="required"` (or a named function) forces one call with a grammar built from the
tools' JSON schemas, so even a model never trained for tools answers with a valid call.
"""
from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace

from edgelm.errors import UsageError

from .json_schema import schema_to_gbnf
from .reasoning import ThinkSplitter, split_reasoning

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL = "[TOOL_CALLS]"
PYTHON_TAG = "<|python_tag|>"
MARKERS = (HERMES_OPEN, MISTRAL, PYTHON_TAG)
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # OpenAI's rule for function names
CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it
    id: str = ""

    def to_openai(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def validate_tools(tools) -> list[dict]:
    """OpenAI's `tools`, checked: [{"type": "function", "function": {"name", "description"?, "parameters"?}}]."""
    if not isinstance(tools, (list, tuple)) or not tools:
        raise UsageError("tools must be a non-empty list of {'type': 'function', 'function': {...}}")
    out, names = [], set()
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function" or not isinstance(fn, Mapping):
            raise UsageError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise UsageError(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-', not {name!r}")
        if name in names:
            raise UsageError(f"tools[{i}]: a second function named {name!r}")
        names.add(name)
        description, parameters = fn.get("description", ""), fn.get("parameters", {"type": "object"})
        if not isinstance(description, str):
            raise UsageError(f"tools[{i}].function.description must be a string")
        if not isinstance(parameters, Mapping):
            raise UsageError(f"tools[{i}].function.parameters must be a JSON schema object")
        unknown = sorted(set(fn) - {"name", "description", "parameters", "strict"})
        if unknown:
            raise UsageError(f"tools[{i}].function has unknown key(s) {', '.join(unknown)}")
        out.append({"type": "function", "function": {"name": name, "description": description,
                                                      "parameters": json.loads(json.dumps(parameters))}})
    return out


def validate_tool_choice(choice, tools: list[dict] | None) -> str | None:
    """"none", "auto", "required", or the name of the function that must be called; None without tools."""
    if choice is None:
        return "auto" if tools else None
    if isinstance(choice, Mapping):
        name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), Mapping) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise UsageError("tool_choice must be none, auto, required or {'type': 'function', 'function': "
                             "{'name': ...}}")
        if not tools or name not in {t["function"]["name"] for t in tools}:
            raise UsageError(f"tool_choice names {name!r}, which is not one of the tools")
        return name
    if choice not in CHOICES:
        raise UsageError(f"tool_choice must be one of {', '.join(CHOICES)} or a function, not {choice!r}")
    if choice != "none" and not tools:
        raise UsageError(f"tool_choice {choice!r} needs tools")
    return choice


def system_prompt(tools: list[dict]) -> str:
    """What a template that knows nothing of tools gets in its system message."""
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("You may call one or more functions to help with the user's request. The functions are:\n"
            f"<tools>\n{listing}\n</tools>\n"
            "To call a function, reply with a JSON object of its name and arguments inside tags:\n"
            f'{HERMES_OPEN}\n{{"name": <function-name>, "arguments": <arguments-object>}}\n{HERMES_CLOSE}')


def forced_grammar(tools: list[dict], name: str | None = None) -> str:
    """GBNF for exactly one Hermes-style call of `name` (or of any of the tools), arguments per its schema."""
    chosen = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    calls = [{"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": fn["parameters"]},
              "required": ["name", "arguments"]} for fn in chosen]
    body = schema_to_gbnf(calls[0] if len(calls) == 1 else {"anyOf": calls})
    # the converter's root becomes the call's body; the new root wraps it in the tags
    body = re.sub(r"^root ::=", "tool-call-body ::=", body, count=1, flags=re.M)
    return f'root ::= "{HERMES_OPEN}\\n" tool-call-body "\\n{HERMES_CLOSE}"\n{body}'


def _call(obj, names: set[str]) -> ToolCall | None:
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters"))
    if isinstance(args, str):  # some models write the arguments as a JSON string, as OpenAI sends them
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if name not in names or not isinstance(args, dict):
        return None
    return ToolCall(name, json.dumps(args, ensure_ascii=False), "call_" + uuid.uuid4().hex[:24])


def parse_tool_calls(text: str, tools: list[dict]) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a reply: the calls it makes to the offered tools and the text around them."""
    names = {t["function"]["name"] for t in tools}
    if HERMES_OPEN in text:
        calls, content, pos = [], [], 0
        for m in re.finditer(re.escape(HERMES_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(HERMES_CLOSE) + r"|$)", text,
                             re.S):
            try:
                call = _call(json.loads(m.group(1)), names)
            except ValueError:
                call = None
            if call is not None:
                calls.append(call)
                content.append(text[pos:m.start()])
                pos = m.end()
        content.append(text[pos:])
        return ("".join(content).strip() if calls else text), calls
    stripped = text.strip()
    if stripped.startswith(MISTRAL):
        try:
            items = json.loads(stripped[len(MISTRAL):])
        except ValueError:
            return text, []
        calls = [_call(item, names) for item in (items if isinstance(items, list) else [items])]
        return ("", calls) if calls and all(calls) else (text, [])
    body = stripped[len(PYTHON_TAG):] if stripped.startswith(PYTHON_TAG) else stripped
    if body.startswith("{"):
        try:
            call = _call(json.loads(body), names)
        except ValueError:
            call = None
        if call is not None:
            return "", [call]
    return text, []


def tool_setup(tools, tool_choice) -> tuple[list[dict] | None, str | None]:
    """(the tools to offer the model, None for none; the grammar that forces a call, None unless tool_choice is
    "required" or a function) from OpenAI's `tools` and `tool_choice`."""
    tools = validate_tools(tools) if tools is not None else None
    choice = validate_tool_choice(tool_choice, tools)
    if choice in (None, "none"):
        return None, None
    return tools, None if choice == "auto" else forced_grammar(tools, None if choice == "required" else choice)


def forcing_call(params, grammar: str):
    """SamplingParams constrained to the forced call's grammar (tool_setup)."""
    if params.gbnf is not None:
        raise UsageError("tool_choice forces a call with a grammar of its own: leave out grammar and json_schema")
    forced = replace(params, grammar=grammar)
    forced.validate()
    return forced


class ToolStream:
    """Streams a reply's content while holding back what may be a tool call, for parse_tool_calls at the end."""

    def __init__(self, tools: list[dict]):
        self.tools = tools
        self.sent = ""  # content already passed on
        self.held = ""

    def feed(self, text: str) -> str:
        """The part of `text` that is safe to pass on now."""
        self.held += text
        if not self.sent.strip():  # a reply that starts with "{" may be a Llama 3.x call as a whole
            lead = self.held.lstrip()
            if lead.startswith("{") or any(m.startswith(lead) or lead.startswith(m) for m in MARKERS if lead):
                return ""
        cut = min((i for i in (self.held.find(m) for m in MARKERS) if i >= 0), default=-1)
        if cut < 0:  # keep back only an ending that could begin a marker
            keep = max((n for m in MARKERS for n in range(len(m) - 1, 0, -1) if self.held.endswith(m[:n])), default=0)
            cut = len(self.held) - keep
        out, self.held = self.held[:cut], self.held[cut:]
        self.sent += out
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(the held-back content to pass on, the calls): what is held starts where a call may."""
        content, calls = parse_tool_calls(self.held, self.tools)
        return (content, calls) if calls else (self.held, [])


class ReplyStream:
    """A streamed chat reply split into its thinking (runtime.reasoning), its content, and its tool calls."""

    def __init__(self, tools: list[dict] | None, thinking_opened: bool = False):
        self.think = ThinkSplitter(thinking_opened)
        self.calls = ToolStream(tools) if tools else None

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) safe to pass on now."""
        reasoning, content = self.think.feed(text)
        return reasoning, self.calls.feed(content) if self.calls is not None else content

    def finish(self) -> tuple[str, str, list[ToolCall]]:
        """(reasoning, content, calls) still held at the end of the reply."""
        reasoning, content = self.think.finish()
        if self.calls is None:
            return reasoning, content, []
        content = self.calls.feed(content)
        tail, calls = self.calls.finish()
        return reasoning, content + tail, calls


def reply_chunks(chunks, tools: list[dict] | None, thinking_opened: bool = False):
    """A chat's chunk stream (runtime.generate) with the thinking in chunk.reasoning, the calls on the last chunk
    (finish_reason "tool_calls" when there are any) and neither in chunk.text."""
    reply = ReplyStream(tools, thinking_opened)
    for chunk in chunks:
        reasoning, content = reply.feed(chunk.text)
        if chunk.finish_reason is None:
            yield replace(chunk, text=content, reasoning=reasoning or None)
            continue
        more, rest, calls = reply.finish()
        yield replace(chunk, text=content + rest, reasoning=(reasoning + more) or None, tool_calls=calls or None,
                      finish_reason="tool_calls" if calls else chunk.finish_reason)
        return


def split_reply(text: str, tools: list[dict] | None, thinking_opened: bool = False):
    """(reasoning or None, content, calls) of a whole chat reply."""
    reasoning, content = split_reasoning(text, thinking_opened)
    content, calls = parse_tool_calls(content, tools) if tools else (content, [])
    return reasoning, content, calls
