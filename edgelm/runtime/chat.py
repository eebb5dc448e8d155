"""Chat templates: a model's Jinja `tokenizer.chat_template`, rendered as transformers renders it.

A template ships inside the model file, so it is untrusted code. It runs in jinja2's immutable
sandbox, which refuses underscore attributes (`''.__class__`, `cycler.__init__.__globals__`) and
in-place changes to lists and dicts (`messages.append(...)`, `messages[0].update(...)`). edgelm
closes what that sandbox leaves open:
- the `dict` global is the real type, whose unbound methods mutate any dict (`dict.update(messages[0], ...)`):
  templates get a builder that only makes new dicts;
- `namespace()` accepts underscore names: refused, so a template cannot shadow internals on it;
- a blocked attribute renders as an empty Undefined that fails only when used: here it fails at once;
- `'x' * 10**10` and `2 ** 10**8` would exhaust memory or CPU: repetitions and powers are capped.
Other resource use (deep loops, huge format widths) is not bounded; the template cannot run code.

Named templates: edgelm's "chatml" and "completion", and every one built into llama.cpp ("llama3", "gemma",
"phi3", "mistral-v7", ..., `builtin_names()`), which llama.cpp renders itself (llama_chat_apply_template) from the
messages' roles and texts, as llama-server's `--chat-template NAME` does.

Models without a template get the layout their vocabulary's special tokens name: ChatML (llama.cpp's default
for every model) when it has <|im_start|> and <|im_end|>, Llama 3's, Gemma's or Phi-3's for their markers, and
the plain "completion" layout otherwise: markers that a vocabulary does not know would only reach a base model
as noise.
"""
from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from edgelm.errors import ChatTemplateError, TemplateSecurityError, UsageError

from .tools import HERMES_CLOSE, HERMES_OPEN, system_prompt

ROLES = ("system", "user", "assistant", "tool")
OPTIONAL_KEYS = ("name", "tool_call_id")  # passed through to the template when present

# llama.cpp's default template (common/chat.cpp), for models that carry none
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# base models: the turns' text alone, so chat() on one user message equals generate() on its text
COMPLETION = "{% for message in messages %}{{ message['content'] }}{% if not loop.last %}\n\n{% endif %}{% endfor %}"
BUILTIN = {"chatml": CHATML, "completion": COMPLETION}
# a model without a template, whose vocabulary has all of a layout's markers as special tokens, gets that layout
MARKERS = {"chatml": ("<|im_start|>", "<|im_end|>"),
           "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
           "gemma": ("<start_of_turn>", "<end_of_turn>"),
           "phi3": ("<|user|>", "<|assistant|>", "<|end|>")}

MAX_REPEAT = 1 << 22  # longest str/list a template may build with `*`
MAX_POWER_BITS = 1 << 16  # largest integer a template may build with `**`


# ------------------------------------------------------------ messages

