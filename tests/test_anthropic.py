"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens) driven by the official `anthropic` SDK, whose
stream helper accumulates the event stream into a Message: the same replies as /v1/chat/completions, tool use and
its results, thinking blocks, stop sequences, Anthropic's error bodies."""
from __future__ import annotations

import json

import anthropic
import httpx
import pytest
from test_server import KEY, server  # noqa: F401 (fixture: a server with an API key)

GREEDY = {"temperature": 0}  # not one of the SDK's arguments now; llama-server's field, which edgelm takes too


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.base, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def openai_client(server):
    import openai

    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_a_message_is_the_chat_reply(client, openai_client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
    ref = openai_client.chat.completions.create(model="x", messages=messages, max_tokens=12, extra_body=GREEDY)
    kw = dict(model="x", system="Be brief.", messages=[{"role": "user", "content": "Say hello."}], max_tokens=12,
              extra_body=GREEDY)
    out = client.messages.create(**kw)
    assert out.type == "message" and out.role == "assistant" and out.id.startswith("msg_")
    assert [b.type for b in out.content] == ["text"] and out.content[0].text == ref.choices[0].message.content
    assert out.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[ref.choices[0].finish_reason]
    assert out.usage.input_tokens + out.usage.cache_read_input_tokens == ref.usage.prompt_tokens
    assert out.usage.output_tokens == ref.usage.completion_tokens
    assert client.messages.count_tokens(model="x", system="Be brief.", messages=kw["messages"]).input_tokens == \
        ref.usage.prompt_tokens
    with client.messages.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert events[0].type == "message_start" and events[0].message.usage.input_tokens == ref.usage.prompt_tokens
    deltas = [e.delta.text for e in events if e.type == "content_block_delta"]
    assert "".join(deltas) == final.content[0].text == out.content[0].text and final.stop_reason == out.stop_reason
    assert final.usage.output_tokens == out.usage.output_tokens


def test_stop_sequences(client):
    long = client.messages.create(model="x", messages=[{"role": "user", "content": "Count: one two three"}],
                                  max_tokens=24, extra_body=GREEDY)
    text = long.content[0].text
    word = next(w for w in text.split() if len(w) > 2 and text.index(w) > 0)  # a word after the reply's start
    out = client.messages.create(model="x", messages=[{"role": "user", "content": "Count: one two three"}],
                                 max_tokens=24, extra_body=GREEDY, stop_sequences=["zzzq", word])
    assert out.stop_reason == "stop_sequence" and out.stop_sequence == word
    assert out.content[0].text == text[:text.index(word)]


def test_tool_use_and_its_result(client, openai_client):
    tools = [{"name": "get_weather", "description": "The weather in a city", "input_schema": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}}]
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model="x", messages=ask, tools=tools, tool_choice={"type": "any"}, max_tokens=96, extra_body=GREEDY)
    out = client.messages.create(**kw)
    (use,) = [b for b in out.content if b.type == "tool_use"]
    assert out.stop_reason == "tool_use" and use.name == "get_weather" and isinstance(use.input["city"], str)
    chat_tools = [{"type": "function", "function": {"name": "get_weather", "description": tools[0]["description"],
                                                    "parameters": tools[0]["input_schema"]}}]
    ref = openai_client.chat.completions.create(model="x", messages=ask, tools=chat_tools, tool_choice="required",
                                                max_tokens=96, extra_body=GREEDY)
    assert use.input == json.loads(ref.choices[0].message.tool_calls[0].function.arguments)
    with client.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    assert [(b.type, b.name, b.input) for b in final.content] == [("tool_use", use.name, use.input)]
    # the result sent back in the next user turn
    follow = [*ask, {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name,
                                                       "input": use.input}]},
              {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 C, sunny"}]}]
    reply = client.messages.create(model="x", messages=follow, tools=tools, max_tokens=8, extra_body=GREEDY)
    call = {"id": use.id, "type": "function", "function": {"name": use.name, "arguments": json.dumps(use.input)}}
    messages = [*ask, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": use.id, "content": "18 C, sunny"}]
    again = openai_client.chat.completions.create(model="x", messages=messages, tools=chat_tools, max_tokens=8,
                                                  extra_body=GREEDY)
    assert "".join(b.text for b in reply.content if b.type == "text") == (again.choices[0].message.content or "")


def test_thinking_blocks(client):
    """A reply that thinks first (forced here by llama-server's grammar field) has its thoughts in a thinking block."""
    grammar = r'root ::= "<think>\n" [a-z]{2,6} " " [a-z]{2,6} "\n</think>\n\n" [a-z]{1,8}'
    kw = dict(model="x", messages=[{"role": "user", "content": "Two plus two?"}], max_tokens=48,
              extra_body={**GREEDY, "grammar": grammar})
    out = client.messages.create(**kw)
    assert [b.type for b in out.content] == ["thinking", "text"]
    assert " " in out.content[0].thinking and out.content[1].text.isalpha()
    with client.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    assert [(b.type, (getattr(b, "thinking", None) or b.text).strip()) for b in final.content] == [
        ("thinking", out.content[0].thinking.strip()), ("text", out.content[1].text)]


def test_structured_output(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}}, "required": ["name"]}
    out = client.messages.create(model="x", messages=[{"role": "user", "content": "A person:"}], max_tokens=48,
                                 output_config={"format": {"type": "json_schema", "schema": schema}}, extra_body=GREEDY)
    if out.stop_reason == "end_turn":
        assert isinstance(json.loads(out.content[0].text)["name"], str)


@pytest.mark.parametrize("body, match", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
    ({"max_tokens": 4, "messages": []}, "messages"),
    ({"max_tokens": 4, "messages": [{"role": "robot", "content": "hi"}]}, "role"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "image"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "bash_20250124"}]}, "tools"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "tool_choice": {"type": "any"}}, "tool"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "thinking": {"type": "deep"}}, "thinking"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "warp": 9}, "warp"),
])
def test_bad_requests_are_anthropic_errors(server, body, match):
    r = httpx.post(server.base + "/v1/messages", json=body, headers={"x-api-key": KEY})
    assert r.status_code == 400 and r.json()["type"] == "error", r.text
    assert r.json()["error"]["type"] == "invalid_request_error" and match in r.json()["error"]["message"]
    r = httpx.post(server.base + "/v1/messages", json=body)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
