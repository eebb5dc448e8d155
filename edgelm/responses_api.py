"""OpenAI's Responses API, POST /v1/responses (and /responses, as llama-server routes it), over the chat path.

A request's `instructions` and `input` (a string, or items: messages with input_text / output_text parts,
function_call and function_call_output items) become chat messages, its `tools` (Responses' flat function tools)
and `tool_choice` chat's, `text.format` chat's response_format, `max_output_tokens` max_tokens; the reply is the
Response object, with a message item (output_text), function_call items and a reasoning item for a thinking
model's thoughts, or, with "stream": true, the Responses event stream (response.created ... response.completed)
that OpenAI's SDKs read. Nothing is stored: `previous_response_id` is refused (send the conversation in `input`,
as a stateless client does), and `store` is always false in replies.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from .errors import UsageError
from .openai_api import EXTRA_SAMPLING, APIError
from .runtime.reasoning import prompt_opens_thinking
from .runtime.tools import forcing_call, split_reply, tool_setup
from .serving import read_body, reply_parts, wait_for

FIELDS = {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "tools",
          "tool_choice", "text", "store", "metadata", "user", "parallel_tool_calls", "reasoning", "truncation",
          "include", "stream_options", "service_tier", "prompt_cache_key", "safety_identifier", "previous_response_id",
          "background", "top_logprobs", "max_tool_calls"}
UNSUPPORTED = {"previous_response_id": "edgelm stores no responses: send the whole conversation in input",
               "background": "responses run in the foreground", "top_logprobs": "use /v1/chat/completions for logprobs",
               "max_tool_calls": "tools run in the client"}
ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def chat_fields(body: dict) -> dict:
    """The chat completion fields (for sampling_params) that a Responses request's stand for."""
    unknown = sorted(set(body) - FIELDS - EXTRA_SAMPLING)
    if unknown:
        raise APIError(400, f"unknown field(s): {', '.join(unknown)}", param=unknown[0])
    for field, why in UNSUPPORTED.items():
        if body.get(field) not in (None, False):
            raise APIError(400, f"{field} is not supported: {why}", param=field)
    out = {k: v for k, v in body.items() if k in EXTRA_SAMPLING and v is not None}
    if body.get("max_output_tokens") is not None:
        out["max_tokens"] = body["max_output_tokens"]
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise APIError(400, "text.format.type must be text, json_object or json_schema", param="text")
        out["response_format"] = ({"type": "json_schema", "json_schema": {"schema": fmt.get("schema")}}
                                  if fmt["type"] == "json_schema" else {"type": fmt["type"]})
    return out


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of parts", param="input")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
            raise APIError(400, f"{where}.content[{j}]: only text parts are supported (input_text, output_text), "
                                f"not {kind!r}", param="input")
        parts.append(part["text"])
    return "".join(parts)


