"""Router mode: several models behind one server, chosen by each request's "model", as Ollama serves them and as
llama-server does in its router mode.

The catalog is what `edgelm list` shows (named models made by `edgelm create`, the bundled model, the models in
huggingface_hub's cache) plus the GGUF files in --models-dir. A model loads on its first request, with an engine,
context and slots of its own, and unloads when it has been idle for its keep-alive (Ollama's `keep_alive`; 0: as
soon as its requests end, negative: never), or when another needs its place: beyond --models-max loaded models, or
when the memory check says the next would not fit, the least recently used idle model goes first. A request holds
a lease on its model until its response has been sent, so no model is unloaded under a request.
"""
from __future__ import annotations

import asyncio
import math
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fastapi import Request

from . import hub, modelfile
from .errors import EdgelmError, InsufficientMemoryError, UsageError
from .openai_api import APIError
from .runtime.model import default_model_path, resolve_model

RELEASE = "edgelm.release"  # the ASGI scope's list of lease releases, called once the response is sent
REAP_S = 0.5  # how often idle models are looked at for expiry
KEEP_ALIVE_S = 300.0  # Ollama's default
_SPLIT_PIECE = re.compile(r"\.ee\d*-(draft|tail|shared)\.gguf$")  # an early-exit split's files: parts, not models
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any) -> float:
    """Ollama's keep_alive in seconds: a number of seconds, or a Go duration ("5m", "1h30m", "-1s"); negative
    means forever (math.inf). UsageError for anything else."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        sign, body = (-1.0, text[1:]) if text[0] == "-" else (1.0, text.lstrip("+"))
        try:
            seconds = sign * float(body)  # a bare number: seconds, as Ollama's clients send them
        except ValueError:
            parts = _DURATION.findall(body)
            if not parts or "".join(n + u for n, u in parts) != body:
                raise UsageError(f"keep_alive {value!r}: give seconds or a duration such as '5m', '1h30m' or '-1'")\
                    from None
            seconds = sign * sum(float(n) * _UNIT_S[u] for n, u in parts)
    else:
        raise UsageError(f"keep_alive {value!r}: give seconds or a duration such as '5m', '1h30m' or '-1'")
    return math.inf if seconds < 0 else seconds


def requested_keep_alive(value: Any) -> float:
    """parse_keep_alive() of a request's field: APIError (400) naming it."""
    try:
        return parse_keep_alive(value)
    except UsageError as e:
        raise APIError(400, str(e), param="keep_alive") from None


@dataclass(frozen=True)
class Entry:
    """One model the router can load."""
    name: str
    ref: str  # a GGUF path, or a named model's base (a path or an hf:// reference)
    profile: Any = None  # a named model (edgelm/modelfile.py)

    @property
    def path(self) -> Path | None:
        """The local file, where there is one without asking the Hub."""
        path = Path(self.ref)
        return path if not hub.is_hub_ref(self.ref) and path.is_file() else None


@dataclass
class RouterOptions:
    models_dir: str | None = None
    models_max: int = 4  # loaded at once (0: no limit), as llama-server's --models-max
    keep_alive: float = KEEP_ALIVE_S  # seconds idle before a model unloads (math.inf: never)
    autoload: bool = True  # load a model on its first request (else only POST /models/load does)
    default: str | None = None  # the model for requests that name none, loaded at start-up
    fixed: dict = field(default_factory=dict)  # with_profile()'s n_ctx / n_threads: the command line's, if it set them


@dataclass
class Loaded:
    server: Any  # edgelm.server.Server
    keep_alive: float
    leases: int = 0
    used: float = 0.0  # time.monotonic() of its last request's start or end
    expires: float = math.inf  # time.monotonic() at which it unloads if still idle


