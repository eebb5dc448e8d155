"""Anthropic's Messages API, POST /v1/messages and /v1/messages/count_tokens (as llama-server has them), over the
chat path, so clients written for Anthropic's SDK run against a local model.

`system` and `messages` (text, tool_use and tool_result blocks) become chat messages, `tools` (name,
description, input_schema) and `tool_choice` (auto, any, tool, none) chat's, `thinking` the template's
enable_thinking switch, `stop_sequences` stop strings. The reply is a Message with text, tool_use and thinking
blocks and Anthropic's stop_reason, or, with "stream": true, Anthropic's event stream (message_start,
content_block_start / _delta / _stop, message_delta, message_stop). Errors are Anthropic's error bodies
(openai_api.APIError picks the shape by path).
"""
from __future__ import annotations

import json
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from .errors import UsageError
from .openai_api import EXTRA_SAMPLING, APIError, stopping_word
from .runtime.reasoning import prompt_opens_thinking
from .runtime.tools import forcing_call, split_reply, tool_setup
from .serving import read_body, reply_parts, wait_for

FIELDS = {"model", "max_tokens", "messages", "system", "stop_sequences", "stream", "tools", "tool_choice", "metadata",
          "thinking", "output_config", "service_tier", "cache_control", "container", "diagnostics", "inference_geo",
          "speed", "user_profile_id", "workspace_id"}  # and temperature, top_p, top_k, ... (EXTRA_SAMPLING)
THINKING = {"enabled": True, "between_tools": True, "disabled": False, "adaptive": None}  # None: the template's own
CHOICES = {"auto": "auto", "any": "required", "none": "none"}


def _blocks(content: Any, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
        raise APIError(400, f"{where}.content must be a string or a list of content blocks")
    return content


def _text(blocks: list[dict], where: str) -> str:
    out = []
    for j, block in enumerate(blocks):
        if block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise APIError(400, f"{where}[{j}]: only text blocks are supported here, not {block.get('type')!r}")
        out.append(block["text"])
    return "".join(out)


def chat_messages(body: dict) -> list[dict]:
    """Chat messages from `system` and `messages`; a user turn's tool_result blocks are tool messages before it."""
    system, turns = body.get("system"), body.get("messages")
    messages = []
    if system:
        messages.append({"role": "system", "content": system if isinstance(system, str) else
                         _text(_blocks(system, "system"), "system")})
    if not isinstance(turns, list) or not turns:
        raise APIError(400, "messages must be a non-empty list")
    for i, turn in enumerate(turns):
        role = turn.get("role") if isinstance(turn, dict) else None
        if role not in ("user", "assistant"):
            raise APIError(400, f"messages[{i}].role must be user or assistant, not {role!r}")
        texts, calls = [], []
        for j, block in enumerate(_blocks(turn.get("content"), f"messages[{i}]")):
            kind, where = block.get("type"), f"messages[{i}].content[{j}]"
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind == "tool_use" and role == "assistant":
                calls.append({"id": block.get("id"), "type": "function", "function": {
                    "name": block.get("name"), "arguments": json.dumps(block.get("input") or {})}})
            elif kind == "tool_result" and role == "user":
                result = block.get("content", "")
                text = result if isinstance(result, str) else _text(_blocks(result, where), where + ".content")
                messages.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                                 "content": ("Error: " + text) if block.get("is_error") else text})
            elif kind not in ("thinking", "redacted_thinking") or role != "assistant":
                raise APIError(400, f"{where}: a {role} turn takes text{', tool_use' * (role == 'assistant')}"
                                    f"{', tool_result' * (role == 'user')} blocks, not {kind!r}")
        if texts or calls or not messages or messages[-1]["role"] != "tool":
            message = {"role": role, "content": "".join(texts)}
            messages.append({**message, "tool_calls": calls} if calls else message)
    return messages


def chat_tools(body: dict) -> tuple[list[dict] | None, Any]:
    """(chat's tools, chat's tool_choice) from Anthropic's."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is not None:
        if not isinstance(tools, list):
            raise APIError(400, "tools must be a list")
        out = []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type", "custom") != "custom":
                kind = tool.get("type") if isinstance(tool, dict) else tool
                raise APIError(400, f"tools[{i}]: only custom tools (name, input_schema) are supported, not {kind!r}")
            fn = {"name": tool.get("name"), "parameters": tool.get("input_schema", {"type": "object"})}
            out.append({"type": "function", "function": {**fn, "description": tool.get("description", "")}})
        tools = out or None
    if choice is not None:
        kind = choice.get("type") if isinstance(choice, dict) else None
        if kind == "tool":
            choice = {"type": "function", "function": {"name": choice.get("name")}}
        elif kind in CHOICES:
            choice = CHOICES[kind]
        else:
            raise APIError(400, "tool_choice.type must be auto, any, tool or none")
    return tools, choice


def sampling_fields(body: dict) -> dict:
    """The chat completion fields (for sampling_params) that a Messages request's stand for."""
    unknown = sorted(set(body) - FIELDS - EXTRA_SAMPLING)
    if unknown:
        raise APIError(400, f"unknown field(s): {', '.join(unknown)}")
    if body.get("max_tokens") is None:
        raise APIError(400, "max_tokens is required")
    out = {k: v for k, v in body.items() if (k in EXTRA_SAMPLING or k == "max_tokens") and v is not None}
    if body.get("stop_sequences"):
        out["stop"] = body["stop_sequences"]
    output = body.get("output_config") or {}
    fmt = output.get("format") if isinstance(output, dict) else None
    if fmt is not None:  # structured output
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
            raise APIError(400, "output_config.format must be {type: json_schema, schema: {...}}")
        out["response_format"] = {"type": "json_schema", "json_schema": {"schema": fmt["schema"]}}
    return out