def validate_messages(messages) -> list[dict]:
    """Checks the conversation and returns a fresh copy of plain dicts (the template never sees the caller's).

    content is a string, a list of OpenAI text parts ({"type": "text", "text": ...}, joined by newlines), or None
    in an assistant message that carries `tool_calls` (OpenAI's shape; arguments become dicts, as Hugging Face
    templates expect them)."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, (list, tuple)):
        raise UsageError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
                         f"not {type(messages).__name__}")
    if not messages:
        raise UsageError("messages is empty: nothing to reply to")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise UsageError(f"messages[{i}] must be a dict with 'role' and 'content', not {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise UsageError(f"messages[{i}]['role'] must be one of {', '.join(ROLES)}, not {role!r}")
        calls = _tool_calls(message.get("tool_calls"), i) if role == "assistant" else None
        content = _content(message.get("content"), i, may_be_none=bool(calls))
        allowed = ("role", "content", *OPTIONAL_KEYS, *(("tool_calls",) if role == "assistant" else ()))
        unknown = sorted(str(k) for k in message if k not in allowed)
        if unknown:
            raise UsageError(f"messages[{i}] has unknown key(s) {', '.join(unknown)} "
                             f"(allowed: {', '.join(allowed)})")
        plain = {"role": str.__str__(role), "content": content}
        if calls:
            plain["tool_calls"] = calls
        for key in OPTIONAL_KEYS:
            if key in message:
                if not isinstance(message[key], str):
                    raise UsageError(f"messages[{i}]['{key}'] must be a string, not {type(message[key]).__name__}")
                plain[key] = str.__str__(message[key])
        out.append(plain)
    return out


def _content(content, i: int, may_be_none: bool) -> str | None:
    if content is None and may_be_none:
        return None
    if isinstance(content, (list, tuple)):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise UsageError(f"messages[{i}]['content'][{j}]: only text parts ({{'type': 'text', 'text': ...}}) "
                                 f"are supported, not {kind!r}")
            texts.append(part["text"])
        content = "\n".join(texts)
    if not isinstance(content, str):
        raise UsageError(f"messages[{i}]['content'] must be a string or a list of text parts, "
                         f"not {type(content).__name__}")
    return str.__str__(content)  # drops str subclasses' methods


def _tool_calls(calls, i: int) -> list[dict] | None:
    if calls is None:
        return None
    if not isinstance(calls, (list, tuple)):
        raise UsageError(f"messages[{i}]['tool_calls'] must be a list")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, Mapping) else None
        name = fn.get("name") if isinstance(fn, Mapping) else None
        args = fn.get("arguments", "{}") if isinstance(fn, Mapping) else None
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                args = None
        if not isinstance(name, str) or not isinstance(args, dict):
            raise UsageError(f"messages[{i}]['tool_calls'][{j}] must be {{'id': ..., 'type': 'function', "
                             f"'function': {{'name': ..., 'arguments': a JSON object}}}}")
        call_id = call.get("id", "")
        out.append({"id": str(call_id), "type": "function", "function": {"name": str.__str__(name),
                                                                        "arguments": json.loads(json.dumps(args))}})
    return out


# ------------------------------------------------------------ the sandbox

class _Raised(Exception):
    """raise_exception() from a template: the template's own refusal, reported with its message."""


def _raise_exception(message):
    raise _Raised(str(message))


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' filter: no HTML escaping (jinja's default), indent and separators exposed
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _DictBuilder:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without the type's mutating unbound methods."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, keys, value=None):
        return dict.fromkeys(keys, value)


@functools.lru_cache(maxsize=1)
def _environment():
    # jinja2 is imported on first use: loading a model for plain generation never pays for it
    from jinja2 import nodes
    from jinja2 import utils as jutils
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    def check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"a template may not store {name!r} on a namespace (underscore names are internal)")

    class Namespace(jutils.Namespace):
        def __init__(*args, **kwargs):  # no named self: namespace(self=1) is a valid template call
            for name in dict(*args[1:], **kwargs):
                check_name(name)
            jutils.Namespace.__init__(*args, **kwargs)

        def __setitem__(self, name, value):
            check_name(name)
            jutils.Namespace.__setitem__(self, name, value)

    class GenerationTag(Extension):
        # transformers' {% generation %} marks assistant text for training masks; rendering just keeps the body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def unsafe_undefined(self, obj, attribute):
            raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} object is not allowed")

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_REPEAT:
                        raise SecurityError(f"repetition to {len(seq) * n} items is over the limit of {MAX_REPEAT}")
            elif isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                if math.log2(abs(left)) * right > MAX_POWER_BITS:
                    raise SecurityError(f"{left} ** {right} is over the limit of {MAX_POWER_BITS} bits")
            return super().call_binop(context, operator, left, right)

    # trim_blocks / lstrip_blocks and the extra globals are what transformers gives HF templates
    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_DictBuilder(), namespace=Namespace)
    return env


@functools.lru_cache(maxsize=32)
def _compile(source: str):
    from jinja2 import TemplateSyntaxError

    try:
        return _environment().from_string(source)
    except TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template syntax error at line {e.lineno}: {e.message}") from None


