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


def prometheus_text(m: Metrics, engine) -> str:
    """The /metrics page: HTTP counters, the engine's counters and gauges, the time-to-first-token histogram."""
    s = engine.stats
    lines = [
        "# HELP edgelm_http_requests_total HTTP requests by endpoint and status.",
        "# TYPE edgelm_http_requests_total counter",
    ]
    with m.lock:
        for (endpoint, status), n in sorted(m.http.items()):
            lines.append(f'edgelm_http_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
        buckets, total_sum = list(m.ttft), m.ttft_sum
    counters = (("requests_total", "requests", "Generation requests accepted by the engine."),
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
                ("draft_tokens_accepted_total", "draft_accepted", "Speculative drafts kept."))
    for name, key, text in counters:
        lines += [f"# HELP edgelm_{name} {text}", f"# TYPE edgelm_{name} counter", f"edgelm_{name} {s[key]}"]
    cache = engine.prompt_cache
    hits = cache.stats["hits"] if cache is not None else 0
    lines += ["# HELP edgelm_prompt_cache_hits_total Prompt cache entries restored.",
              "# TYPE edgelm_prompt_cache_hits_total counter", f"edgelm_prompt_cache_hits_total {hits}",
              "# HELP edgelm_queue_length Requests waiting for a slot.", "# TYPE edgelm_queue_length gauge",
              f"edgelm_queue_length {engine.queued}",
              "# HELP edgelm_active_sequences Requests being decoded.", "# TYPE edgelm_active_sequences gauge",
              f"edgelm_active_sequences {engine.active}",
              "# HELP edgelm_batch_size Tokens in the last decode step.", "# TYPE edgelm_batch_size gauge",
              f"edgelm_batch_size {s['last_batch']}",
              "# HELP edgelm_time_to_first_token_seconds Time from request to first token.",
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
