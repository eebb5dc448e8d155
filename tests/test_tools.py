"""Tool calling: parsing replies in the three formats, streaming with calls held back, the template's view of tools
and calls, and calls forced by a grammar on the bundled model."""
from __future__ import annotations

import json

import pytest

import edgelm
from edgelm.errors import UsageError
from edgelm.runtime.chat import CHATML, ChatTemplate
from edgelm.runtime.tools import ToolStream, parse_tool_calls, tool_setup, validate_tools

TOOLS = validate_tools([
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string", "maxLength": 12},
                                          "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}},
])
WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}'


def calls_of(text: str):
    content, calls = parse_tool_calls(text, TOOLS)
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("text, content, calls", [
    (f"<tool_call>\n{WEATHER}\n</tool_call>", "", [("get_weather", {"city": "Paris", "unit": "C"})]),
    (f"Let me look.\n<tool_call>{WEATHER}</tool_call>\n<tool_call>"
     '{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call> Done.', "Let me look.\n\n Done.",
     [("get_weather", {"city": "Paris", "unit": "C"}), ("add", {"a": 1, "b": 2})]),  # arguments as a JSON string
    (f"<tool_call>{WEATHER}", "", [("get_weather", {"city": "Paris", "unit": "C"})]),  # cut before the close tag
    ('[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1, "b": 2}}]', "", [("add", {"a": 1, "b": 2})]),
    ('{"name": "add", "parameters": {"a": 3, "b": 4}}', "", [("add", {"a": 3, "b": 4})]),  # Llama 3.x
    ('<|python_tag|>{"name": "add", "parameters": {"a": 3, "b": 4}}', "", [("add", {"a": 3, "b": 4})]),
    # not calls: unknown function, broken JSON, arguments not an object, JSON that is an answer
    ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', None, []),
    ('<tool_call>{"name": "add", "arguments": {"a": 1</tool_call>', None, []),
    ('{"name": "add", "parameters": [1, 2]}', None, []),
    ('{"city": "Paris"}', None, []),
    ("The weather is fine.", None, []),
])
def test_parse_tool_calls(text, content, calls):
    got_content, got_calls = calls_of(text)
    assert got_calls == calls
    assert got_content == (text if content is None else content)
    assert len({c.id for c in parse_tool_calls(text, TOOLS)[1]}) == len(calls)  # every call its own id


@pytest.mark.parametrize("pieces, streamed, tail, n_calls", [
    (["Let me ", "look. <tool", "_call>\n", WEATHER, "\n</tool_call>"], "Let me look. ", "", 1),
    (["  ", '{"name": "add", ', '"parameters": {"a": 1, "b": 2}}'], "  ", "", 1),
    (["{", '"city": "Paris"}'], "", '{"city": "Paris"}', 0),  # JSON that is no call comes out at the end
    (["Use <tool", "s> wisely"], "Use <tools> wisely", "", 0),  # a marker's prefix that turns out not to be one
    (["[TOOL", '_CALLS] [{"name": "add", "arguments": {"a": 1, "b": 2}}]'], "", "", 1),
])
def test_tool_stream_holds_back_what_may_be_a_call(pieces, streamed, tail, n_calls):
    stream = ToolStream(TOOLS)
    out = "".join(stream.feed(p) for p in pieces)
    rest, calls = stream.finish()
    assert (out, rest, len(calls)) == (streamed, tail, n_calls)


@pytest.mark.parametrize("tools, choice, match", [
    ([], None, "non-empty list"),
    ([{"type": "function", "function": {"name": "a b"}}], None, "name must be"),
    ([{"type": "retrieval"}], None, "must be"),
    ([{"function": {"name": "f"}}, {"function": {"name": "f"}}], None, "second function"),
    ([{"function": {"name": "f", "parameters": "x"}}], None, "parameters"),
    ([{"function": {"name": "f", "extra": 1}}], None, "unknown key"),
    (None, "required", "needs tools"),
    ([{"function": {"name": "f"}}], "always", "tool_choice must be"),
    ([{"function": {"name": "f"}}], {"type": "function", "function": {"name": "g"}}, "not one of the tools"),
])
def test_bad_tools_are_usage_errors(tools, choice, match):
    with pytest.raises(UsageError, match=match):
        tool_setup(tools, choice)


