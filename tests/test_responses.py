"""OpenAI's Responses API (/v1/responses) driven by the official `openai` SDK, whose stream helper checks the
event sequence as it accumulates it: the same replies as /v1/chat/completions, tool calls, thinking, errors."""
from __future__ import annotations

import json

import httpx
import pytest
from test_server import KEY, client, server  # noqa: F401 (fixtures: a server with an API key, its OpenAI client)


def chat(client, messages, **kw):
    return client.chat.completions.create(model="x", messages=messages, temperature=0, **kw)


def test_a_response_is_the_chat_reply(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
    ref = chat(client, messages, max_tokens=12)
    out = client.responses.create(model="x", instructions="Be brief.", input="Say hello.", max_output_tokens=12,
                                  temperature=0)
    assert out.object == "response" and out.id.startswith("resp_") and out.output_text == ref.choices[0].message.content
    assert (out.status == "incomplete") == (ref.choices[0].finish_reason == "length")
    if out.status == "incomplete":
        assert out.incomplete_details.reason == "max_output_tokens"
    assert (out.usage.input_tokens, out.usage.output_tokens) == (ref.usage.prompt_tokens, ref.usage.completion_tokens)
    # items, and a developer message, are a conversation as chat's messages are
    items = [{"role": "developer", "content": "Be brief."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hello."}]}]
    assert client.responses.create(model="x", input=items, max_output_tokens=12, temperature=0).output_text == \
        out.output_text

    with client.responses.stream(model="x", instructions="Be brief.", input="Say hello.", max_output_tokens=12,
                                 temperature=0) as stream:
        events = list(stream)
    # a reply cut at max_output_tokens ends with response.incomplete, one that ends itself with response.completed
    assert events[-1].type == {"completed": "response.completed", "incomplete": "response.incomplete"}[out.status]
    final = events[-1].response
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == final.output_text == out.output_text and final.status == out.status
    assert final.usage.output_tokens == out.usage.output_tokens


def test_tool_calls_and_their_results(client):
    tools = [{"type": "function", "name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}}]
    kw = dict(model="x", input="What is the weather in Paris?", tools=tools, tool_choice="required",
              max_output_tokens=96, temperature=0)
    out = client.responses.create(**kw)
    (call,) = [item for item in out.output if item.type == "function_call"]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)
    chat_tools = [{"type": "function", "function": {k: v for k, v in tools[0].items() if k != "type"}}]
    ref = chat(client, [{"role": "user", "content": "What is the weather in Paris?"}], max_tokens=96,
               tools=chat_tools, tool_choice="required")
    assert call.arguments == ref.choices[0].message.tool_calls[0].function.arguments
    with client.responses.stream(**kw) as stream:
        done = [e.arguments for e in stream if e.type == "response.function_call_arguments.done"]
        final = stream.get_final_response()
    assert done == [call.arguments] and [i.type for i in final.output] == ["function_call"]
    # the call and its output sent back, as a stateless client keeps the conversation
    follow = [{"role": "user", "content": "What is the weather in Paris?"},
              {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
              {"type": "function_call_output", "call_id": call.call_id, "output": "18 C and sunny"}]
    reply = client.responses.create(model="x", input=follow, tools=tools, max_output_tokens=8, temperature=0)
    messages = [follow[0], {"role": "assistant", "content": "", "tool_calls": [
        {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "18 C and sunny"}]
    again = chat(client, messages, max_tokens=8, tools=chat_tools)
    assert reply.output_text == (again.choices[0].message.content or "")


def test_thinking_is_a_reasoning_item(client):
    grammar = r'root ::= "<think>\n" [a-z]{2,6} " " [a-z]{2,6} "\n</think>\n\n" [a-z]{1,8}'
    kw = dict(model="x", input="Two plus two?", max_output_tokens=48, temperature=0, extra_body={"grammar": grammar})
    out = client.responses.create(**kw)
    assert [i.type for i in out.output] == ["reasoning", "message"]
    thought = out.output[0].content[0].text
    assert " " in thought and "<think>" not in out.output_text and out.output_text.isalpha()
    with client.responses.stream(**kw) as stream:
        thinking = "".join(e.delta for e in stream if e.type == "response.reasoning_text.delta")
        final = stream.get_final_response()
    assert thinking.strip() == thought.strip() and final.output_text == out.output_text


@pytest.mark.parametrize("body, param", [
    ({"input": []}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": "hi", "tool_choice": "required"}, "tools"),
    ({"input": "hi", "warp": 9}, "warp"),
    ({"input": "hi", "temperature": -1}, None),
    ({"input": "hi", "text": {"format": {"type": "yaml"}}}, "text"),
])
def test_bad_requests_are_400(server, body, param):
    r = httpx.post(server.base + "/v1/responses", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert httpx.post(server.base + "/responses", json={"input": "hi"}).status_code == 401  # the key guards it too


def test_input_tokens_count_the_prompt(server, client):
    """OpenAI's responses.input_tokens.count and llama-server's /v1/chat/completions/input_tokens: the prompt tokens
    the request would take, as its usage reports them."""
    tools = [{"type": "function", "name": "get_weather", "description": "Weather of a city.",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    out = client.responses.create(model="x", instructions="Be brief.", input="Say hello.", max_output_tokens=2,
                                  temperature=0, tools=tools)
    count = client.responses.input_tokens.count(model="x", instructions="Be brief.", input="Say hello.", tools=tools)
    assert count.input_tokens == out.usage.input_tokens and count.object == "response.input_tokens"
    messages = [{"role": "user", "content": "Say hello."}]
    ref = chat(client, messages, max_tokens=2)
    r = httpx.post(server.base + "/v1/chat/completions/input_tokens", json={"messages": messages},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.json() == {"object": "response.input_tokens", "input_tokens": ref.usage.prompt_tokens}
    assert httpx.post(server.base + "/chat/completions/input_tokens", json={"messages": messages}).status_code == 401
    r = httpx.post(server.base + "/v1/chat/completions/input_tokens", json={}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