def _run(template, variables: dict) -> str:
    from jinja2 import TemplateError
    from jinja2.sandbox import SecurityError

    try:
        return template.render(**variables)
    except SecurityError as e:
        raise TemplateSecurityError(f"chat template blocked by the sandbox: {e}") from None
    except _Raised as e:
        raise ChatTemplateError(f"chat template rejected the conversation: {e}") from None
    except TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from None
    except Exception as e:  # a template bug (TypeError, range() over the sandbox's limit, ...), never edgelm's
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None


# ------------------------------------------------------------ templates

@dataclass(frozen=True)
class ChatTemplate:
    source: str
    bos_token: str = ""  # the texts the template may emit for BOS / EOS
    eos_token: str = ""
    name: str = "custom"  # "model", "custom", or a built-in name (BUILTIN, or llama.cpp's: builtin_names())

    @property
    def text(self) -> str:
        """What to show of it: the Jinja source, or the name of a template llama.cpp renders itself."""
        return self.source or self.name

    def render(self, messages, *, add_generation_prompt: bool = True, tools: list[dict] | None = None,
               extra: Mapping | None = None) -> str:
        """The prompt text for `messages`, ending with the assistant's turn opener when add_generation_prompt;
        `tools` (runtime.tools.validate_tools) go to the template, or into the system message of one that
        ignores them; `extra`: more template variables (llama-server's chat_template_kwargs, such as Qwen3's
        enable_thinking)."""
        if not isinstance(add_generation_prompt, bool):
            raise UsageError(f"add_generation_prompt must be True or False, not {add_generation_prompt!r}")
        messages = validate_messages(messages)
        native = self.name in builtin_names() and self.name not in BUILTIN  # llama.cpp renders it
        if native or "tool_calls" not in self.source:  # the calls an assistant made, written as text (Hermes form)
            for m in messages:
                if m.get("tool_calls"):
                    m["content"] = "\n".join([m["content"] or ""] + [
                        f"{HERMES_OPEN}\n{json.dumps(c['function'], ensure_ascii=False)}\n{HERMES_CLOSE}"
                        for c in m.pop("tool_calls")]).lstrip("\n")
        if tools and (native or "tools" not in self.source):
            if messages[0]["role"] == "system":
                messages[0]["content"] = system_prompt(tools) + "\n\n" + messages[0]["content"]
            else:
                messages.insert(0, {"role": "system", "content": system_prompt(tools)})
            tools = None
        if native:  # llama.cpp's templates take roles and texts only, no template variables
            template_kwargs(extra)
            return _apply_builtin(self.name, messages, add_generation_prompt)
        variables = dict(template_kwargs(extra), messages=messages, add_generation_prompt=add_generation_prompt,
                         bos_token=self.bos_token, eos_token=self.eos_token, tools=tools or None, documents=None)
        return _run(_compile(self.source), variables)


RESERVED = ("messages", "add_generation_prompt", "bos_token", "eos_token", "tools", "documents")


def fit_messages(messages: list[dict], n_tokens, room: int) -> list[dict]:
    """`messages` without their oldest turns (never a leading system message, never the newest message) until
    `n_tokens(messages)` is at most `room`, as Ollama fits a chat to its context; what is left starts with a
    user's turn."""
    first = 1 if messages and messages[0].get("role") == "system" else 0
    messages = list(messages)
    while len(messages) - first > 1 and n_tokens(messages) > room:
        del messages[first]
        while len(messages) - first > 1 and messages[first].get("role") != "user":
            del messages[first]
    return messages


def template_kwargs(extra: Mapping | None) -> dict:
    """Extra template variables, checked: names that are identifiers and not the template's own, JSON values
    (copied, so the template never holds the caller's objects)."""
    if extra is None:
        return {}
    if not isinstance(extra, Mapping):
        raise UsageError(f"chat_template_kwargs must be an object of template variables, not {type(extra).__name__}")
    for name in extra:
        if not isinstance(name, str) or not name.isidentifier() or name.startswith("_") or name in RESERVED:
            raise UsageError(f"chat_template_kwargs: {name!r} cannot be a template variable "
                             f"(identifiers only, not starting with _, none of {', '.join(RESERVED)})")
    try:
        return json.loads(json.dumps(dict(extra)))
    except (TypeError, ValueError) as e:
        raise UsageError(f"chat_template_kwargs must hold JSON values: {e}") from None


