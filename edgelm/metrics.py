"""Prometheus metrics of the server: HTTP counters and the time-to-first-token histogram it records, and the
text page that adds the engine's own counters and gauges (requests, tokens, queue length, batch size, cache hits)."""
from __future__ import annotations

import threading

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.http = {}  # (endpoint, status) -> count
        self.ttft = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0

    def request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.http[(endpoint, status)] = self.http.get((endpoint, status), 0) + 1

    def observe_ttft(self, seconds: float) -> None:
        with self.lock:
            self.ttft_sum += seconds
            for i, bound in enumerate(TTFT_BUCKETS):
                if seconds <= bound:
                    self.ttft[i] += 1
                    break
            else:
                self.ttft[-1] += 1


COUNTERS = (("requests_total", "requests", "Generation requests accepted by the engine."),
            ("requests_completed_total", "completed", "Generation requests finished."),
            ("requests_cancelled_total", "cancelled", "Generation requests cancelled (client gone)."),
            ("requests_rejected_total", "rejected", "Requests refused because the queue was full."),
            ("prompt_tokens_total", "prompt_tokens", "Prompt tokens of finished requests."),
            ("prompt_tokens_cached_total", "cached_tokens", "Prompt tokens reused from a KV cache."),
            ("generated_tokens_total", "generated_tokens", "Tokens generated."),
            ("decode_steps_total", "steps", "llama_decode calls."),
            ("shared_prefix_hits_total", "shared_prefix_hits", "Prompts that reused another slot's KV."),
            ("batch_tokens_total", "batch_tokens", "Tokens evaluated over all decode steps."),
            ("draft_tokens_total", "drafted", "Speculative drafts verified (--lookup, --draft)."),
            ("draft_tokens_accepted_total", "draft_accepted", "Speculative drafts kept."),
            ("context_shifts_total", "context_shifts", "Context shifts of generations at their context's end."),
            ("lora_switches_total", "lora_switches", "Decode steps that changed the LoRA scales (per-request lora)."))


def _engine_series(engine) -> list[tuple[str, str, str, float]]:
    """(name, type, help, value) of one engine's counters and gauges."""
    s = engine.stats
    cache = engine.prompt_cache
    return [*((name, "counter", text, s[key]) for name, key, text in COUNTERS),
            ("prompt_cache_hits_total", "counter", "Prompt cache entries restored.",
             cache.stats["hits"] if cache is not None else 0),
            ("queue_length", "gauge", "Requests waiting for a slot.", engine.queued),
            ("active_sequences", "gauge", "Requests being decoded.", engine.active),
            ("batch_size", "gauge", "Tokens in the last decode step.", s["last_batch"])]


def _label(model: str | None) -> str:
    if model is None:
        return ""
    escaped = model.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'{{model="{escaped}"}}'


def prometheus_text(m: Metrics, engines: dict, router=None) -> str:
    """The /metrics page: HTTP counters, each engine's counters and gauges (labelled by model where the key is a
    model's name: router mode), the router's own, and the time-to-first-token histogram."""
    lines = [
        "# HELP edgelm_http_requests_total HTTP requests by endpoint and status.",
        "# TYPE edgelm_http_requests_total counter",
    ]
    with m.lock:
        for (endpoint, status), n in sorted(m.http.items()):
            lines.append(f'edgelm_http_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
        buckets, total_sum = list(m.ttft), m.ttft_sum
    series = {model: _engine_series(engine) for model, engine in engines.items()}
    for i, (name, kind, text, _) in enumerate(next(iter(series.values()), [])):
        lines += [f"# HELP edgelm_{name} {text}", f"# TYPE edgelm_{name} {kind}"]
        lines += [f"edgelm_{name}{_label(model)} {values[i][3]}" for model, values in series.items()]
    if router is not None:
        lines += ["# HELP edgelm_models_loaded Models loaded now.", "# TYPE edgelm_models_loaded gauge",
                  f"edgelm_models_loaded {len(router.models)}",
                  "# HELP edgelm_model_loads_total Models loaded.", "# TYPE edgelm_model_loads_total counter",
                  f"edgelm_model_loads_total {router.loads}",
                  "# HELP edgelm_model_unloads_total Models unloaded (idle past their keep-alive, or to make room).",
                  "# TYPE edgelm_model_unloads_total counter", f"edgelm_model_unloads_total {router.unloads}"]
    lines += ["# HELP edgelm_time_to_first_token_seconds Time from request to first token.",
              "# TYPE edgelm_time_to_first_token_seconds histogram"]
    running = 0
    for bound, n in zip(TTFT_BUCKETS, buckets):
        running += n
        lines.append(f'edgelm_time_to_first_token_seconds_bucket{{le="{bound}"}} {running}')
    running += buckets[-1]
    lines += [f'edgelm_time_to_first_token_seconds_bucket{{le="+Inf"}} {running}',
              f"edgelm_time_to_first_token_seconds_sum {total_sum:.6f}",
              f"edgelm_time_to_first_token_seconds_count {running}"]
    return "\n".join(lines) + "\n"
