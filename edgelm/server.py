"""An OpenAI-compatible HTTP server over the continuous-batching engine (FastAPI on uvicorn).

Endpoints: /v1/chat/completions, /v1/completions (streaming as Server-Sent Events in OpenAI's chunk
format, or not), /v1/embeddings, /v1/models, /tokenize, /detokenize, /props and /lora-adapters (llama-server's),
llama-server's native /completion, /infill, /embedding, /apply-template (llama_native.py), OpenAI's Responses and
Anthropic's Messages APIs, Ollama's API, /health (always public), /metrics (Prometheus text). One model, or in router
mode (router.py) any of a catalog, chosen by each request's "model" and loaded on demand (/models, /models/load,
/models/unload as llama-server's). Errors are OpenAI-style bodies: bad input is a 400, a missing or wrong API key a
401, a full queue a 503 with Retry-After. A client that disconnects cancels its sequence within one decode step.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import llama_cpp as lib
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .cache.prompt import DEFAULT_DISK_BYTES, PromptCache
from .engine import Engine, EngineOptions, QueueFullError, RequestCancelled
from .errors import (ChatTemplateError, ContextOverflowError, DownloadError, EdgelmError, InsufficientStorageError,
                     ModelLoadError, ModelNotFoundError, UsageError)
from .metrics import Metrics, prometheus_text
from .router import One, Router, RouterOptions
from .router import add_routes as add_router_routes
from .runtime.chat import chat_tokens, template_for
from .runtime.generate import check_keep
from .runtime.backend import release_workers
from .runtime.memory import ensure_fits
from .runtime.model import LlamaModel, LoadOptions, resolve_model
from .openai_api import (MAX_CHOICES, APIError, chat_logprobs, choices, completion_logprobs, echoes, finish_reason,
                         joined, sampling_params)
from .anthropic_api import add_routes as add_anthropic_routes
from .llama_native import add_routes as add_native_routes
from .llama_native import insert, lora_scales
from .llama_server_api import add_routes as add_llama_server_routes
from .ollama_api import add_routes
from .ollama_store import add_routes as add_store_routes
from .responses_api import add_routes as add_responses_routes
from .runtime.sampling import SamplingParams
from .runtime.speculative import DRAFT_MAX, THRESHOLD
from .runtime.reasoning import prompt_opens_thinking
from .runtime.tools import ReplyStream, ToolCall, forcing_call, split_reply
from .serving import Guard, cancel_unfinished, chat_request, follow, read_body, wait_for



@dataclass
class ServerOptions:
    model: str | None = None
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()  # web origins whose pages may call the API from a browser ("*": any)
    n_parallel: int = 4
    n_ctx: int = 2048
    n_batch: int = 512
    n_threads: int | None = None
    max_queue: int = 64
    max_tokens_cap: int = 4096
    default_max_tokens: int = 256
    prompt_cache: str | None = None
    prompt_cache_bytes: int = DEFAULT_DISK_BYTES
    n_gpu_layers: int = 0
    flash_attn: bool | None = None  # None: llama.cpp decides
    type_k: str = "f16"
    type_v: str = "f16"
    warmup: bool = True
    lora: tuple = ()  # LoRA adapters: paths or (path, scale) pairs (runtime/lora.py)
    chat_template: str | None = None  # a built-in name or Jinja source instead of the model's own
    alias: str | None = None  # the model's name in /v1/models and answers (default: the file's stem)
    profile: Any = None  # a named model (edgelm/modelfile.py): its sampling defaults and chat preamble
    memory_check: bool = True  # refuse a model and context larger than the memory available (runtime/memory.py)
    control: Any = None  # control vectors: paths or (path, scale) pairs (runtime/control.py)
    control_range: tuple[int, int] | None = None
    lookup: bool = False  # speculative decoding: prompt-lookup drafts for every stream (drafting.py)
    draft: str | None = None  # or a draft model sharing the vocabulary
    draft_max: int = DRAFT_MAX
    draft_threshold: float = THRESHOLD
    context_shift: bool = False  # OpenAI's routes: generate past the context's end (Ollama's shift by default)
    keep: int = 0  # prompt tokens a context shift keeps (-1: all; BOS always)
    spm_infill: bool = False  # /infill lays out suffix before prefix (llama-server's --spm-infill)
    slot_save_path: str | None = None  # the folder of POST /slots/N?action=save|restore files (off without it)


class Server:
    """The model, its engine, and what the handlers share."""

    def __init__(self, options: ServerOptions, metrics: Metrics | None = None):
        self.options = options
        check_keep(options.keep)
        if options.slot_save_path is not None:
            folder = Path(options.slot_save_path).expanduser()
            try:
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as e:
                raise UsageError(f"--slot-save-path {folder}: cannot create the folder ({e.strerror or e})") from None
        model = resolve_model(options.model)  # once: an hf:// reference asks the Hub (or its cache) here
        self.memory = None  # the memory-fit estimate: what /api/ps reports a loaded model's size as
        if options.memory_check:  # the engine's one context holds every slot's cells
            self.memory = ensure_fits(model, n_ctx=options.n_ctx * options.n_parallel, n_batch=options.n_batch,
                                      type_k=options.type_k, type_v=options.type_v, n_gpu_layers=options.n_gpu_layers,
                                      flash_attn=options.flash_attn, draft=options.draft)
        self.llama = LlamaModel(model, LoadOptions(n_gpu_layers=options.n_gpu_layers), lora=options.lora or None,
                                control=options.control, control_range=options.control_range)
        self.template = template_for(self.llama, options.chat_template)  # a bad template fails before serving
        self.draft = None
        if options.draft is not None:
            self.draft = LlamaModel(resolve_model(options.draft), LoadOptions(n_gpu_layers=options.n_gpu_layers))
        self.model_id = options.alias or (options.profile.name if options.profile else self.llama.path.stem)
        self.defaults = options.profile.sampling if options.profile else {}  # under each request's own fields
        self.created = int(time.time())
        self.engine = Engine(self.llama, EngineOptions(
            n_parallel=options.n_parallel, n_ctx=options.n_ctx, n_batch=options.n_batch, n_threads=options.n_threads,
            max_queue=options.max_queue, max_tokens_cap=options.max_tokens_cap, flash_attn=options.flash_attn,
            type_k=options.type_k, type_v=options.type_v, warmup=options.warmup, lookup=options.lookup,
            draft_max=options.draft_max, draft_threshold=options.draft_threshold), draft_model=self.draft)
        if options.prompt_cache is not None:
            self.engine.prompt_cache = PromptCache(self.engine.ctx, ram_bytes=0, path=options.prompt_cache,
                                                   disk_bytes=options.prompt_cache_bytes)
        self.metrics = metrics or Metrics()
        self._embedder = None
        self._scorer = None  # a context of its own for prompt log-probabilities (echo)
        self.adapters = None  # the LoRA scales of requests that give none (POST /lora-adapters); None: --lora's
        if options.context_shift and not self.engine.ctx.can_shift:
            self.close()
            raise UsageError(f"{self.llama.path.name}: this model's KV cache cannot shift positions "
                             "(--context-shift)")
        release_workers()  # loading ran graphs on this thread, which will not decode (runtime/backend.py)

    def close(self) -> None:
        self.engine.close()
        if self._embedder is not None:
            self._embedder.close()
        if self._scorer is not None:
            self._scorer.close()
        for model in (self.draft, self.llama):
            if model is not None:
                model.close()

    async def embed(self, texts: list[str], truncate: bool = False, normalize: bool = True):
        """Embeddings of `texts` (unit length unless not `normalize`), computed on the engine's thread between its
        steps; a text longer than the context is a 400, or with `truncate` embedded by its first tokens."""
        from .runtime.embed import Embedder

        def run():  # on the engine's thread, one call at a time
            if self._embedder is None:
                self._embedder = Embedder(self.llama, n_ctx=self.options.n_ctx, n_threads=self.options.n_threads)
            return self._embedder.embed(texts, truncate=truncate, normalize=normalize)
        try:
            return await asyncio.wrap_future(self.engine.call(run))
        except ContextOverflowError as e:
            raise APIError(400, str(e), param="input", code="context_length_exceeded") from None

    async def score(self, tokens: list[int], n_top: int) -> list:
        """Each prompt token's TokenLogprob after the ones before it (tokens[1:]), with `n_top` alternatives:
        evaluated on the engine's thread between its steps, in a context of its own."""
        from .runtime.context import Context, ContextOptions
        from .runtime.logprobs import prompt_logprobs

        def run():
            if self._scorer is None:
                o = self.options
                self._scorer = Context(self.llama, ContextOptions(n_ctx=o.n_ctx, n_batch=o.n_batch,
                                                                  n_threads=o.n_threads))
            return prompt_logprobs(self._scorer, tokens, n_top)
        return await asyncio.wrap_future(self.engine.call(run))

    # ------------------------------------------------------------ request -> engine

    def sampling(self, body: dict, chat: bool) -> SamplingParams:
        return sampling_params(body, chat, min(self.options.default_max_tokens, self.options.max_tokens_cap),
                               self.defaults)

    def prompts(self, prompt: Any) -> list[list[int]]:
        """OpenAI's `prompt`: a text or token ids, or a list of texts or of token-id lists (a reply each)."""
        if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
            if len(prompt) > MAX_CHOICES:
                raise APIError(400, f"at most {MAX_CHOICES} prompts per request", param="prompt")
            return [self.prompt_tokens(p) for p in prompt]
        return [self.prompt_tokens(prompt)]

    def prompt_tokens(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            tokens = self.llama.tokenize(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt):
            tokens = list(prompt)
        else:
            raise APIError(400, "prompt must be a string, a list of token ids, or a list of those", param="prompt")
        if not tokens:
            raise APIError(400, "prompt is empty", param="prompt")
        return tokens

    def preamble(self, messages: Any) -> Any:
        """A named model's system message and example turns before a conversation's own."""
        profile = self.options.profile
        return profile.preamble(messages) if profile is not None and isinstance(messages, list) else messages

    def chat_prompt(self, messages: Any, tools: list[dict] | None = None, extra: Any = None) -> list[int]:
        try:
            return chat_tokens(self.llama, self.preamble(messages), self.template, tools=tools, extra=extra)
        except ChatTemplateError as e:
            raise APIError(400, str(e), param="messages") from None
        except UsageError as e:
            raise APIError(400, str(e), param="messages") from None

    def submit(self, tokens: list[int], params: SamplingParams, n: int = 1, *, shift: bool | None = None,
               keep: int | None = None, adapters: tuple[float, ...] | None = None) -> list:
        """One engine request per choice; with a seed, choice i samples with seed + i so the choices differ.
        `shift` and `keep` default to the server's --context-shift and --keep, `adapters` (LoRA scales) to the
        server's (--lora, or POST /lora-adapters)."""
        shift = self.options.context_shift if shift is None else shift
        adapters = self.adapters if adapters is None else adapters
        keep = self.options.keep if keep is None else keep
        seeds = [None if params.seed is None else (params.seed + i) % lib.LLAMA_DEFAULT_SEED for i in range(n)]
        items = [(tokens, params if seed in (None, params.seed) else replace(params, seed=seed))
                 for seed in seeds]
        try:
            return self.engine.submit_many(items, keep if shift else None, adapters)
        except QueueFullError as e:
            raise APIError(503, str(e), type="server_error", code="queue_full",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except ContextOverflowError as e:
            raise APIError(400, str(e), code="context_length_exceeded", param="messages") from None
        except UsageError as e:
            raise APIError(400, str(e)) from None


def create_app(options: ServerOptions, router: RouterOptions | None = None) -> FastAPI:
    """The app over one model (`options.model`), or with `router`, over any model of the router's catalog."""
    metrics = Metrics()
    make = lambda o: Server(o, metrics)  # noqa: E731
    models = One(make(options)) if router is None else Router(options, router, metrics, make)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        reaper = asyncio.create_task(models.reap()) if models.routed else None
        yield
        if reaper is not None:
            reaper.cancel()
        models.close()

    app = FastAPI(title="edgelm", version="1", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.models = models

    def error(request: Request, exc: APIError):
        return exc.response(request.url.path)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error(request, APIError(400, f"invalid request: {exc.errors()[0].get('msg', 'bad value')}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error(request, APIError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(EdgelmError)
    async def _edgelm(request: Request, exc: EdgelmError):
        if isinstance(exc, ModelLoadError):  # llama.cpp failed under a request: not the request's fault
            return error(request, APIError(500, str(exc), type="server_error"))
        if isinstance(exc, RequestCancelled):  # the engine closed under it
            return error(request, APIError(503, str(exc), type="server_error"))
        if isinstance(exc, ModelNotFoundError):
            return error(request, APIError(404, str(exc), type="not_found_error", code="model_not_found"))
        if isinstance(exc, DownloadError):  # the Hub, not the request
            return error(request, APIError(502, str(exc), type="server_error"))
        if isinstance(exc, InsufficientStorageError):
            return error(request, APIError(507, str(exc), type="server_error"))
        return error(request, APIError(400, str(exc)))

    app.add_middleware(Guard, options=options, metrics=metrics)
    if options.cors_origins:  # outermost: a browser's preflight is answered before the API key is asked for
        app.add_middleware(CORSMiddleware, allow_origins=list(options.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-Api-Key", "Content-Type"])
    add_routes(app, models)  # Ollama's API beside OpenAI's
    add_store_routes(app, models)  # and its model management: /api/pull, /api/create, /api/copy, /api/delete
    add_llama_server_routes(app, models)  # llama-server's own: /tokenize, /detokenize, /props, /lora-adapters
    add_native_routes(app, models)  # and its generation API: /completion, /infill, /embedding, /apply-template
    add_responses_routes(app, models)  # OpenAI's Responses API: /v1/responses
    add_anthropic_routes(app, models)  # Anthropic's Messages API: /v1/messages

    @app.get("/")
    async def root():
        return PlainTextResponse("edgelm is running")

    @app.get("/health")
    @app.get("/v1/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models():
        return models.listing()

    @app.get("/metrics")
    async def metrics_page():
        engines = {name if models.routed else None: s.engine for name, s in models.servers().items()}
        return PlainTextResponse(prometheus_text(metrics, engines, models if models.routed else None),
                                 media_type="text/plain; version=0.0.4")

    if models.routed:
        add_router_routes(app, models)  # llama-server's /models, /models/load, /models/unload

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        if "prompt" not in body:
            raise APIError(400, "prompt is required", param="prompt")
        server = await models.get(request, body.get("model"))
        params = server.sampling(body, chat=False)
        suffix = body.get("suffix")
        if suffix:  # insert: what goes between the prompt and the suffix, by the model's FIM tokens
            if not isinstance(suffix, str) or not isinstance(body["prompt"], str):
                raise APIError(400, "suffix needs a string prompt and a string suffix", param="suffix")
            prompts = [insert(server, body["prompt"], suffix, "suffix is not supported by this model")]
        else:
            prompts = server.prompts(body["prompt"])
        if body.get("echo") and suffix:
            raise APIError(400, "echo and suffix exclude each other", param="echo")
        return await _generate(server, request, body, prompts, params, chat=False)

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")  # llama-server's alias
    async def chat_completions(request: Request):
        body, server, tools, grammar, extra = await chat_request(request, models)
        params = server.sampling(body, chat=True)
        if grammar is not None:
            try:
                params = forcing_call(params, grammar)
            except UsageError as e:
                raise APIError(400, str(e), param="tool_choice" if "tool_choice" in str(e) else "tools") from None
        tokens = server.chat_prompt(body["messages"], tools, extra)
        return await _generate(server, request, body, [tokens], params, chat=True, tools=tools)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await read_body(request)
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            raise APIError(400, "input must be a non-empty string or list of non-empty strings", param="input")
        server = await models.get(request, body.get("model"))
        vectors = await server.embed(texts)
        n_tokens = sum(len(server.llama.tokenize(t)) for t in texts)
        return {"object": "list", "model": server.model_id,
                "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    async def _generate(server: Server, request: Request, body: dict, prompts: list[list[int]],
                        params: SamplingParams, chat: bool, tools: list[dict] | None = None):
        """The reply to `prompts` (one for chat), `n` choices each: choice i * n + j is prompt i's j-th."""
        n, adapters, tokens = choices(body), lora_scales(body, server), prompts[0]
        reqs = []
        try:
            for prompt in prompts:  # one request per choice, started in the same step; llama-server's `lora`
                reqs += server.submit(prompt, params, n, adapters=adapters)
        except BaseException:
            cancel_unfinished(reqs)
            raise
        echoed = await echoes(server, prompts, params, n) if not chat and body.get("echo") else None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        stream_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        kind = ("chat.completion" if chat else "text_completion")
        opened = chat and prompt_opens_thinking(server.llama, tokens)  # the template started the thinking

        def usage() -> dict:
            firsts = reqs[::n]  # each prompt counted once
            prompt, cached = (sum(getattr(r.timings, f) for r in firsts) for f in ("prompt_tokens", "cached_tokens"))
            completion = sum(r.timings.completion_tokens for r in reqs)
            return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                    "prompt_tokens_details": {"cached_tokens": cached}}

        # completions' text_offset: characters of each choice's token texts sent so far (the echoed prompt's first)
        offsets = [len(e[0]) for e in echoed] if echoed else [0] * len(reqs)

        def logprobs_body(i: int, logprobs) -> dict | None:
            if params.logprobs is None or logprobs is None:
                return None
            if chat:
                return chat_logprobs(server.llama, logprobs)
            body = completion_logprobs(server.llama, logprobs, params.logprobs, offsets[i])
            offsets[i] += sum(map(len, body["tokens"]))
            return body

        def event(i: int, delta_text: str | None, finish: str | None, role: bool = False, logprobs=None,
                  calls: list[ToolCall] | None = None, reasoning: str = "") -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else (
                    {"content": delta_text} if delta_text else {})
                if reasoning:  # a reasoning model's thinking, as llama-server and DeepSeek's API send it
                    delta["reasoning_content"] = reasoning
                if calls:
                    delta["tool_calls"] = [c.to_openai(j) for j, c in enumerate(calls)]
                choice = {"index": i, "delta": delta, "logprobs": None if role else logprobs_body(i, logprobs),
                          "finish_reason": finish}
                obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.model_id,
                       "system_fingerprint": None, "choices": [choice]}
            else:
                choice = {"index": i, "text": delta_text or "", "logprobs": logprobs_body(i, logprobs),
                          "finish_reason": finish}
                obj = {"id": rid, "object": "text_completion", "created": created, "model": server.model_id,
                       "choices": [choice]}
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        if body.get("stream"):
            async def sse():
                if chat:
                    for i in range(len(reqs)):
                        yield event(i, None, None, role=True)
                for i, (text, logprobs) in enumerate(echoed or ()):  # the prompt first, with its log-probabilities
                    obj = {"id": rid, "object": "text_completion", "created": created, "model": server.model_id,
                           "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": None}]}
                    yield f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
                replies = [ReplyStream(tools, opened) for _ in reqs] if chat else None
                async for i, chunk in follow(server, request, reqs):
                    reason, text, calls, reasoning = finish_reason(chunk.finish_reason), chunk.text, None, ""
                    if replies is not None:  # thinking apart; text that may be a tool call waits for the end
                        reasoning, text = replies[i].feed(text)
                        if reason is not None:
                            more, rest, calls = replies[i].finish()
                            reasoning, text = reasoning + more, text + rest
                            reason = "tool_calls" if calls else reason
                    if text or reasoning or reason or chunk.logprobs:
                        yield event(i, text, reason, logprobs=chunk.logprobs or None, calls=calls,
                                    reasoning=reasoning)
                if all(r.finish_reason not in (None, "cancelled") for r in reqs):
                    if stream_usage:
                        obj = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": created,
                               "model": server.model_id, "choices": [], "usage": usage()}
                        yield f"data: {json.dumps(obj)}\n\n"
                    yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        await wait_for(request, reqs)  # nothing to send until the end
        out = []
        for i, req in enumerate(reqs):
            if req.timings.completion_tokens:
                server.metrics.observe_ttft(req.timings.ttft_s)
            text = "".join(chunk.text for chunk in req.drain())
            if req.finish_reason in (None, "cancelled"):
                return JSONResponse({"error": {"message": "client disconnected", "type": "cancelled"}},
                                    status_code=499)
            logprobs = logprobs_body(i, req.completion().logprobs)
            reason = finish_reason(req.finish_reason)
            message = None
            if chat:
                reasoning, content, calls = split_reply(text, tools, opened)
                message = {"role": "assistant", "content": content or None if calls else content}
                if reasoning is not None:
                    message["reasoning_content"] = reasoning
                if calls:
                    message["tool_calls"] = [c.to_openai() for c in calls]
                    reason = "tool_calls"
            if echoed:
                text, logprobs = echoed[i][0] + text, joined(echoed[i][1], logprobs)
            out.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": reason} if chat else
                       {"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason})
        obj = {"id": rid, "object": kind, "created": created, "model": server.model_id, "choices": out,
               "usage": usage()}
        if chat:
            obj["system_fingerprint"] = None
        return obj

    return app

