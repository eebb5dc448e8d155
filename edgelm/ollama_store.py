"""Ollama's model management over HTTP: /api/pull, /api/blobs, /api/create, /api/copy, /api/delete.

What `edgelm pull`, `edgelm create` and `edgelm rm` do, for apps that manage models through Ollama's API (Open
WebUI's model page, `ollama pull` pointed at this server with OLLAMA_HOST). Models come from the Hugging Face
Hub by reference (hf://owner/repo:Q4_K_M, or Ollama's own hf.co/owner/repo:Q4_K_M); named models are records in
$EDGELM_HOME/models. A request never names a file on the server: a model is a name the server already knows (a
named model, a model of the router's catalog, a cached Hub model), a Hub reference, or blobs the client uploaded
(`ollama create` with a Modelfile whose FROM is a local GGUF or safetensors folder: POST /api/blobs/sha256:HEX,
then /api/create with "files"; blobs.py, blob_models.py), so no client can point the server at a file of its
choosing. A deleted model's blobs go with it unless another model uses them. In router mode a deleted model that
is loaded is unloaded first.
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

from . import blob_models, blobs, hub, modelfile
from .errors import EdgelmError, InsufficientStorageError, ModelNotFoundError
from .openai_api import APIError
from .serving import read_body

UPLOAD_BUFFER = 4 << 20  # bytes of an upload gathered before a worker thread writes them
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


async def progress(work, status_of):
    """What `work(emit)`, run in a worker thread, emits, as it emits it; its EdgelmError ends the lines as an
    APIError with the status `status_of(error)`."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    task = asyncio.ensure_future(asyncio.to_thread(work, lambda obj: loop.call_soon_threadsafe(events.put_nowait, obj)))
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
        raise APIError(status_of(e), str(e)) from None


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

    async def respond(body: dict, lines):
        """NDJSON statuses, or with "stream": false only the last one (or the failure's status and error)."""
        if body.get("stream", True):
            return ndjson(lines)
        async for last in lines:
            pass
        return last

    @app.post("/api/pull")
    async def pull(request: Request):
        body = await read_body(request)
        name = _name(body)
        if not hub.is_hub_ref(name):
            raise APIError(400, f"{name!r}: edgelm pulls from the Hugging Face Hub: name a model as "
                                "hf.co/owner/repo:Q4_K_M or hf://owner/repo/file.gguf")
        hub.parse_ref(name)  # a bad reference: a 400 before anything starts

        def fetch(emit) -> None:
            from .commands.pull import pull as pull_checked  # downloads, then checks the GGUF

            def on_bytes(filename: str, completed: int, total: int | None) -> None:  # Ollama's progress lines
                emit({"status": f"pulling {filename}", "digest": filename, "total": total or completed,
                      "completed": completed})

            def on_part(filename: str, path: Path) -> None:  # downloaded now, or found in the cache
                on_bytes(filename, *(path.stat().st_size,) * 2)
            pull_checked(name, on_part, on_bytes)

        async def lines():
            yield {"status": "pulling manifest"}
            async for line in progress(fetch, lambda e: 404 if isinstance(e, FileNotFoundError) else 502):
                yield line
            yield {"status": "verifying sha256 digest"}
            yield {"status": "writing manifest"}
            yield {"status": "success"}

        return await respond(body, lines())

    @app.head("/api/blobs/{digest}")
    async def blob_exists(digest: str):
        return Response(status_code=200 if blobs.path(digest).is_file() else 404)

    @app.post("/api/blobs/{digest}")
    async def blob_upload(digest: str, request: Request):
        size = request.headers.get("content-length")
        upload = await asyncio.to_thread(blobs.Upload, digest, int(size) if size and size.isdecimal() else None)
        try:
            buffer = bytearray()
            async for chunk in request.stream():
                buffer += chunk
                if len(buffer) >= UPLOAD_BUFFER:
                    await asyncio.to_thread(upload.write, bytes(buffer))
                    buffer.clear()
            await asyncio.to_thread(upload.write, bytes(buffer))
            await asyncio.to_thread(upload.commit)
        except BaseException:  # a client that left, a full disk, a digest that does not match: nothing is kept
            upload.discard()
            raise
        return Response(status_code=201)

    @app.post("/api/create")
    async def create(request: Request):
        body = await read_body(request)
        name = modelfile.check_name(_name(body))
        unknown = sorted(set(body) - CREATE_FIELDS)
        if unknown:
            raise APIError(400, f"unknown field(s): {', '.join(unknown)}")
        files = blob_models.check(body["files"]) if body.get("files") else None  # never uploaded: a 404 now
        adapters = blob_models.check(body["adapters"]) if body.get("adapters") else None
        quantize = body.get("quantize") or None
        if quantize is not None:
            blob_models.quant_type(quantize)
        if body.get("modelfile") is not None:
            base, rest = from_modelfile(body["modelfile"])
        elif files is not None and not body.get("from"):
            base, rest = None, settings(body)
        elif isinstance(body.get("from"), str) and body["from"] and files is None:
            base, rest = body["from"], settings(body)
        else:
            raise APIError(400, "from must name the model to start from, or files the uploaded blobs to make it of")
        ref = source(models, base)[0] if base is not None else None
        named = base is not None and modelfile.find(base) is not None
        parameters = body.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise APIError(400, "parameters must be an object")
        # what is not being made is checked now, so a bad field is a 400 before any conversion starts; FROM a
        # named model keeps its settings (modelfile.build merges them), any other model is its file or reference
        head = f"FROM {base if named else ref}\n" if base is not None else ""
        checked = await asyncio.to_thread(modelfile.build, name, head + rest, Path.cwd(), parameters, "(being made)")
        if quantize is not None and not (files and blob_models.is_checkpoint(files)):
            # a GGUF quantized already: a 400 now, rather than an error line in the stream
            ggufs = [blobs.path(d) for n, d in (files or {}).items() if n.lower().endswith(".gguf")]
            if files is None or len(ggufs) == 1:  # (more GGUFs, or none, are refused by blob_models.model)
                source_file = ggufs[0] if files else blob_models.local_file(checked.model)
                await asyncio.to_thread(blob_models.quantizable, source_file)

        def make(emit) -> None:
            status = lambda text: emit({"status": text})  # noqa: E731
            if files is not None:
                made = blob_models.model(files, quantize, status, name.split(":")[0])
            elif quantize is not None:
                made = blob_models.quantized(blob_models.local_file(checked.model), quantize, status)
            else:
                made = None
            base_files = files if files is not None and blob_models.is_checkpoint(files) else None
            extra = blob_models.adapters(adapters, base_files, status) if adapters else []
            profile = replace(checked, model=str(made) if made is not None else checked.model,
                              adapters=(*checked.adapters, *map(str, extra)), created=time.time())
            status("writing manifest")
            modelfile.save(profile)

        async def lines():
            yield {"status": "reading model metadata"}
            async for line in progress(make, lambda e: 404 if isinstance(e, ModelNotFoundError) else
                                       507 if isinstance(e, InsufficientStorageError) else 400):
                yield line
            yield {"status": "success"}

        return await respond(body, lines())

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
