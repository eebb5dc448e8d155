"""Ollama's model management over HTTP: /api/pull, /api/create, /api/copy, /api/delete.

What `edgelm pull`, `edgelm create` and `edgelm rm` do, for apps that manage models through Ollama's API (Open
WebUI's model page, `ollama pull` pointed at this server with OLLAMA_HOST). Models come from the Hugging Face
Hub by reference (hf://owner/repo:Q4_K_M, or Ollama's own hf.co/owner/repo:Q4_K_M); named models are records in
$EDGELM_HOME/models. A request never names a file on the server: a model is a name the server already knows (a
named model, a model of the router's catalog, a cached Hub model) or a Hub reference, so no client can point the
server at a file of its choosing. In router mode a deleted model that is loaded is unloaded first.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from . import hub, modelfile
from .errors import EdgelmError
from .openai_api import APIError
from .serving import read_body

CREATE_FIELDS = {"model", "name", "from", "system", "template", "license", "parameters", "messages", "stream", "modelfile",
                 "quantize", "files", "adapters"}


def _name(body: dict, field: str = "model") -> str:
    name = body.get(field, body.get("name") if field == "model" else None)  # older clients send "name"
    if not isinstance(name, str) or not name:
        raise APIError(400, f"{field} must be a non-empty string naming a model")
    return name


def source(models, name: str) -> tuple[str, Any]:
    """(the model reference, its named-model record or None) that `name` stands for on this server."""
    profile = modelfile.find(name)
    if profile is not None:
        return profile.model, profile
    entry = models.find(name)  # 404 unless the server has it (or it is a cached Hub model)
    return entry.ref, entry.profile


def settings(body: dict) -> str:
    """The Modelfile lines after FROM that /api/create's fields (Ollama's current form) stand for, but its
    parameters (modelfile.build takes them as they are)."""
    quoted = lambda text: '"""' + text + '"""'  # noqa: E731
    lines = []
    for field, word in (("system", "SYSTEM"), ("template", "TEMPLATE"), ("license", "LICENSE")):
        value = body.get(field)
        value = "\n".join(value) if field == "license" and isinstance(value, list) else value
        if value is None:
            continue
        if not isinstance(value, str) or '"""' in value:
            raise APIError(400, f"{field} must be a string (without triple quotes)")
        lines.append(f"{word} {quoted(value)}")
    messages = body.get("messages") or []
    if not isinstance(messages, list):
        raise APIError(400, "messages must be a list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "\n" in m["content"]:
            raise APIError(400, f"messages[{i}] must be an object with a one-line string content")
        lines.append(f"MESSAGE {m.get('role')} {m['content']}")
    return "\n".join(lines) + "\n"


def from_modelfile(text: Any) -> tuple[str, str]:
    """(FROM's argument, the rest) of an older client's "modelfile"; ADAPTER lines name server files: refused."""
    if not isinstance(text, str):
        raise APIError(400, "modelfile must be a string")
    try:
        pairs = modelfile.parse(text)
    except EdgelmError as e:
        raise APIError(400, str(e)) from None
    froms = [arg for word, arg in pairs if word == "FROM"]
    if len(froms) != 1:
        raise APIError(400, "modelfile must have exactly one FROM line")
    if any(word == "ADAPTER" for word, _ in pairs):
        raise APIError(400, "ADAPTER names a file on the server: create such a model with `edgelm create` there")
    rest = [line for line in text.splitlines() if not line.strip().upper().startswith("FROM ")]
    return froms[0], "\n".join(rest) + "\n"


def add_routes(app: FastAPI, models) -> None:
    """The routes on the server's app (`models`: edgelm.router's One or Router)."""

    def ndjson(lines) -> StreamingResponse:
        """Statuses as NDJSON lines, Ollama's default; a failure mid-stream is an {"error": ...} line, as Ollama
        sends it."""
        async def body():
            try:
                async for obj in lines:
                    yield json.dumps(obj) + "\n"
            except APIError as e:
                yield json.dumps({"error": str(e)}) + "\n"
        return StreamingResponse(body(), media_type="application/x-ndjson")

    @app.post("/api/pull")
    async def pull(request: Request):
        body = await read_body(request)
        name = _name(body)
        if not hub.is_hub_ref(name):
            raise APIError(400, f"{name!r}: edgelm pulls from the Hugging Face Hub: name a model as "
                                "hf.co/owner/repo:Q4_K_M or hf://owner/repo/file.gguf")
        hub.parse_ref(name)  # a bad reference: a 400 before anything starts
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_part(filename: str, path: Path) -> None:  # a thread of the pool: hand over to the loop
            size = path.stat().st_size
            loop.call_soon_threadsafe(events.put_nowait, {"status": f"pulling {filename}", "digest": filename,
                                                          "total": size, "completed": size})

        def fetch() -> None:
            from .commands.pull import pull as pull_checked  # downloads, then checks the GGUF

            pull_checked(name, on_part)

        async def lines():
            yield {"status": "pulling manifest"}
            task = asyncio.ensure_future(asyncio.to_thread(fetch))
            while not (task.done() and events.empty()):
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            try:
                task.result()
            except EdgelmError as e:
                raise APIError(404 if isinstance(e, FileNotFoundError) else 502, str(e)) from None
            yield {"status": "verifying sha256 digest"}
            yield {"status": "writing manifest"}
            yield {"status": "success"}

        if body.get("stream", True):
            return ndjson(lines())
        async for last in lines():  # every status but the last goes unsent
            pass
        return last

    @app.post("/api/create")
    async def create(request: Request):
        body = await read_body(request)
        name = modelfile.check_name(_name(body))
        unknown = sorted(set(body) - CREATE_FIELDS)
        if unknown:
            raise APIError(400, f"unknown field(s): {', '.join(unknown)}")
        for field, why in (("quantize", "quantize with `edgelm convert --quant` (or llama-quantize)"),
                           ("files", "uploaded blobs are not stored: create from a model name or Hub reference"),
                           ("adapters", "uploaded adapters are not stored: use `edgelm create` on the server")):
            if body.get(field):
                raise APIError(400, f"{field}: not supported over the API; {why}")
        if body.get("modelfile") is not None:
            base, rest = from_modelfile(body["modelfile"])
        elif isinstance(body.get("from"), str) and body["from"]:
            base, rest = body["from"], settings(body)
        else:
            raise APIError(400, "from must name the model to start from")
        ref, _ = source(models, base)
        # FROM a named model keeps its settings (modelfile.build merges them); any other model by its file or ref
        text = f"FROM {base if modelfile.find(base) is not None else ref}\n{rest}"
        parameters = body.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise APIError(400, "parameters must be an object")
        try:
            made = await asyncio.to_thread(modelfile.build, name, text, Path.cwd(), parameters)
            await asyncio.to_thread(modelfile.save, made)
        except EdgelmError as e:
            raise APIError(400, str(e)) from None

        async def lines():
            for status in ("reading model metadata", "writing manifest", "success"):
                yield {"status": status}
        if body.get("stream", True):
            return ndjson(lines())
        return {"status": "success"}

    @app.post("/api/copy")
    async def copy(request: Request):
        body = await read_body(request)
        src, dst = _name(body, "source"), modelfile.check_name(_name(body, "destination"))
        ref, profile = source(models, src)
        made = (replace(profile, name=dst, created=time.time()) if profile is not None
                else modelfile.Profile(name=dst, model=ref, created=time.time()))
        await asyncio.to_thread(modelfile.save, made)
        return Response(status_code=200)

    @app.delete("/api/delete")
    async def delete(request: Request):
        body = await read_body(request)
        name = _name(body)
        if models.routed:  # a loaded model unloads first (once its requests end)
            try:
                await models.unload(models.find(name).name)
            except APIError:
                pass  # not in the catalog: not loaded either
        if modelfile.NAME.fullmatch(name) and modelfile.remove(name) is not None:
            return Response(status_code=200)
        if hub.is_hub_ref(name):
            await asyncio.to_thread(hub.remove, name)  # not cached: ModelNotFoundError, a 404
            return Response(status_code=200)
        raise APIError(404, f"model {name!r} not found: only named models and Hub models can be deleted here "
                            "(files in --models-dir are the server owner's)", type="not_found_error")