def thinking_switch(body: dict) -> dict | None:
    thinking = body.get("thinking")
    if thinking is None:
        return None
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind not in THINKING:
        raise APIError(400, f"thinking.type must be one of {', '.join(THINKING)}")
    return None if THINKING[kind] is None else {"enable_thinking": THINKING[kind]}  # Qwen3's template switch


def add_routes(app: FastAPI, models) -> None:
    async def prepared(request: Request):
        body = await read_body(request)
        server = await models.get(request, body.get("model"))
        tools, choice = chat_tools(body)
        try:
            tools, grammar = tool_setup(tools, choice)
        except UsageError as e:
            raise APIError(400, str(e)) from None
        tokens = server.chat_prompt(chat_messages(body), tools, thinking_switch(body))
        return body, server, tools, grammar, tokens

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request):
        _, _, _, _, tokens = await prepared(request)
        return {"input_tokens": len(tokens)}

    @app.post("/v1/messages")
    async def messages(request: Request):
        body, server, tools, grammar, tokens = await prepared(request)
        params = server.sampling(sampling_fields(body), chat=True)
        if grammar is not None:
            try:
                params = forcing_call(params, grammar)
            except UsageError as e:
                raise APIError(400, str(e)) from None
        opened = prompt_opens_thinking(server.llama, tokens)
        (req,) = server.submit(tokens, params)
        reply = Reply(server, body.get("model") or server.model_id, params.stop)
        if body.get("stream"):
            return StreamingResponse(reply.events(request, req, tools, opened, len(tokens)),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        if not await wait_for(request, [req]):
            raise APIError(499, "client disconnected")
        thinking, text, calls = split_reply(req.completion().text, tools, opened)
        content = [{"type": "thinking", "thinking": thinking, "signature": ""}] if thinking else []
        content += [{"type": "text", "text": text}] if text or not calls else []
        content += [reply.tool_use(call) for call in calls]
        return reply.message(req, content, calls)


class Reply:
    def __init__(self, server, model: str, stops: tuple[str, ...]):
        self.server, self.model, self.stops, self.id = server, model, stops, f"msg_{uuid.uuid4().hex[:24]}"

    def tool_use(self, call) -> dict:
        return {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": call.name,
                "input": json.loads(call.arguments)}

    def stop(self, req, calls) -> tuple[str, str | None]:
        if calls:
            return "tool_use", None
        if req.finish_reason == "length":
            return "max_tokens", None
        if req.finish_reason == "stop":
            stop = stopping_word(self.server.llama, req.completion(), self.stops)
            if stop is not None:
                return "stop_sequence", stop
        return "end_turn", None

    def usage(self, req) -> dict:
        t = req.timings
        return {"input_tokens": t.prompt_tokens - t.cached_tokens, "cache_read_input_tokens": t.cached_tokens,
                "cache_creation_input_tokens": 0, "output_tokens": t.completion_tokens}

    def message(self, req, content: list[dict], calls) -> dict:
        reason, sequence = self.stop(req, calls)
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": reason, "stop_sequence": sequence, "usage": self.usage(req)}

    @staticmethod
    def event(kind: str, **fields) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields}, ensure_ascii=False)}\n\n"

    async def events(self, request, req, tools, opened, n_prompt: int):
        """Anthropic's event stream of `req`: thinking and text blocks as their deltas come, tool_use blocks once
        the reply has ended. message_start counts the whole prompt; message_delta says how much of it was cached."""
        start = {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                 "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": n_prompt, "output_tokens": 0}}
        yield self.event("message_start", message=start)
        index, current = -1, None  # the block being written: "thinking" or "text"

        def block(kind: str, delta: str):
            nonlocal index, current
            if not delta:
                return
            if current != kind:
                if current is not None:
                    yield self.event("content_block_stop", index=index)
                index, current = index + 1, kind
                empty = {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" else {
                    "type": "text", "text": ""}
                yield self.event("content_block_start", index=index, content_block=empty)
            field = "thinking" if kind == "thinking" else "text"
            yield self.event("content_block_delta", index=index, delta={"type": f"{field}_delta", field: delta})

        async for chunk, thinking, text, calls in reply_parts(self.server, request, req, tools, opened):
            for line in [*block("thinking", thinking), *block("text", text)]:
                yield line
            if chunk.finish_reason is None:
                continue
            if current is None and not calls:  # an empty reply is still a text block
                index, current = 0, "text"
                yield self.event("content_block_start", index=0, content_block={"type": "text", "text": ""})
            if current is not None:
                yield self.event("content_block_stop", index=index)
            for call in calls:
                index += 1
                use = self.tool_use(call)
                yield self.event("content_block_start", index=index, content_block={**use, "input": {}})
                yield self.event("content_block_delta", index=index,
                                 delta={"type": "input_json_delta", "partial_json": call.arguments})
                yield self.event("content_block_stop", index=index)
            reason, sequence = self.stop(req, calls)
            yield self.event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence},
                             usage=self.usage(req))
            yield self.event("message_stop")