class Router:
    """The loaded models and their leases. Everything but loading and closing a model runs on the event loop, so
    the tables change only between awaits."""

    routed = True

    def __init__(self, base, options: RouterOptions, metrics, make):
        self.base, self.options, self.metrics, self.make = base, options, metrics, make  # make(ServerOptions)
        self.models: dict[str, Loaded] = {}
        self.loading: dict[str, asyncio.Future] = {}
        self.loads = self.unloads = 0
        self._one_load = asyncio.Lock()  # loads go one at a time: each makes room and checks memory for itself
        self._headers: dict[tuple, Any] = {}  # (path, mtime, size) -> its GGUF header, or None for a broken file
        self.extra: dict[str, Entry] = {}  # the default model, where it is a file outside the catalog
        self.default = None
        if options.default is not None:
            try:
                entry = self.find(options.default)
            except APIError:
                path = resolve_model(options.default)  # ModelNotFoundError: a clear one-line error at start-up
                entry = self.extra[path.stem] = Entry(path.stem, str(path))
            self._add(entry.name, make(self.options_for(entry)))
            self.default = entry.name

    # ------------------------------------------------------------ the catalog

    def catalog(self) -> dict[str, Entry]:
        """Name -> Entry; where two sources give one name, the first wins: the default model given as a file,
        named models, --models-dir, the bundled model, the Hub cache."""
        out: dict[str, Entry] = dict(self.extra)
        for profile in modelfile.profiles():
            out.setdefault(profile.name, Entry(profile.name, profile.model, profile))
        if self.options.models_dir is not None:
            for path in sorted(Path(self.options.models_dir).glob("*.gguf")):
                name = self._model_name(path)
                if name is not None:
                    out.setdefault(name, Entry(name, str(path)))
        bundled = default_model_path()
        out.setdefault(bundled.stem, Entry(bundled.stem, str(bundled)))
        for cached in hub.cached_models():
            out.setdefault(cached.ref, Entry(cached.ref, str(cached.path)))
        return out

    def _model_name(self, path: Path) -> str | None:
        """A --models-dir file's name (a split model's by its first part), or None for what is not a model on its
        own: later parts, early-exit split pieces, LoRA adapters, control vectors, importance matrices."""
        parts = hub.shards(path.name)
        if parts[0] != path.name or _SPLIT_PIECE.search(path.name):
            return None
        gguf = self.header(path)  # a broken file is not offered; `edgelm info` says what is wrong
        if gguf is None or gguf.get("general.type", "model") != "model" or \
                gguf.get("general.architecture") in (None, "controlvector"):
            return None
        return path.name[:-len("-00001-of-00000.gguf")] if len(parts) > 1 else path.stem

    def header(self, path: Path):
        """A file's GGUF header without its arrays, read once while the file is unchanged; None if unreadable."""
        try:
            st = path.stat()
        except OSError:
            return None
        key = (str(path), st.st_mtime_ns, st.st_size)
        if key not in self._headers:
            from .gguf_reader import read_gguf

            try:
                self._headers[key] = read_gguf(path, keep_arrays=False)
            except (EdgelmError, OSError):
                self._headers[key] = None
        return self._headers[key]

    def find(self, name: Any) -> Entry:
        """The catalog entry a request's "model" names ("NAME:latest" finds NAME too); APIError 404 if none."""
        if not isinstance(name, str) or not name:
            raise APIError(400, "model must be a non-empty string naming a model (GET /v1/models lists them)",
                           param="model")
        catalog = self.catalog()
        for key in (name, name.removesuffix(":latest"), f"{name}:latest"):
            if key in catalog:
                return catalog[key]
        return cached_hub_entry(name)

    def options_for(self, entry: Entry):
        """The server's options for one model: the command line's, under a named model's own settings where the
        command line left them to it."""
        base = replace(self.base, model=entry.ref, alias=entry.name)
        return with_profile(base, entry.profile, **self.options.fixed) if entry.profile is not None else base

    # ------------------------------------------------------------ requests

    async def get(self, request: Request, name: Any = None, keep_alive: Any = None):
        """The server of the model a request names (the default one if it names none), loaded if need be, leased
        to the request until its response has been sent."""
        if keep_alive is not None:
            keep_alive = requested_keep_alive(keep_alive)
        slot = await self._slot(self._key(name))
        slot.leases += 1
        slot.used = time.monotonic()
        if keep_alive is not None:  # the latest request's keep-alive holds, as in Ollama
            slot.keep_alive = keep_alive
        request.scope.setdefault(RELEASE, []).append(lambda: self._release(slot))
        return slot.server

    def _key(self, name: Any) -> str:
        if name is None or name == "":
            if self.default is None:
                raise APIError(400, "model is required: this server routes requests by it (GET /v1/models lists "
                               "the models)", param="model")
            return self.default
        if isinstance(name, str) and name in self.models:
            return name
        return self.find(name).name

    async def _slot(self, name: str) -> Loaded:
        while name not in self.models:
            pending = self.loading.get(name)
            if pending is None:
                if not self.options.autoload:
                    raise APIError(400, f"model {name!r} is not loaded (POST /models/load loads it)", param="model")
                pending = self.loading[name] = asyncio.ensure_future(self._load(name))
                pending.add_done_callback(lambda _, name=name: self.loading.pop(name, None))
            await asyncio.shield(pending)  # a client that leaves does not stop a load others wait for
        return self.models[name]

    def _release(self, slot: Loaded) -> None:
        slot.leases -= 1
        slot.used = time.monotonic()
        if slot.leases == 0:
            slot.expires = slot.used + slot.keep_alive

    # ------------------------------------------------------------ loading and unloading

    async def _load(self, name: str) -> None:
        options = self.options_for(self.find(name))
        async with self._one_load:
            while True:
                limit = self.options.models_max
                while limit and len(self.models) >= limit:
                    if not await self._evict():
                        raise APIError(503, f"all {limit} loaded models are busy (--models-max {limit}); try again",
                                       type="server_error", code="models_busy", headers={"Retry-After": "1"})
                try:
                    server = await asyncio.to_thread(self.make, options)
                except InsufficientMemoryError:
                    if await self._evict():  # an idle model's memory may be what the next one needs
                        continue
                    raise
                self._add(name, server)
                return

    def _add(self, name: str, server) -> None:
        now = time.monotonic()
        self.models[name] = Loaded(server, self.options.keep_alive, used=now, expires=now + self.options.keep_alive)
        self.loads += 1

    async def _evict(self) -> bool:
        """Unload the least recently used idle model; False if every loaded model is serving a request."""
        idle = [(slot.used, name) for name, slot in self.models.items() if slot.leases == 0]
        if not idle:
            return False
        await self.unload(min(idle)[1])
        return True

    async def unload(self, name: str) -> bool:
        """Unload a model now if it is idle, else once its requests end; False if it is not loaded."""
        slot = self.models.get(name)
        if slot is None:
            return False
        if slot.leases:
            slot.keep_alive = 0.0
            return True
        del self.models[name]
        self.unloads += 1
        await asyncio.to_thread(slot.server.close)
        return True

    async def load(self, name: Any) -> str:
        """POST /models/load: load a model (without leasing it); its name."""
        key = self._key(name)
        await self._slot(key)
        return key

    async def reap(self) -> None:
        """Unload idle models past their keep-alive; runs for the server's life."""
        while True:
            now = time.monotonic()
            for name, slot in list(self.models.items()):
                if slot.leases == 0 and slot.expires <= now and self.models.get(name) is slot:
                    await self.unload(name)
            await asyncio.sleep(REAP_S)

    def close(self) -> None:
        for slot in self.models.values():
            slot.server.close()
        self.models.clear()

    # ------------------------------------------------------------ listings

    def listing(self) -> dict:
        """/v1/models (and llama-server's /models): the catalog, with each model's status as llama-server's
        router gives it."""
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": int(entry.path.stat().st_mtime) if entry.path else 0,
             "owned_by": "edgelm", "status": {"value": self.status(name)}} for name, entry in self.catalog().items()]}

    def status(self, name: str) -> str:
        return "loaded" if name in self.models else "loading" if name in self.loading else "unloaded"

    def expires_at(self, name: str) -> float:
        """Wall-clock time at which a loaded model unloads if still idle (math.inf: not while it serves, or never)."""
        slot = self.models[name]
        if slot.leases or math.isinf(slot.expires):
            return math.inf
        return time.time() + slot.expires - time.monotonic()

    def servers(self) -> dict[str, Any]:
        return {name: slot.server for name, slot in self.models.items()}


