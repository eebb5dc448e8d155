"""Ollama's REST API over the same engine, so that apps written for Ollama (its Python and JavaScript clients,
Open WebUI, editor plugins) talk to `edgelm serve` unchanged.

/api/generate, /api/chat (NDJSON streaming by default, tools), /api/embed and /api/embeddings, /api/tags,
/api/ps, /api/show, /api/version. With one model (`edgelm serve MODEL`) a request's "model" is echoed, not used
to choose one; in router mode (router.py) it chooses the model, and `keep_alive` says how long it stays loaded.
Errors are Ollama's {"error": "..."} bodies (server.py picks the shape by path). Options that size the server
(num_ctx, num_thread, num_gpu, ...) are set when it starts (`edgelm serve --ctx ...`) and ignored per request.
As in Ollama, a prompt longer than the context is truncated (a chat loses its oldest turns) unless the request
says "truncate": false, and a generation reaching the context's end shifts it (keeping `num_keep` tokens) unless
it says "shift": false.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from ._version import __version__
from .errors import ChatTemplateError, UsageError
from .gguf_reader import GGUFFile
from .gguf_summary import describe
from .llama_native import insert
from .openai_api import APIError, chat_logprobs, requested_logprobs
from .router import requested_keep_alive
from .runtime.chat import chat_tokens, fit_messages
from .runtime.generate import check_keep, shift_keep, truncated
from .runtime.infill import can_infill
from .runtime.sampling import SamplingParams
from .runtime.reasoning import prompt_opens_thinking
from .runtime.tools import split_reply, tool_setup
from .serving import follow, read_body, reply_parts, wait_for

OPTIONS = {  # Ollama option -> SamplingParams field
    "temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "typical_p": "typical_p",
    "repeat_penalty": "repeat_penalty", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "repeat_last_n": "penalty_last_n", "seed": "seed", "stop": "stop",
    "num_predict": "max_tokens", "mirostat": "mirostat", "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta",
}
SERVER_OPTIONS = {"num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "use_mmap", "use_mlock",
                  "numa", "low_vram", "f16_kv", "vocab_only", "penalize_newline", "tfs_z"}
FIT_OPTIONS = {"num_keep"}  # read by Fit
FOREVER = 253402300799.0  # 9999-12-31T23:59:59Z: expires_at of a model that stays loaded
MESSAGE_KEYS = {"role", "content", "images", "tool_calls", "tool_name", "thinking"}


def now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def ns(seconds: float) -> int:
    return int(seconds * 1e9)


def logprobs_field(llama, params: SamplingParams, items) -> dict:
    """{"logprobs": [{token, logprob, bytes, top_logprobs}, ...]} for `items` (TokenLogprobs) where the request
    asked for them, else nothing: Ollama's shape, which is OpenAI chat's content list."""
    if params.logprobs is None:
        return {}
    return {"logprobs": chat_logprobs(llama, list(items or []))["content"]}


def sampling(body: dict, max_tokens_cap: int, defaults: dict | None = None) -> SamplingParams:
    """SamplingParams from a request's options and format; num_predict < 0 (Ollama: no limit) is the server's cap."""
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "options must be an object")
    unknown = sorted(set(options) - set(OPTIONS) - SERVER_OPTIONS - FIT_OPTIONS)
    if unknown:
        raise APIError(400, f"unknown option(s): {', '.join(unknown)}")
    kwargs = {**(defaults or {}), **{OPTIONS[k]: v for k, v in options.items() if k in OPTIONS and v is not None}}
    if isinstance(kwargs.get("max_tokens"), int) and not isinstance(kwargs["max_tokens"], bool):
        if kwargs["max_tokens"] < 0:
            kwargs["max_tokens"] = max_tokens_cap
    else:
        kwargs.setdefault("max_tokens", max_tokens_cap)
    kwargs["logprobs"] = requested_logprobs(body, chat=True)  # Ollama's fields are chat's: logprobs, top_logprobs
    fmt = body.get("format")
    if fmt == "json":
        kwargs["json_schema"] = {"type": "object"}
    elif isinstance(fmt, dict):
        kwargs["json_schema"] = fmt
    elif fmt not in (None, ""):
        raise APIError(400, f"format must be \"json\" or a JSON schema, not {fmt!r}")
    try:
        return SamplingParams.from_kwargs(**kwargs)
    except (UsageError, TypeError) as e:
        raise APIError(400, str(e)) from None


@dataclass(frozen=True)
class Fit:
    """How a request meets its context: Ollama's truncate and shift (both default true) and num_keep."""

    truncate: bool
    shift: bool
    keep: int  # prompt tokens a shift keeps: num_keep, else the server's --keep
    n_ctx: int  # the context of each request
    bos: int

    @classmethod
    def of(cls, body: dict, server) -> "Fit":
        flags = {}
        for name in ("truncate", "shift"):
            flags[name] = body.get(name)
            if flags[name] is not None and not isinstance(flags[name], bool):
                raise APIError(400, f"{name} must be true or false, not {flags[name]!r}")
        keep = (body.get("options") or {}).get("num_keep")
        if keep is not None:
            try:
                check_keep(keep)
            except UsageError as e:
                raise APIError(400, f"num_keep: {e}") from None
        # a model whose cache cannot shift finishes at the context's end unless the request insists
        shift = server.engine.ctx.can_shift if flags["shift"] is None else flags["shift"]
        return cls(flags["truncate"] is not False, shift, server.options.keep if keep is None else keep,
                   server.options.n_ctx, server.llama.bos)

    def room(self, params: SamplingParams) -> int:
        """Prompt tokens a request may bring: the context less room for its reply (half of it at most)."""
        return self.n_ctx - 1 - min(params.max_tokens, self.n_ctx // 2)

    def tokens(self, tokens: list[int], params: SamplingParams) -> list[int]:
        """`tokens`, or where they overflow the context and truncation is on, their kept head and recent end."""
        if len(tokens) < self.n_ctx or not self.truncate:
            return tokens  # what fits, or what the engine refuses with a 400
        return truncated(tokens, self.room(params), shift_keep(tokens, self.keep, self.bos))


def chat_messages(messages) -> list[dict]:
    """Ollama's messages in OpenAI's shape (runtime.chat validates the rest): tool_name becomes name, tool
    calls keep their object arguments; images are refused, since no model edgelm loads can see them."""
    if not isinstance(messages, list):
        raise APIError(400, "messages must be a list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object")
        unknown = sorted(set(m) - MESSAGE_KEYS)
        if unknown:
            raise APIError(400, f"messages[{i}] has unknown key(s) {', '.join(unknown)}")
        if m.get("images"):
            raise APIError(400, f"messages[{i}]: images are not supported (no vision model is loaded)")
        msg = {"role": m.get("role"), "content": m.get("content", "")}
        if m.get("tool_calls"):
            msg["tool_calls"] = m["tool_calls"]
        if m.get("tool_name") is not None:
            msg["name"] = m["tool_name"]
        out.append(msg)
    return out


def details(gguf: GGUFFile) -> dict:
    summary = describe(gguf)
    types = list(summary["bytes_by_type"])
    return {"parent_model": "", "format": "gguf", "family": summary["architecture"] or "",
            "families": [summary["architecture"] or ""], "parameter_size": summary["size_label"] or "",
            "quantization_level": types[0].upper() if types else ""}


def entry(name: str, gguf: GGUFFile, digest: str | None = None) -> dict:
    """An /api/tags and /api/ps row."""
    return {"name": name, "model": name, "size": Path(gguf.path).stat().st_size,
            "digest": digest or gguf.fingerprint(), "details": details(gguf), "modified_at": modified(gguf.path)}


def modified(path) -> str:
    return datetime.fromtimestamp(Path(path).stat().st_mtime, timezone.utc).isoformat()


def expires(at: float) -> str:
    """Ollama's expires_at: when an idle loaded model unloads (a far date for never)."""
    return datetime.fromtimestamp(min(at, FOREVER), timezone.utc).isoformat().replace("+00:00", "Z")


def add_routes(app: FastAPI, models) -> None:
    """Ollama's routes on the server's app (`models`: edgelm.router's One or Router)."""
    def submit(server, tokens: list[int], params: SamplingParams, fit: Fit):
        (req,) = server.submit(tokens, params, shift=fit.shift, keep=fit.keep)
        return req

    async def model_for(request: Request, body: dict, field: str = "model"):
        return await models.get(request, body.get(field), body.get("keep_alive"))

    def unloading(body: dict) -> bool:
        """An empty request with keep_alive 0: Ollama's way to unload a model (`ollama stop`); router mode only."""
        return models.routed and body.get("keep_alive") is not None and requested_keep_alive(body["keep_alive"]) == 0

    async def unload(body: dict) -> str:
        name = models.find(body.get("model")).name
        await models.unload(name)
        return name

    def final(model: str, req, t0: float, extra: dict) -> dict:
        t = req.timings
        return {"model": model, "created_at": now(), **extra, "done": True,
                "done_reason": "length" if req.finish_reason == "length" else "stop",
                "total_duration": ns(time.perf_counter() - t0), "load_duration": 0,
                "prompt_eval_count": t.prompt_tokens - t.cached_tokens, "prompt_eval_duration": ns(t.prompt_s),
                "eval_count": t.completion_tokens, "eval_duration": ns(t.gen_s)}

    def ndjson(lines) -> StreamingResponse:
        async def body():
            async for obj in lines:
                yield json.dumps(obj, ensure_ascii=False) + "\n"
        return StreamingResponse(body(), media_type="application/x-ndjson")

    @app.get("/api/version")
    async def version():
        return {"version": __version__}

    @app.get("/api/tags")
    async def tags():
        if not models.routed:
            return {"models": [entry(models.server.model_id, models.server.llama.gguf, models.server.llama.fingerprint)]}
        headers = {name: e.path and models.header(e.path) for name, e in models.catalog().items()}
        # a named model on a Hub reference not cached yet has no file to describe
        return {"models": [entry(name, gguf) for name, gguf in headers.items() if gguf is not None]}

    @app.get("/api/ps")
    async def ps():
        rows = []
        for name, server in models.servers().items():
            row = entry(name, server.llama.gguf, server.llama.fingerprint)
            if server.memory is not None:  # what it holds in memory, KV cache and buffers included
                row["size"] = server.memory.total
            at = models.expires_at(name) if models.routed else math.inf
            rows.append({**row, "expires_at": expires(at), "size_vram": 0})
        return {"models": rows}

    @app.post("/api/show")
    async def show(request: Request):
        body = await read_body(request)
        server = await model_for(request, body, "model" if "model" in body else "name")
        llama = server.llama
        keys = ("general.architecture", "general.name", "general.parameter_count", "general.file_type")
        info = {k: llama.gguf.get(k) for k in keys if llama.gguf.get(k) is not None}
        arch = describe(llama.gguf)["architecture"]
        info.update({f"{arch}.{k}": llama.gguf.get(f"{arch}.{k}") for k in
                     ("context_length", "embedding_length", "block_count", "attention.head_count")
                     if llama.gguf.get(f"{arch}.{k}") is not None})
        profile = server.options.profile  # a named model (edgelm create) shows its Modelfile, as Ollama's do
        named = {"system": profile.system or "", "license": profile.license or ""} if profile else {}
        return {**named, "modelfile": profile.modelfile() if profile else "",
                "parameters": profile.parameters() if profile else "", "template": server.template.text,
                "details": details(llama.gguf), "model_info": info,
                "capabilities": ["completion", "tools", "embedding"] + (["insert"] if can_infill(llama) else []),
                "modified_at": modified(llama.path)}

    @app.post("/api/generate")
    async def generate(request: Request):
        body = await read_body(request)
        t0 = time.perf_counter()
        if not body.get("prompt") and not body.get("context") and unloading(body):
            return {"model": await unload(body), "created_at": now(), "response": "", "done": True,
                    "done_reason": "unload"}
        server = await model_for(request, body)
        llama = server.llama
        model = body.get("model") or server.model_id
        prompt, system, context = body.get("prompt", ""), body.get("system"), body.get("context") or []
        suffix = body.get("suffix") or ""
        if not all(isinstance(v, str) for v in (prompt, system or "", suffix)):
            raise APIError(400, "prompt, suffix and system must be strings")
        if body.get("images"):
            raise APIError(400, "images are not supported (no vision model is loaded)")
        if not isinstance(context, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in context):
            raise APIError(400, "context must be a list of token ids")
        params = sampling(body, server.options.max_tokens_cap, server.defaults)
        fit = Fit.of(body, server)
        if not prompt and not context:  # Ollama's way to load a model: answer at once
            return {"model": model, "created_at": now(), "response": "", "done": True, "done_reason": "load"}
        try:
            llama.check_tokens(context)
            if suffix and not body.get("raw"):  # fill in the middle, as a FIM template would lay it out
                tokens = insert(server, prompt, suffix, f"{model} does not support insert")
            elif body.get("raw") or not (llama.chat_template or server.options.chat_template):  # no template: the text
                text = f"{system}\n\n{prompt}" if system and not body.get("raw") else prompt
                tokens = context + llama.tokenize(text, add_special=not context)
            else:
                turns = ([{"role": "system", "content": system}] if system else []) + [
                    {"role": "user", "content": prompt}]
                tokens = context + chat_tokens(llama, server.preamble(turns), server.template)
        except (UsageError, ChatTemplateError) as e:
            raise APIError(400, str(e)) from None
        tokens = fit.tokens(tokens, params)
        req = submit(server, tokens, params, fit)

        def last(text: str, logprobs) -> dict:
            return final(model, req, t0, {"response": text, "context": tokens + req.completion().tokens,
                                          **logprobs_field(llama, params, logprobs)})

        if body.get("stream", True):
            async def lines():
                async for _, chunk in follow(server, request, [req]):
                    if chunk.finish_reason is not None:
                        if chunk.finish_reason != "cancelled":
                            yield last(chunk.text, chunk.logprobs)
                    elif chunk.text or (params.logprobs is not None and chunk.logprobs):
                        yield {"model": model, "created_at": now(), "response": chunk.text,
                               **logprobs_field(llama, params, chunk.logprobs), "done": False}
            return ndjson(lines())
        if not await wait_for(request, [req]):
            raise APIError(499, "client disconnected")
        return last(req.completion().text, req.completion().logprobs)

    @app.post("/api/chat")
    async def chat(request: Request):
        body = await read_body(request)
        t0 = time.perf_counter()
        if not body.get("messages") and unloading(body):
            return {"model": await unload(body), "created_at": now(), "message": {"role": "assistant", "content": ""},
                    "done": True, "done_reason": "unload"}
        server = await model_for(request, body)
        llama = server.llama
        model = body.get("model") or server.model_id
        params = sampling(body, server.options.max_tokens_cap, server.defaults)
        fit = Fit.of(body, server)
        think = body.get("think")
        if think not in (None, True, False):  # levels ("high", ...) are for models edgelm does not run
            raise APIError(400, f"think must be true or false, not {think!r}")
        try:
            tools, _ = tool_setup(body.get("tools") or None, None)  # its clients send [] for none
            messages = server.preamble(chat_messages(body.get("messages")))

            def render(messages: list[dict]) -> list[int]:
                return chat_tokens(llama, messages, server.template, tools=tools,
                                   extra=None if think is None else {"enable_thinking": think})  # Qwen3's switch
            tokens = render(messages)
            if fit.truncate and len(tokens) >= fit.n_ctx:  # the oldest turns go first, as in Ollama
                tokens = render(fit_messages(messages, lambda m: len(render(m)), fit.room(params)))
        except (UsageError, ChatTemplateError) as e:
            raise APIError(400, str(e)) from None
        tokens = fit.tokens(tokens, params)
        req = submit(server, tokens, params, fit)
        opened = prompt_opens_thinking(llama, tokens)

        def message(text: str, calls=None, thinking: str | None = None) -> dict:
            out = {"role": "assistant", "content": text}
            if thinking:
                out["thinking"] = thinking
            if calls:
                out["tool_calls"] = [{"function": {"name": c.name, "arguments": json.loads(c.arguments)}}
                                     for c in calls]
            return out

        if body.get("stream", True):
            async def lines():
                pending = []  # logprobs of tokens whose text is held back
                async for chunk, thinking, text, calls in reply_parts(server, request, req, tools, opened):
                    pending += chunk.logprobs or []
                    if text or thinking or calls:
                        yield {"model": model, "created_at": now(), "message": message(text, calls, thinking),
                               **logprobs_field(llama, params, pending), "done": False}
                        pending = []
                    if chunk.finish_reason is not None:
                        yield final(model, req, t0, {"message": message(""), **logprobs_field(llama, params, pending)})
            return ndjson(lines())
        if not await wait_for(request, [req]):
            raise APIError(499, "client disconnected")
        thinking, text, calls = split_reply(req.completion().text, tools, opened)
        return final(model, req, t0, {"message": message(text, calls, thinking),
                                      **logprobs_field(llama, params, req.completion().logprobs)})

    @app.post("/api/embed")
    async def embed(request: Request):
        body = await read_body(request)
        t0 = time.perf_counter()
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            raise APIError(400, "input must be a non-empty string or list of non-empty strings")
        server = await model_for(request, body)
        vectors = await server.embed(texts, Fit.of(body, server).truncate)  # a text too long: its start
        return {"model": body.get("model") or server.model_id, "embeddings": [v.tolist() for v in vectors],
                "total_duration": ns(time.perf_counter() - t0), "load_duration": 0,
                "prompt_eval_count": sum(len(server.llama.tokenize(t)) for t in texts)}

    @app.post("/api/embeddings")
    async def embeddings(request: Request):  # the older single-text form
        body = await read_body(request)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "prompt must be a non-empty string")
        server = await model_for(request, body)
        return {"embedding": (await server.embed([prompt]))[0].tolist()}
