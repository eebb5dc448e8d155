"""OpenAI's wire format: request bodies to SamplingParams, and the objects replies carry (choices, logprobs).

Kept apart from the server's routing (server.py) so each can be read alone; bad input raises APIError, which
the server answers with an OpenAI-style error body.
"""
from __future__ import annotations

import itertools

from fastapi.responses import JSONResponse

from .errors import UsageError
from .runtime.logprobs import MAX_TOP_LOGPROBS, TokenLogprob
from .runtime.model import LlamaModel
from .runtime.sampling import SamplingParams

MAX_CHOICES = 16  # n: completions of one prompt in one request
SAMPLING_FIELDS = {  # OpenAI request field -> SamplingParams field
    "max_tokens": "max_tokens", "max_completion_tokens": "max_tokens", "temperature": "temperature",
    "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "typical_p": "typical_p", "seed": "seed",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "repeat_penalty": "repeat_penalty", "logit_bias": "logit_bias", "stop": "stop", "grammar": "grammar",
    "ignore_eos": "ignore_eos",
    # llama-server's own sampling fields
    "repeat_last_n": "penalty_last_n", "mirostat": "mirostat", "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta", "xtc_probability": "xtc_probability", "xtc_threshold": "xtc_threshold",
    "dry_multiplier": "dry_multiplier", "dry_base": "dry_base", "dry_allowed_length": "dry_allowed_length",
    "dry_penalty_last_n": "dry_penalty_last_n", "dry_sequence_breakers": "dry_sequence_breakers",
    "top_n_sigma": "top_n_sigma", "dynatemp_range": "dynatemp_range", "dynatemp_exponent": "dynatemp_exponent",
    "samplers": "samplers",
}
# the sampling fields the other APIs' routes (responses_api.py, anthropic_api.py) take beside their own, as
# llama-server takes them: top_k, min_p, seed, grammar, ...; each has its own name for the token limit
EXTRA_SAMPLING = set(SAMPLING_FIELDS) - {"max_tokens", "max_completion_tokens"}
IGNORED_FIELDS = {"model", "stream", "stream_options", "user", "n", "messages", "prompt", "response_format",
                  "logprobs", "top_logprobs", "echo", "suffix", "best_of", "parallel_tool_calls", "tools", "tool_choice",
                  "chat_template_kwargs", "lora"}


ANTHROPIC_ERRORS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                    413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.type, self.code, self.param, self.headers = status, type, code, param, headers or {}

    def response(self, path: str = "") -> JSONResponse:
        """The error body of the API `path` belongs to: Ollama's {"error": message} for its routes
        (ollama_api.py), Anthropic's for /v1/messages (anthropic_api.py), else OpenAI's."""
        if path.startswith("/api/"):
            body = {"error": str(self)}
        elif path.startswith("/v1/messages"):
            kind = ANTHROPIC_ERRORS.get(self.status, "api_error" if self.status >= 500 else "invalid_request_error")
            body = {"type": "error", "error": {"type": kind, "message": str(self)}}
        else:
            body = {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def sampling_params(body: dict, chat: bool, default_max_tokens: int, defaults: dict | None = None) -> SamplingParams:
    """SamplingParams from a completions or chat request body, over `defaults` (a named model's); APIError (400)
    naming a bad field."""
    unknown = sorted(set(body) - set(SAMPLING_FIELDS) - IGNORED_FIELDS)
    if unknown:
        raise APIError(400, f"unknown field(s): {', '.join(unknown)}", param=unknown[0])
    choices(body)
    if body.get("best_of", 1) not in (None, 1):
        raise APIError(400, "best_of is not supported", param="best_of")
    if body.get("echo") not in (None, False, True) or (chat and body.get("echo")):
        raise APIError(400, "echo is true or false, on /v1/completions", param="echo")
    kwargs = {**(defaults or {}),
              **{SAMPLING_FIELDS[k]: v for k, v in body.items() if k in SAMPLING_FIELDS and v is not None}}
    kwargs["logprobs"] = requested_logprobs(body, chat)
    kwargs.setdefault("max_tokens", default_max_tokens)
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise APIError(400, "response_format.type must be text, json_object or json_schema",
                           param="response_format")
        if fmt["type"] == "json_object":
            kwargs["json_schema"] = {"type": "object"}
        elif fmt["type"] == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise APIError(400, "response_format.json_schema.schema must be an object",
                               param="response_format")
            kwargs["json_schema"] = schema
    try:
        return SamplingParams.from_kwargs(**kwargs)
    except (UsageError, TypeError) as e:
        raise APIError(400, str(e)) from None


def choices(body: dict) -> int:
    """OpenAI's `n`: how many completions of the prompt to generate."""
    n = body.get("n", 1)
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise APIError(400, f"n must be an integer in [1, {MAX_CHOICES}], not {n!r}", param="n")
    return n


def requested_logprobs(body: dict, chat: bool):
    """SamplingParams.logprobs from OpenAI's fields: chat has logprobs (bool) and top_logprobs (int), the legacy
    completions endpoint logprobs (int). Values of the wrong type reach SamplingParams, which names them."""
    if not chat:
        return body.get("logprobs")
    wanted, top = body.get("logprobs"), body.get("top_logprobs")
    if wanted not in (None, True, False):
        raise APIError(400, f"logprobs must be true or false, not {wanted!r}", param="logprobs")
    if top is not None and wanted is not True:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise APIError(400, f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], not {top!r}",
                       param="top_logprobs")
    return (0 if top is None else top) if wanted else None


