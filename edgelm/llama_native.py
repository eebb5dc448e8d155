"""llama-server's native generation API: /completion (and /completions), /infill for code completion in editors,
/embedding (and /embeddings), /apply-template, in llama-server's request and reply shapes, so that tools written
for it (llama.vim, llama.vscode, scripts that post {"prompt", "n_predict"}) work against edgelm unchanged.

The replies carry llama-server's fields: content, tokens, stop_type (eos, limit, word) with the stopping word,
tokens_predicted / tokens_evaluated / tokens_cached, timings, generation_settings, and with n_probs each token's
completion_probabilities. Streams are Server-Sent Events of {"content", "tokens", "stop": false, ...} ending in
the whole reply's fields with "stop": true (no [DONE], as llama-server). llama-server's fields that steer
generation from outside the sampler are done in the replies (llama_native_replies.py): n_indent and
t_max_predict_ms end a reply as llama-server's slots do; response_fields picks the reply's fields.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from .errors import ChatTemplateError, UsageError
from .openai_api import MAX_CHOICES, SAMPLING_FIELDS, APIError
from .runtime.infill import infill_tokens, insertion
from .runtime.sampling import SamplingParams
from .llama_native_replies import Output, stream
from .serving import chat_request, follow, read_body, wait_for

# llama-server's fields beside the sampling ones (SAMPLING_FIELDS): what each route reads
COMPLETION_FIELDS = {"prompt", "model", "stream", "n_predict", "max_tokens", "n_probs", "json_schema",
                     "return_tokens", "response_fields", "n_cmpl", "n_keep", "n_indent", "t_max_predict_ms",
                     "timings_per_token", "cache_prompt", "id_slot", "t_max_prompt_ms", "min_keep",
                     "post_sampling_probs", "return_progress", "lora", "n_cache_reuse"}
INFILL_FIELDS = COMPLETION_FIELDS | {"input_prefix", "input_suffix", "input_extra"}
# llama-server's names for SamplingParams fields, in its generation_settings
SETTINGS_NAMES = {v: k for k, v in SAMPLING_FIELDS.items() if k not in ("max_tokens", "max_completion_tokens")}


def add_routes(app: FastAPI, models) -> None:
    """The native routes on the server's app (`models`: edgelm.router's One or Router)."""

    async def complete(request: Request, infill: bool):
        body = await read_body(request)
        server = await models.get(request, body.get("model"))
        ask = Ask.of(body, server, infill)
        prompts = [fim_prompt(server, body, ask)] if infill else prompt_list(server, body.get("prompt"))
        reqs = []
        try:
            for tokens in prompts:  # every prompt's choices are queued before any is awaited
                reqs += server.submit(tokens, ask.params, ask.n_cmpl, shift=ask.keep is not None, keep=ask.keep,
                                      adapters=ask.adapters)
        except BaseException:
            for req in reqs:
                req.cancel()
            raise
        outs = [Output(server, ask, req, i) for i, req in enumerate(reqs)]
        if ask.stream:
            return StreamingResponse(stream(server, request, ask, reqs, outs), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        if ask.cuts:  # n_indent / t_max_predict_ms look at the text as it comes
            async for i, chunk in follow(server, request, reqs):
                outs[i].feed(chunk)
                if outs[i].cut:
                    reqs[i].cancel()
            if any(not out.done for out in outs):
                raise APIError(499, "client disconnected", type="cancelled")
        else:
            if not await wait_for(request, reqs):
                raise APIError(499, "client disconnected", type="cancelled")
            for out, req in zip(outs, reqs):
                if req.timings.completion_tokens:  # follow() counts the streams' own
                    server.metrics.observe_ttft(req.timings.ttft_s)
                for chunk in req.drain():
                    out.feed(chunk)
        replies = [ask.pick(out.final()) for out in outs]
        return replies[0] if len(replies) == 1 else replies

    @app.post("/completion")
    async def completion(request: Request):
        return await complete(request, infill=False)

    @app.post("/completions")
    async def completions(request: Request):
        return await complete(request, infill=False)

    @app.post("/infill")
    async def infill(request: Request):
        return await complete(request, infill=True)

    @app.post("/apply-template")
    async def apply_template(request: Request):
        """{"messages", "tools"?, "chat_template_kwargs"?} -> {"prompt"}: the chat template's text, not run."""
        body, server, tools, _, extra = await chat_request(request, models)
        try:
            prompt = server.template.render(server.preamble(body["messages"]), tools=tools, extra=extra)
        except (UsageError, ChatTemplateError) as e:
            raise APIError(400, str(e), param="messages") from None
        return {"prompt": prompt}

    async def embedding(request: Request):
        """{"content" or "input": text or texts, "embd_normalize"?} -> [{"index", "embedding": [[...]]}]."""
        body = await read_body(request)
        texts = body.get("input", body.get("content"))
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            raise APIError(400, "content must be a non-empty string or list of non-empty strings", param="content")
        norm = body.get("embd_normalize", 2)
        if isinstance(norm, bool) or not isinstance(norm, int) or norm < -1:
            raise APIError(400, f"embd_normalize must be an integer of at least -1, not {norm!r}",
                           param="embd_normalize")
        server = await models.get(request, body.get("model"))
        vectors = await server.embed(texts, normalize=False)
        return [{"index": i, "embedding": [normalized(v, norm).tolist()]} for i, v in enumerate(vectors)]

    app.post("/embedding")(embedding)
    app.post("/embeddings")(embedding)