class One:
    """Single-model mode (llama-server's default): every request goes to the one model, whatever it names."""

    routed = False

    def __init__(self, server):
        self.server = server

    async def get(self, request: Request, name: Any = None, keep_alive: Any = None):
        return self.server

    def servers(self) -> dict[str, Any]:
        return {self.server.model_id: self.server}

    def find(self, name: Any) -> Entry:
        """The served model by its name, or a model in the Hub cache; APIError 404 for anything else."""
        server = self.server
        if name in (server.model_id, f"{server.model_id}:latest"):
            return Entry(server.model_id, str(server.llama.path), server.options.profile)
        return cached_hub_entry(name)

    def listing(self) -> dict:
        server = self.server
        return {"object": "list", "data": [{"id": server.model_id, "object": "model", "created": server.created,
                                            "owned_by": "edgelm"}]}

    def close(self) -> None:
        self.server.close()


def cached_hub_entry(name: Any) -> Entry:
    """A Hub model in the cache by the name it was pulled by (hf.co/owner/repo:Q4_K_M); APIError 404 if none."""
    if hub.is_hub_ref(name):
        try:
            path = hub.cached(name)
        except UsageError as e:
            raise APIError(400, str(e), param="model") from None
        if path is not None:
            return Entry(name, str(path))
    raise APIError(404, f"model {name!r} not found (GET /v1/models lists the models this server has)",
                   type="not_found_error", code="model_not_found", param="model")


def with_profile(options, profile, n_ctx: int | None = None, n_threads: int | None = None):
    """A named model's ServerOptions: its base model, adapters, template and load settings, where the command
    line (`n_ctx`, `n_threads`, `options.lora`, `options.chat_template`) left them to it."""
    named = profile.load
    return replace(options, model=profile.model, profile=profile,
                   n_ctx=n_ctx or named.get("n_ctx", options.n_ctx),
                   n_threads=n_threads or named.get("n_threads", options.n_threads),
                   lora=options.lora or tuple(profile.adapters), chat_template=options.chat_template or profile.template)


def add_routes(app, router: Router) -> None:
    """llama-server's router endpoints: GET /models, POST /models/load, POST /models/unload."""
    from .serving import read_body

    @app.get("/models")
    async def catalog():
        return router.listing()

    @app.post("/models/load")
    async def load(request: Request):
        body = await read_body(request)
        return {"success": True, "model": await router.load(body.get("model"))}

    @app.post("/models/unload")
    async def unload(request: Request):
        body = await read_body(request)
        name = router.find(body.get("model")).name
        if not await router.unload(name):
            raise APIError(400, f"model {name!r} is not loaded", param="model")
        return {"success": True}