def test_a_template_without_tools_gets_them_in_the_system_message():
    t = ChatTemplate(CHATML)
    text = t.render([{"role": "user", "content": "Weather?"}], tools=TOOLS)
    assert text.startswith("<|im_start|>system\nYou may call") and '"name": "get_weather"' in text
    text = t.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}],
                    tools=TOOLS)
    assert text.count("<|im_start|>system") == 1 and "</tool_call>\n\nBe brief.<|im_end|>" in text
    history = [{"role": "user", "content": [{"type": "text", "text": "Weather"}, {"type": "text", "text": "in Paris?"}]},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                     "arguments": '{"city": "Paris", "unit": "C"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18"}]
    text = t.render(history)
    assert "Weather\nin Paris?" in text
    assert f'<|im_start|>assistant\n<tool_call>\n{WEATHER}\n</tool_call><|im_end|>' in text
    assert "<|im_start|>tool\n18<|im_end|>" in text


def test_a_template_with_tools_renders_them_itself():
    source = ("{% if tools %}{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% endif %}"
              "{% for m in messages %}{{ m.role }}:{% if m.tool_calls %}"
              "{% for c in m.tool_calls %}{{ c.function.name }}({{ c.function.arguments.city }}){% endfor %}"
              "{% else %}{{ m.content }}{% endif %};{% endfor %}")
    history = [{"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c", "type": "function", "function": {"name": "get_weather",
                                                                "arguments": '{"city": "Oslo", "unit": "C"}'}}]}]
    assert ChatTemplate(source).render(history, tools=TOOLS) == "[get_weather][add]user:Weather?;assistant:get_weather(Oslo);"


@pytest.fixture(scope="module")
def model():
    with edgelm.load(n_ctx=1024, n_threads=2, prefix_cache_bytes=0) as m:
        yield m


def check_call(call, tools=TOOLS):
    """The call names a tool and its arguments satisfy that tool's schema (the parts these schemas use)."""
    schema = next(t["function"]["parameters"] for t in tools if t["function"]["name"] == call.name)
    args = json.loads(call.arguments)
    assert set(schema["required"]) <= set(args) <= set(schema["properties"])
    for key, value in args.items():
        spec = schema["properties"][key]
        if "enum" in spec:
            assert value in spec["enum"]
        elif spec["type"] == "integer":
            assert isinstance(value, int)
        else:
            assert isinstance(value, str) and len(value) <= spec["maxLength"]


def test_required_forces_a_valid_call(model):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    out = model.chat(messages, tools=TOOLS, tool_choice="required", max_tokens=96, temperature=0)
    assert out.finish_reason == "tool_calls" and len(out.tool_calls) == 1 and out.text == ""
    check_call(out.tool_calls[0])
    named = model.chat(messages, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                       max_tokens=96, temperature=0)
    assert [c.name for c in named.tool_calls] == ["get_weather"]
    check_call(named.tool_calls[0])
    chunks = list(model.chat_stream(messages, tools=TOOLS, tool_choice="required", max_tokens=96, temperature=0))
    assert "".join(c.text for c in chunks) == "" and chunks[-1].finish_reason == "tool_calls"
    assert [(c.name, c.arguments) for c in chunks[-1].tool_calls] == [(c.name, c.arguments) for c in out.tool_calls]


def test_tool_choice_none_and_auto(model):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    plain = model.chat(messages, max_tokens=16, temperature=0)
    assert model.chat(messages, tools=TOOLS, tool_choice="none", max_tokens=16, temperature=0).text == plain.text
    auto = model.chat(messages, tools=TOOLS, max_tokens=16, temperature=0)  # a code model that was never taught tools
    assert auto.tool_calls is None and auto.finish_reason in ("stop", "length") and auto.text != plain.text
    with pytest.raises(UsageError, match="grammar"):
        model.chat(messages, tools=TOOLS, tool_choice="required", grammar='root ::= "x"')
