"""llama-server's own endpoints beside the OpenAI API: /tokenize, /detokenize, /props, /lora-adapters (GET, and POST
to set the scales of requests that give none) and /slots, in its shapes, so that tools written for llama-server
(editors, web UIs, scripts) work unchanged."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

from fastapi import FastAPI, Request

from ._version import __version__
from .blobs import check_file_name
from .errors import EdgelmError, UsageError
from .llama_native import lora_scales, settings
from .openai_api import APIError, piece
from .runtime.generate import Completion
from .runtime.sampling import SamplingParams
from .serving import chat_request, read_body


def add_routes(app: FastAPI, models) -> None:
    """llama-server's routes on the server's app (`models`: edgelm.router's One or Router). In router mode the
    GET routes take the model as `?model=NAME`, the POST routes in the body, as llama-server's router does."""
    @app.get("/props")
    async def props(request: Request):  # llama-server's: what clients read the context size and template from
        server = await models.get(request, request.query_params.get("model"))
        o = server.options
        return {"model_path": str(server.llama.path), "model_alias": server.model_id, "total_slots": o.n_parallel,
                "chat_template": server.template.text, "modalities": {"vision": False, "audio": False},
                "build_info": f"edgelm {__version__}",
                "default_generation_settings": {"n_ctx": o.n_ctx, "model": server.model_id,
                                                "params": settings(SamplingParams(), server,
                                                                   n_predict=o.default_max_tokens)}}

    @app.get("/slots")
    async def slots(request: Request):
        """llama-server's slot states: each slot's request (current, or last), its settings, prompt and progress;
        ?fail_on_no_slot=1 answers 503 when every slot is busy (for load balancers)."""
        server = await models.get(request, request.query_params.get("model"))
        states = server.engine.slot_states()
        if request.query_params.get("fail_on_no_slot") == "1" and all(busy for _, _, busy in states):
            raise APIError(503, "no slot available", type="unavailable_error", headers={"Retry-After": "1"})
        return [slot_state(server, seq, req, busy) for seq, req, busy in states]

    @app.post("/slots/{index}")
    async def slot_action(request: Request, index: str):
        """llama-server's ?action=save|restore (body {"filename"}, a file in --slot-save-path) and ?action=erase."""
        action = request.query_params.get("action")
        if action not in ("save", "restore", "erase"):
            raise APIError(400, f"action must be save, restore or erase, not {action!r}", param="action")
        body = await read_body(request) if action != "erase" else {}
        server = await models.get(request, request.query_params.get("model"))
        if not index.isdecimal():
            raise APIError(400, f"no slot {index!r}", param="id_slot")
        engine, n = server.engine, int(index)
        if action == "erase":
            return {"id_slot": n, **await _engine_result(engine.erase_slot(n))}
        folder = server.options.slot_save_path
        if folder is None:
            raise APIError(400, "slot files are off: start the server with --slot-save-path DIR")
        try:
            name = check_file_name(body.get("filename"))
        except UsageError as e:
            raise APIError(400, str(e), param="filename") from None
        path = Path(folder) / name
        result = await _engine_result(engine.save_slot(n, path) if action == "save" else engine.restore_slot(n, path))
        timing = result.pop(f"{action}_ms")
        return {"id_slot": n, "filename": name, **result, "timings": {f"{action}_ms": timing}}

    @app.get("/lora-adapters")
    async def lora_adapters(request: Request):  # llama-server's listing: the adapters requests run with
        server = await models.get(request, request.query_params.get("model"))
        return adapter_list(server)

    @app.post("/lora-adapters")
    async def set_lora_adapters(request: Request):
        """llama-server's: [{"id", "scale"}, ...] sets the scales of requests that give none (an adapter left out:
        0); answers the new listing."""
        raw = await request.body()
        try:
            given = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            raise APIError(400, "the request body is not valid JSON") from None
        server = await models.get(request, request.query_params.get("model"))
        if server.llama.lora is None:
            raise APIError(400, "the server has no LoRA adapters (--lora)", param="lora")
        given = given or [{"id": 0, "scale": 0.0}]  # an empty list: every adapter off
        server.adapters = server.llama.lora.scales(lora_scales({"lora": given}, server))
        return adapter_list(server)

    @app.post("/v1/chat/completions/input_tokens")
    @app.post("/chat/completions/input_tokens")
    async def chat_input_tokens(request: Request):
        """llama-server's: the prompt tokens a chat completion request would take."""
        body, server, tools, _, extra = await chat_request(request, models)
        tokens = server.chat_prompt(body["messages"], tools, extra)
        return {"object": "response.input_tokens", "input_tokens": len(tokens)}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        """llama-server's /tokenize: {"content", "add_special"?, "parse_special"?, "with_pieces"?} -> {"tokens"}."""
        body = await read_body(request)
        content = body.get("content")
        if not isinstance(content, str):
            raise APIError(400, "content must be a string", param="content")
        server = await models.get(request, body.get("model"))
        flags = {name: body.get(name, default) for name, default in
                 (("add_special", False), ("parse_special", True), ("with_pieces", False))}
        bad = next((name for name, v in flags.items() if not isinstance(v, bool)), None)
        if bad is not None:
            raise APIError(400, f"{bad} must be true or false", param=bad)
        tokens = server.llama.tokenize(content, add_special=flags["add_special"], parse_special=flags["parse_special"])
        if flags["with_pieces"]:
            return {"tokens": [{"id": t, "piece": piece(server.llama, t)} for t in tokens]}
        return {"tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        """llama-server's /detokenize: {"tokens"} -> {"content"}."""
        body = await read_body(request)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise APIError(400, "tokens must be a list of token ids", param="tokens")
        server = await models.get(request, body.get("model"))
        try:
            server.llama.check_tokens(tokens)
        except UsageError as e:
            raise APIError(400, str(e), param="tokens") from None
        return {"content": server.llama.detokenize(tokens, special=True)}


async def _engine_result(future) -> dict:
    """What an engine call returned; its UsageError a 400, a missing file a 404."""
    try:
        return await asyncio.wrap_future(future)
    except FileNotFoundError as e:
        raise APIError(404, str(e), type="not_found_error") from None
    except UsageError as e:
        raise APIError(400, str(e)) from None


def adapter_list(server) -> list[dict]:
    """/lora-adapters: each --lora adapter with the scale requests that give none run with."""
    specs = server.llama.lora.specs if server.llama.lora else ()
    scales = server.adapters or [spec.scale for spec in specs]
    return [{"id": i, "path": str(spec.path), "scale": scale} for i, (spec, scale) in enumerate(zip(specs, scales))]


def slot_state(server, seq: int, req, busy: bool) -> dict:
    """One slot in llama-server's /slots shape."""
    state = {"id": seq, "n_ctx": server.options.n_ctx, "is_processing": busy,
             "speculative": server.options.lookup or server.options.draft is not None}
    if req is None:
        return state
    try:
        done = req.completion()
    except EdgelmError:  # it failed: nothing generated to show
        done = Completion("", [], "error")
    t = req.timings
    cap = req.params.max_tokens
    return {**state, "id_task": req.id, "n_prompt_tokens": len(req.tokens),
            "n_prompt_tokens_processed": t.prompt_tokens - t.cached_tokens, "n_prompt_tokens_cache": t.cached_tokens,
            "params": settings(req.params, server, n_predict=cap),
            "next_token": [{"has_next_token": busy, "has_new_line": "\n" in done.text,
                            "n_remain": cap - len(done.tokens), "n_decoded": len(done.tokens)}],
            "prompt": server.llama.detokenize(req.tokens, special=True), "generated": done.text}