def normalized(v: np.ndarray, norm: int) -> np.ndarray:
    """llama-server's embd_normalize: -1 none, 0 max absolute value (to int16's range), 1 taxicab, 2 Euclidean,
    p > 2 the p-norm."""
    v = v.astype(np.float64)
    if norm == -1:
        scale = 1.0
    elif norm == 0:
        scale = np.abs(v).max() / 32760.0
    else:
        scale = np.sum(np.abs(v) ** norm) ** (1.0 / norm)
    return (v / scale if scale > 0 else v * 0).astype(np.float32)


# ---------------------------------------------------------------------------- requests


@dataclass
class Ask:
    """What a native request asks for beyond its SamplingParams."""

    params: SamplingParams
    stream: bool = False
    n_probs: int = 0
    n_cmpl: int = 1
    keep: int | None = None  # n_keep when the server shifts its context (--context-shift), else None
    adapters: tuple[float, ...] | None = None  # per-request LoRA scales (lora_scales), None: the server's
    n_indent: int = 0
    t_max_predict_ms: float = 0.0
    return_tokens: bool = False
    timings_per_token: bool = False
    response_fields: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # generation_settings

    @property
    def cuts(self) -> bool:
        return self.n_indent > 0 or self.t_max_predict_ms > 0

    @classmethod
    def of(cls, body: dict, server, infill: bool) -> "Ask":
        known = INFILL_FIELDS if infill else COMPLETION_FIELDS
        unknown = sorted(set(body) - known - set(SAMPLING_FIELDS))
        if unknown:
            raise APIError(400, f"unknown field(s): {', '.join(unknown)}", param=unknown[0])
        if not infill and "prompt" not in body:
            raise APIError(400, "prompt is required", param="prompt")
        unsupported(body, server)
        kwargs = {SAMPLING_FIELDS[k]: v for k, v in body.items() if k in SAMPLING_FIELDS and v is not None}
        kwargs = {**server.defaults, **kwargs}
        if kwargs.get("seed") == -1:  # llama-server's "random"
            kwargs["seed"] = None
        if "logit_bias" in kwargs:
            kwargs["logit_bias"] = logit_bias(server.llama, kwargs["logit_bias"])
        n_predict = body.get("n_predict", body.get("max_tokens", server.defaults.get("max_tokens", -1)))
        cap = server.options.max_tokens_cap
        if isinstance(n_predict, bool) or not isinstance(n_predict, int) or n_predict < -1:
            raise APIError(400, f"n_predict must be an integer of at least -1, not {n_predict!r}", param="n_predict")
        kwargs["max_tokens"] = cap if n_predict == -1 else n_predict  # -1: until the context's end (and the cap)
        n_probs = integer(body, "n_probs", 0, 0, 20)
        kwargs["logprobs"] = n_probs or None
        if body.get("json_schema") is not None:
            kwargs["json_schema"] = body["json_schema"]
        try:
            params = SamplingParams.from_kwargs(**kwargs)
        except (UsageError, TypeError) as e:
            raise APIError(400, str(e)) from None
        if params.max_tokens > cap:
            raise APIError(400, f"n_predict {params.max_tokens} is above the server's cap {cap}", param="n_predict")
        n_keep = integer(body, "n_keep", 0, -1, None)
        ask = cls(params, stream=flag(body, "stream"), n_probs=n_probs,
                  n_cmpl=integer(body, "n_cmpl", 1, 1, MAX_CHOICES),
                  keep=n_keep if server.options.context_shift else None, n_indent=integer(body, "n_indent", 0, 0, None),
                  t_max_predict_ms=integer(body, "t_max_predict_ms", 0, 0, None),
                  return_tokens=flag(body, "return_tokens"), timings_per_token=flag(body, "timings_per_token"),
                  response_fields=fields_list(body), adapters=lora_scales(body, server))
        ask.settings = settings(params, server, n_predict=n_predict, n_keep=n_keep, stream=ask.stream,
                                n_probs=n_probs, timings_per_token=ask.timings_per_token)
        return ask

    def pick(self, reply: dict) -> dict:
        """llama-server's response_fields: only the fields named, a path "a/b" taken from inside "a" and named
        by its path; a missing one left out."""
        if not self.response_fields:
            return reply
        out = {}
        for path in self.response_fields:
            value, found = reply, True
            for key in path.split("/"):
                if isinstance(value, dict) and key in value:
                    value = value[key]
                else:
                    found = False
                    break
            if found:
                out[path] = value
        return out


