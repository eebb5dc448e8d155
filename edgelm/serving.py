"""What the server's routes share (OpenAI's, Ollama's, llama-server's, the router's): reading a request's
body, following engine requests to a client that may leave, and the guard middleware (API key, body size,
request counts, and the release of router leases once a response has been sent)."""
from __future__ import annotations

import asyncio
import hmac
import json
import time

from fastapi import Request

from .request import POLL_S
from .errors import UsageError
from .openai_api import APIError
from .router import RELEASE
from .runtime.chat import template_kwargs
from .runtime.tools import ReplyStream, tool_setup

MAX_BODY_BYTES = 4 << 20
DISCONNECT_EVERY = 10  # ticks between checks for a client that went away


async def read_body(request: Request) -> dict:
    """The request's JSON object; APIError for one too large, not JSON, or not an object."""
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"request body larger than {MAX_BODY_BYTES} bytes")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


async def chat_request(request: Request, models) -> tuple[dict, object, list | None, object, dict]:
    """(body, its model's server, tools, the grammar forcing its tool_choice or None, chat_template_kwargs) of a
    request carrying chat messages: what chat completions, their token count and /apply-template read first; a
    400 names the bad field."""
    body = await read_body(request)
    if "messages" not in body:
        raise APIError(400, "messages is required", param="messages")
    server = await models.get(request, body.get("model"))
    try:
        tools, grammar = tool_setup(body.get("tools"), body.get("tool_choice"))
    except UsageError as e:
        raise APIError(400, str(e), param="tool_choice" if "tool_choice" in str(e) else "tools") from None
    try:
        extra = template_kwargs(body.get("chat_template_kwargs"))
    except UsageError as e:
        raise APIError(400, str(e), param="chat_template_kwargs") from None
    return body, server, tools, grammar, extra


async def follow(server, request: Request, reqs: list):
    """(choice, chunk) as the engine's requests make them, looked for on a shared tick rather than on a wake-up per
    token (see Request.__iter__), with a disconnect check every few ticks; requests still running when it stops
    (the client left, or the handler failed) are cancelled, which frees their slots."""
    loop = asyncio.get_running_loop()
    waiting, ticks = set(range(len(reqs))), 0
    first = set(waiting)
    try:
        while waiting:
            for i in sorted(waiting):
                for chunk in reqs[i].drain():
                    if i in first and (chunk.text or chunk.tokens):
                        server.metrics.observe_ttft(time.perf_counter() - reqs[i].submitted)
                        first.discard(i)
                    yield i, chunk
                    if chunk.finish_reason is not None:
                        waiting.discard(i)
            if not waiting:
                return
            ticks += 1
            if ticks % DISCONNECT_EVERY == 0 and await request.is_disconnected():
                return
            await asyncio.sleep(POLL_S - loop.time() % POLL_S)  # every stream wakes on the same tick
    finally:
        cancel_unfinished(reqs)


async def reply_parts(server, request: Request, req, tools: list[dict] | None, opened: bool):
    """(chunk, thinking, text, calls) of one chat request as it streams: its text split into thinking and
    content (text that may be a tool call held back), and its calls with the last chunk; nothing more once it is
    cancelled. What Ollama's, the Responses and the Messages streams share."""
    reply = ReplyStream(tools, opened)
    async for _, chunk in follow(server, request, [req]):
        thinking, text = reply.feed(chunk.text)
        calls = []
        if chunk.finish_reason is not None:
            more, rest, calls = reply.finish()
            thinking, text = thinking + more, text + rest
        if chunk.finish_reason == "cancelled":
            return
        yield chunk, thinking, text, calls


async def wait_for(request: Request, reqs: list) -> bool:
    """Wait for every request to end, in a worker thread that wakes only then or to look for a departed client
    (instead of at every tick); False, with the requests cancelled, if the client left."""
    try:
        for req in reqs:
            while not await asyncio.to_thread(req.wait, DISCONNECT_EVERY * POLL_S):
                if await request.is_disconnected():
                    return False
        return True
    finally:
        cancel_unfinished(reqs)


def cancel_unfinished(reqs: list) -> None:
    for req in reqs:
        if req.finish_reason is None:
            req.cancel()


class Guard:
    """API key and body size checks, and request counts by endpoint and status. A plain ASGI middleware:
    Starlette's BaseHTTPMiddleware would hide a client's disconnect from the handlers."""

    def __init__(self, app, options, metrics):
        self.app, self.options, self.metrics = app, options, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, status = scope["path"], [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            key = self.options.api_key
            if key is not None and (path.startswith(KEYED_PREFIXES) or path in KEYED) and path not in PUBLIC:
                _check_key(headers, key)
            size = headers.get("content-length")
            limited = scope["method"] == "POST" and not path.startswith(BLOBS)  # a blob is a model's size
            if limited and size is not None and (not size.isdecimal() or int(size) > MAX_BODY_BYTES):
                raise APIError(413, f"request body larger than {MAX_BODY_BYTES} bytes")
        except APIError as e:
            await e.response(path)(scope, receive, send_status)
        else:
            releases = scope[RELEASE] = []  # router mode: the leases a handler took on its model
            try:
                await self.app(scope, receive, send_status)  # returns once the response is sent, streams too
            finally:
                for release in releases:
                    release()
        finally:
            self.metrics.request(path if path in ROUTES else BLOBS if path.startswith(BLOBS) else "other", status[0])


PUBLIC = {"/health", "/v1/health"}  # what an API key never guards
OLLAMA = "/api/"  # Ollama's routes (ollama_api.py)
KEYED_PREFIXES = ("/v1/", OLLAMA, "/slots/")  # what an API key guards: OpenAI's, Ollama's and /slots/N routes
BLOBS = "/api/blobs/"  # Ollama's uploads (ollama_store.py): counted under one name
# besides /v1/ and /api/: what an API key guards
KEYED = {"/tokenize", "/detokenize", "/lora-adapters", "/props", "/responses", "/chat/completions", "/completion",
         "/completions", "/infill", "/embedding", "/embeddings", "/apply-template", "/slots",
         "/chat/completions/input_tokens", "/responses/input_tokens"}
KEYED |= {"/models", "/models/load", "/models/unload"}  # router mode's (llama-server's)
ROUTES = {*PUBLIC, "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings",
          "/v1/responses", "/v1/messages", "/v1/messages/count_tokens", *KEYED,
          "/models", "/models/load", "/models/unload",
          *(OLLAMA + r for r in ("generate", "chat", "embed", "embeddings", "tags", "ps", "show", "version", "pull",
                                 "create", "copy", "delete"))}


def _check_key(headers: dict[str, str], key: str) -> None:
    auth = headers.get("authorization", "")
    given = auth[7:] if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
    if not given or not hmac.compare_digest(given.encode(), key.encode()):
        raise APIError(401, "invalid or missing API key (Authorization: Bearer KEY, or X-Api-Key)",
                       type="invalid_request_error", code="invalid_api_key")