@functools.lru_cache(maxsize=1)
def builtin_names() -> tuple[str, ...]:
    """Every named template: edgelm's own, then llama.cpp's built-in ones."""
    import ctypes

    import llama_cpp as lib

    n = lib.llama_chat_builtin_templates(None, 0)
    names = (ctypes.c_char_p * n)()
    lib.llama_chat_builtin_templates(names, n)
    return tuple(BUILTIN) + tuple(name.decode() for name in names if name.decode() not in BUILTIN)


def _apply_builtin(name: str, messages: list[dict], add_generation_prompt: bool) -> str:
    """llama.cpp's built-in template `name` over the messages' roles and contents."""
    import ctypes

    import llama_cpp as lib

    fields = []
    for i, m in enumerate(messages):
        role, content = m["role"].encode(), (m["content"] or "").encode()
        if b"\0" in content:  # a C string would end there, silently dropping the rest
            raise UsageError(f"messages[{i}]['content'] holds a NUL character, which the built-in template "
                             f"{name!r} cannot carry")
        fields.append((role, content))
    chat = (lib.llama_chat_message * len(fields))(*[lib.llama_chat_message(r, c) for r, c in fields])
    size = 2 * sum(len(r) + len(c) for r, c in fields) + 256
    for _ in range(2):  # the first call says how long the text is when the buffer was too short
        buf = ctypes.create_string_buffer(size)
        n = lib.llama_chat_apply_template(name.encode(), chat, len(fields), add_generation_prompt, buf, size)
        if n < 0:
            raise ChatTemplateError(f"llama.cpp's built-in template {name!r} cannot render this conversation")
        if n <= size:
            return buf.raw[:n].decode("utf-8", errors="replace")
        size = n
    raise ChatTemplateError(f"llama.cpp's built-in template {name!r} gave text of changing length")


def marker_layout(model) -> str:
    """The built-in layout a template-less model's special tokens name (MARKERS), or "completion"."""
    def special(text: str) -> bool:
        return len(model.tokenize(text, add_special=False, parse_special=True)) == 1

    return next((name for name, markers in MARKERS.items() if all(map(special, markers))), "completion")


def template_for(model, override: str | None = None) -> ChatTemplate:
    """The template to chat with: `override` (a built-in name or Jinja source), the model's own, or a fallback."""
    if override is not None and (not isinstance(override, str) or not override.strip()):
        raise UsageError(f"chat_template must be a built-in name ({', '.join(MARKERS)}, completion, ...) or Jinja "
                         f"source text, not {override!r}")
    tokens = dict(bos_token=model.special_text(model.bos), eos_token=model.special_text(model.eos))
    if override in builtin_names():
        return ChatTemplate(BUILTIN.get(override, ""), name=override, **tokens)
    if override is not None:
        if "{" not in override:  # a misspelt name, not a template: Jinja would render it as constant text
            raise UsageError(f"unknown chat template name {override[:40]!r}; built-in: "
                             f"{', '.join(builtin_names())} (or give Jinja source)")
        _compile(override)  # a caller's template fails here, not on its first use
        return ChatTemplate(override, name="custom", **tokens)
    if model.chat_template:
        return ChatTemplate(model.chat_template, name="model", **tokens)
    name = marker_layout(model)
    return ChatTemplate(BUILTIN.get(name, ""), name=name, **tokens)


def chat_tokens(model, messages, template: ChatTemplate, *, add_generation_prompt: bool = True,
                tools: list[dict] | None = None, extra: Mapping | None = None) -> list[int]:
    """Render and tokenise a conversation: special-token texts become their ids, BOS appears once."""
    text = template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools, extra=extra)
    # the tokenizer adds BOS / EOS itself where the model asks: drop the template's copies (as llama.cpp does)
    if model.add_bos and template.bos_token and text.startswith(template.bos_token):
        text = text[len(template.bos_token):]
    if model.add_eos and template.eos_token and text.endswith(template.eos_token):
        text = text[:-len(template.eos_token)]
    return model.tokenize(text, add_special=True, parse_special=True)