def unsupported(body: dict, server) -> None:
    """llama-server's fields edgelm takes only at the values that change nothing here."""
    if body.get("post_sampling_probs"):
        raise APIError(400, "post_sampling_probs is not supported: n_probs reports the model's own probabilities",
                       param="post_sampling_probs")
    if body.get("return_progress"):
        raise APIError(400, "return_progress is not supported", param="return_progress")
    min_keep = body.get("min_keep", 0)
    if min_keep not in (0, 1) or isinstance(min_keep, bool):
        raise APIError(400, "min_keep above 1 is not supported", param="min_keep")
    for name, kind in (("cache_prompt", bool), ("t_max_prompt_ms", int), ("n_cache_reuse", int)):
        # the KV of a shared prefix is always reused, exactly; llama-server has no prompt time limit either
        if name in body and (not isinstance(body[name], kind) or (kind is int and isinstance(body[name], bool))):
            raise APIError(400, f"{name} must be {'true or false' if kind is bool else 'an integer'}", param=name)
    slot = body.get("id_slot", -1)
    if isinstance(slot, bool) or not isinstance(slot, int) or not -1 <= slot < server.options.n_parallel:
        raise APIError(400, f"id_slot must be -1 or a slot in [0, {server.options.n_parallel})", param="id_slot")


def lora_scales(body: dict, server) -> tuple[float, ...] | None:
    """llama-server's per-request `lora`: [{"id", "scale"}, ...] over the server's --lora adapters (/lora-adapters
    lists their ids), an adapter left out at scale 0; None (the server's scales) without the field or with an empty
    list, as llama-server takes it."""
    given = body.get("lora")
    if given is None or given == []:
        return None
    specs = server.llama.lora.specs if server.llama.lora else ()
    if not isinstance(given, list) or not all(isinstance(a, dict) and set(a) <= {"id", "scale"} for a in given):
        raise APIError(400, 'lora must be a list of {"id": adapter, "scale": number}', param="lora")
    scales = [0.0] * len(specs)
    for a in given:
        i, scale = a.get("id"), a.get("scale", 1.0)
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(specs):
            raise APIError(400, f"lora: no adapter {i!r} (the server has {len(specs)}: GET /lora-adapters)",
                           param="lora")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise APIError(400, f"lora: adapter {i}'s scale must be a number, not {scale!r}", param="lora")
        scales[i] = float(scale)
    return tuple(scales) if specs else None


def integer(body: dict, name: str, default: int, lo: int, hi: int | None) -> int:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f"of at least {lo}"
        raise APIError(400, f"{name} must be an integer {bound}, not {v!r}", param=name)
    return v