def token_text(llama: LlamaModel, token: int) -> tuple[str, bytes]:
    raw = llama.token_bytes(token)
    return raw.decode("utf-8", errors="replace"), raw  # a piece of a UTF-8 sequence: its bytes say what it is


def piece(llama: LlamaModel, token: int) -> str | list[int]:
    """A token's text, or its bytes where they are not whole UTF-8 characters (as llama-server's /tokenize)."""
    raw = llama.token_bytes(token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


def chat_logprobs(llama: LlamaModel, logprobs: list[TokenLogprob]) -> dict:
    """A chat choice's `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def item(token: int, logprob: float) -> dict:
        text, raw = token_text(llama, token)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**item(lp.token, lp.logprob), "top_logprobs": [item(t, v) for t, v in lp.top]}
                        for lp in logprobs]}


def completion_logprobs(llama: LlamaModel, logprobs: list[TokenLogprob], n_top: int, offset: int = 0) -> dict:
    """A completion choice's `logprobs` object: tokens, token_logprobs, top_logprobs and text_offset, the
    offsets counted from `offset` over the token texts."""
    tokens = [token_text(llama, lp.token)[0] for lp in logprobs]
    offsets = list(itertools.accumulate(map(len, tokens[:-1]), initial=offset)) if tokens else []
    top = [{token_text(llama, t)[0]: v for t, v in lp.top} for lp in logprobs] if n_top else None
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs], "top_logprobs": top,
            "text_offset": offsets}


def stopping_word(llama: LlamaModel, completion, stops) -> str | None:
    """The stop string that ended `completion` (finish reason "stop"), None when it ended otherwise: the text
    leaves the stop string out, while its tokens go on with it."""
    if completion.finish_reason != "stop" or not stops:
        return None
    tail = llama.detokenize(completion.tokens)[len(completion.text):]
    return next((stop for stop in stops if tail.startswith(stop)), None)


def finish_reason(reason: str | None) -> str | None:
    return reason if reason in (None, "stop", "length") else "stop"


async def echoes(server, prompts: list[list[int]], params: SamplingParams, n: int) -> list[tuple]:
    """OpenAI's `echo` on /v1/completions: (the prompt's text, its logprobs object or None) for each choice, the
    prompt's token log-probabilities (the first token has none) read in a context of their own, as evaluation
    harnesses (lm-evaluation-harness's local-completions) score a continuation."""
    out = []
    for tokens in prompts:
        texts = [token_text(server.llama, t)[0] for t in tokens]
        logprobs = None
        if params.logprobs is not None:
            scored = await server.score(tokens, params.logprobs)
            top = [None] + [{token_text(server.llama, t)[0]: v for t, v in lp.top} for lp in scored]
            logprobs = {"tokens": texts, "token_logprobs": [None] + [lp.logprob for lp in scored],
                        "top_logprobs": top if params.logprobs else None,
                        "text_offset": list(itertools.accumulate(map(len, texts[:-1]), initial=0))}
        out += [("".join(texts), logprobs)] * n
    return out


def joined(first: dict | None, then: dict | None) -> dict | None:
    """Two completions logprobs objects, one after the other (the echoed prompt's, the reply's)."""
    if first is None or then is None:
        return first or then
    top = first["top_logprobs"] + then["top_logprobs"] if first["top_logprobs"] is not None else None
    return {"tokens": first["tokens"] + then["tokens"], "top_logprobs": top,
            "token_logprobs": first["token_logprobs"] + then["token_logprobs"],
            "text_offset": first["text_offset"] + then["text_offset"]}