def chat_messages(body: dict) -> list[dict]:
    """Chat messages from `instructions` and `input`."""
    instructions, items = body.get("instructions"), body.get("input")
    if instructions is not None and not isinstance(instructions, str):
        raise APIError(400, "instructions must be a string", param="instructions")
    messages = [{"role": "system", "content": instructions}] if instructions else []
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise APIError(400, "input must be a string or a non-empty list of items", param="input")
    for i, item in enumerate(items):
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message" and item.get("role") in ROLES:
            messages.append({"role": ROLES[item["role"]], "content": _text(item.get("content"), f"input[{i}]")})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") and not last["content"]:
                last["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else json.dumps(output)})
        elif kind != "reasoning":  # a reasoning item of an earlier reply: its thoughts are not sent back
            raise APIError(400, f"input[{i}]: items are messages (user, system, developer, assistant), "
                                f"function_call, function_call_output or reasoning, not {kind!r}", param="input")
    return messages


def chat_tools(body: dict) -> tuple[list[dict] | None, Any]:
    """(chat's tools, chat's tool_choice) from Responses' flat function tools."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is not None:
        if not isinstance(tools, list):
            raise APIError(400, "tools must be a list", param="tools")
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type") != "function":
                kind = tool.get("type") if isinstance(tool, dict) else tool
                raise APIError(400, f"tools[{i}]: only function tools are supported, not {kind!r}", param="tools")
        tools = [{"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters") if k in t}}
                 for t in tools] or None
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    return tools, choice


def add_routes(app: FastAPI, models) -> None:
    async def responses(request: Request):
        body = await read_body(request)
        server = await models.get(request, body.get("model"))
        params = server.sampling(chat_fields(body), chat=True)
        try:
            tools, grammar = tool_setup(*chat_tools(body))
            if grammar is not None:
                params = forcing_call(params, grammar)
        except UsageError as e:
            raise APIError(400, str(e), param="tools") from None
        tokens = server.chat_prompt(chat_messages(body), tools)
        opened = prompt_opens_thinking(server.llama, tokens)
        (req,) = server.submit(tokens, params)
        reply = Reply(_new_id("resp"), server.model_id, body)
        if body.get("stream"):
            return StreamingResponse(reply.events(server, request, req, tools, opened), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        if not await wait_for(request, [req]):
            raise APIError(499, "client disconnected", type="cancelled")
        reasoning, content, calls = split_reply(req.completion().text, tools, opened)
        if reasoning:
            reply.reasoning(reasoning)
        if content or not calls:
            reply.message(content)
        for call in calls:
            reply.call(call)
        return reply.response(req)

    async def input_tokens(request: Request):
        """OpenAI's responses.input_tokens.count: the prompt tokens a Responses request would take."""
        body = await read_body(request)
        server = await models.get(request, body.get("model"))
        try:
            tools, _ = tool_setup(*chat_tools(body))
        except UsageError as e:
            raise APIError(400, str(e), param="tools") from None
        return {"object": "response.input_tokens", "input_tokens": len(server.chat_prompt(chat_messages(body), tools))}

    for path in ("/v1/responses", "/responses"):
        app.post(path)(responses)
        app.post(path + "/input_tokens")(input_tokens)


class Reply:
    """A Response object as it is built: its output items, and the events that announce them."""

    def __init__(self, rid: str, model: str, body: dict):
        self.id, self.model, self.body, self.created = rid, model, body, int(time.time())
        self.output: list[dict] = []
        self.sequence = 0

    def response(self, req=None) -> dict:
        """The Response: in progress without `req`, else finished as `req` finished."""
        tools = self.body.get("tools") or []
        out = {"id": self.id, "object": "response", "created_at": self.created, "status": "in_progress",
               "error": None, "incomplete_details": None, "instructions": self.body.get("instructions"),
               "max_output_tokens": self.body.get("max_output_tokens"), "model": self.model,
               "output": self.output, "parallel_tool_calls": self.body.get("parallel_tool_calls", True),
               "previous_response_id": None, "reasoning": {"effort": None, "summary": None}, "store": False,
               "temperature": self.body.get("temperature", 1.0), "text": self.body.get("text") or {
                   "format": {"type": "text"}}, "tool_choice": self.body.get("tool_choice", "auto"), "tools": tools,
               "top_p": self.body.get("top_p", 1.0), "truncation": "disabled", "usage": None,
               "metadata": self.body.get("metadata") or {}}
        if req is not None:
            t = req.timings
            out["status"] = "incomplete" if req.finish_reason == "length" else "completed"
            if req.finish_reason == "length":
                out["incomplete_details"] = {"reason": "max_output_tokens"}
            out["usage"] = {"input_tokens": t.prompt_tokens, "input_tokens_details": {"cached_tokens": t.cached_tokens},
                            "output_tokens": t.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                            "total_tokens": t.prompt_tokens + t.completion_tokens}
        return out

    def message(self, text: str) -> dict:
        item = {"type": "message", "id": _new_id("msg"), "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}
        self.output.append(item)
        return item

    def reasoning(self, text: str) -> dict:
        item = {"type": "reasoning", "id": _new_id("rs"), "summary": [],
                "content": [{"type": "reasoning_text", "text": text}], "status": "completed"}
        self.output.append(item)
        return item

    def call(self, call) -> dict:
        item = {"type": "function_call", "id": _new_id("fc"), "call_id": call.id or _new_id("call"),
                "name": call.name, "arguments": call.arguments, "status": "completed"}
        self.output.append(item)
        return item

    def event(self, kind: str, **fields) -> str:
        self.sequence += 1
        obj = {"type": kind, "sequence_number": self.sequence, **fields}
        return f"event: {kind}\ndata: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def events(self, server, request, req, tools, opened):
        """The Responses event stream of `req`: its text as response.output_text.delta events while it comes
        (thoughts as response.reasoning_text.delta), its calls once the reply has ended."""
        yield self.event("response.created", response=self.response())
        yield self.event("response.in_progress", response=self.response())
        open_items = {}  # kind -> (index, item, texts) of the items being written

        def opening(kind: str):
            if kind in open_items:
                return []
            item = {"type": "message", "id": _new_id("msg"), "status": "in_progress", "role": "assistant",
                    "content": []} if kind == "message" else {"type": "reasoning", "id": _new_id("rs"),
                                                               "summary": [], "content": [], "status": "in_progress"}
            open_items[kind] = (len(self.output) + len(open_items), item, [])
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []} if kind == "message" else {
                "type": "reasoning_text", "text": ""}
            index = open_items[kind][0]
            return [self.event("response.output_item.added", output_index=index, item=item),
                    self.event("response.content_part.added", item_id=item["id"], output_index=index,
                               content_index=0, part=part)]

        def delta(kind: str, text: str):
            if not text:
                return []
            events = opening(kind)
            index, item, texts = open_items[kind]
            texts.append(text)
            name = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
            extra = {"logprobs": []} if kind == "message" else {}
            return [*events, self.event(name, item_id=item["id"], output_index=index, content_index=0, delta=text,
                                        **extra)]

        async for chunk, thinking, text, calls in reply_parts(server, request, req, tools, opened):
            for line in [*delta("reasoning", thinking), *delta("message", text)]:
                yield line
            if chunk.finish_reason is None:
                continue
            if "message" not in open_items and not calls:
                for line in opening("message"):  # an empty reply is still a message
                    yield line
            for kind in sorted(open_items, key=lambda k: open_items[k][0]):
                index, item, texts = open_items[kind]
                full = "".join(texts)
                if kind == "message":
                    part = {"type": "output_text", "text": full, "annotations": [], "logprobs": []}
                    yield self.event("response.output_text.done", item_id=item["id"], output_index=index,
                                     content_index=0, text=full, logprobs=[])
                else:
                    part = {"type": "reasoning_text", "text": full}
                    yield self.event("response.reasoning_text.done", item_id=item["id"], output_index=index,
                                     content_index=0, text=full)
                yield self.event("response.content_part.done", item_id=item["id"], output_index=index,
                                 content_index=0, part=part)
                done = {**item, "status": "completed", "content": [part]}
                self.output.append(done)
                yield self.event("response.output_item.done", output_index=index, item=done)
            for call in calls:
                item = self.call(call)
                index = len(self.output) - 1
                yield self.event("response.output_item.added", output_index=index,
                                 item={**item, "arguments": "", "status": "in_progress"})
                yield self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                                 delta=item["arguments"])
                yield self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                 arguments=item["arguments"])
                yield self.event("response.output_item.done", output_index=index, item=item)
            final = self.response(req)
            yield self.event("response.completed" if final["status"] == "completed" else "response.incomplete",
                             response=final)