def flag(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise APIError(400, f"{name} must be true or false, not {v!r}", param=name)
    return v


def fields_list(body: dict) -> list[str]:
    v = body.get("response_fields") or []
    if not isinstance(v, list) or not all(isinstance(f, str) for f in v):
        raise APIError(400, "response_fields must be a list of field names", param="response_fields")
    return v


def logit_bias(llama, given) -> dict:
    """llama-server's logit_bias: [[token, bias], ...] or {token: bias}, a token an id or a text (each of its tokens
    biased), a bias a number or false (the token banned)."""
    pairs = given.items() if isinstance(given, dict) else given
    if not isinstance(pairs, (list, type({}.items()))) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
        raise APIError(400, "logit_bias must be [[token, bias], ...] or {token: bias}", param="logit_bias")
    out = {}
    for token, bias in pairs:
        if bias is False:
            bias = -math.inf
        if isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise APIError(400, f"logit_bias: a bias is a number or false, not {bias!r}", param="logit_bias")
        if isinstance(token, str) and not token.lstrip("-").isdecimal():
            ids = llama.tokenize(token, add_special=False)
        elif isinstance(token, (int, str)) and not isinstance(token, bool):
            ids = [int(token)]
        else:
            raise APIError(400, f"logit_bias: a token is an id or a text, not {token!r}", param="logit_bias")
        for t in ids:
            out[t] = float(bias)
    return out


def settings(params: SamplingParams, server, **extra) -> dict:
    """llama-server's generation_settings for `params`: its field names, the model and context size."""
    values = asdict(params)
    out = {name: values[key] for key, name in SETTINGS_NAMES.items() if key in values}
    out["stop"] = list(params.stop)
    out["logit_bias"] = [{"token": t, "bias": b if b > -math.inf else False} for t, b in params.logit_bias.items()]
    out["dry_sequence_breakers"] = list(params.dry_sequence_breakers)
    out["seed"] = -1 if params.seed is None else params.seed
    out["samplers"] = list(params.samplers) if params.samplers is not None else [
        "penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature"]
    out["json_schema"] = params.json_schema
    return {"n_ctx": server.options.n_ctx, "model": server.model_id, **out, "max_tokens": extra.get("n_predict"),
            **extra}


def prompt_list(server, prompt) -> list[list[int]]:
    """llama-server's prompt shapes: a text, token ids, ids and texts mixed (one prompt), or a list of those (one
    reply each). A text is tokenized with BOS (where the model adds one) and special tokens parsed; in a mixed
    prompt only a leading text gets BOS."""
    def single(p) -> list[int] | None:
        if isinstance(p, str):
            return server.llama.tokenize(p, add_special=True, parse_special=True)
        if isinstance(p, list) and p and all(isinstance(e, (int, str)) and not isinstance(e, bool) for e in p) and (
                any(isinstance(e, int) for e in p)):
            tokens = []
            for j, e in enumerate(p):
                tokens += [e] if isinstance(e, int) else server.llama.tokenize(e, add_special=j == 0,
                                                                               parse_special=True)
            return tokens
        return None

    one = single(prompt)
    if one is not None:
        prompts = [one]
    else:
        prompts = [single(p) for p in prompt] if isinstance(prompt, list) and prompt else [None]
    if any(p is None for p in prompts):
        raise APIError(400, "prompt must be a string, a list of token ids (texts may be mixed in), or a list of "
                       "those", param="prompt")
    if len(prompts) > MAX_CHOICES:
        raise APIError(400, f"at most {MAX_CHOICES} prompts per request", param="prompt")
    for tokens in prompts:
        if not tokens:
            raise APIError(400, "prompt is empty", param="prompt")
        try:
            server.llama.check_tokens(tokens)
        except UsageError as e:
            raise APIError(400, str(e), param="prompt") from None
    return prompts


def fim_prompt(server, body: dict, ask: Ask) -> list[int]:
    """/infill's prompt (runtime/infill.py), its fields checked; a 400 for a model without FIM tokens."""
    for name in ("input_prefix", "input_suffix"):
        if not isinstance(body.get(name), str):
            raise APIError(400, f"{name} is required, a string", param=name)
    prompt, extra = body.get("prompt", ""), body.get("input_extra", [])
    if not isinstance(prompt, str):
        raise APIError(400, "prompt must be a string", param="prompt")
    if not isinstance(extra, list) or not all(
            isinstance(c, dict) and isinstance(c.get("text"), str) and isinstance(c.get("filename", ""), str)
            for c in extra):
        raise APIError(400, 'input_extra must be a list of {"filename": string, "text": string}',
                       param="input_extra")
    o = server.options
    try:
        return infill_tokens(server.llama, body["input_prefix"], body["input_suffix"], middle=prompt, extra=extra,
                             n_ctx=o.n_ctx, n_batch=o.n_batch, n_predict=ask.params.max_tokens, spm=o.spm_infill,
                             refusal="Infill is not supported by this model")
    except UsageError as e:
        raise APIError(400, str(e), type="not_supported_error") from None


def insert(server, prompt: str, suffix: str, refusal: str) -> list[int]:
    """Ollama's and OpenAI's `suffix` (runtime/infill.py's insertion); a 400 for a model without FIM tokens."""
    try:
        return insertion(server.llama, prompt, suffix, refusal, spm=server.options.spm_infill)
    except UsageError as e:
        raise APIError(400, str(e), type="not_supported_error") from None
