"""Soak test of `edgelm serve`: 2,000 mixed requests from 32 client threads, with clients that leave early.

    .venv/bin/python benchmarks/soak.py                  # writes docs/soak.md; exits 1 if a goal fails
    .venv/bin/python benchmarks/soak.py --requests 300   # a shorter soak

The small model is served with --parallel 8, --ctx 512 and 2 threads. Requests are a random mix (fixed seed)
of /v1/completions and /v1/chat/completions, streaming or not. Each one biases one randomly chosen "marker"
token (a plain ASCII word) by +100 and asks for 4 greedy tokens, so its text must be exactly the marker four
times: a response that is lost, cut short or cross-wired with another request's shows, whatever the model
would say on its own. 15% of the streaming requests close the connection after 1-3 events; they ask for 200
tokens, so that they are still generating when the client leaves and the server has something to cancel.
Half of the requests start with one shared 800-character text (a system prompt), so that requests arriving
together wait for one another's prefill and copy its KV, and some of them leave while they wait.

Goals: no HTTP 5xx; every request that stays connected gets exactly its own marker text; the server's RSS
after the soak within 10% of its RSS after a 100-request warm-up. Also checked: the engine is idle afterwards
(no sequence or queued request left behind).
"""
from __future__ import annotations

import argparse
import json
import queue
import random
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DOCS, log, machine, markdown_table, today  # noqa: E402
from serve_bench import CTX, THREADS, log_path, serving  # noqa: E402

PARALLEL = 8
MARKER_TOKENS = 4
DISCONNECT_TOKENS = 200
DISCONNECT_SHARE = 0.15  # of streaming requests
RSS_GROWTH_GOAL = 0.10


@dataclass(frozen=True)
class Spec:
    index: int
    chat: bool
    stream: bool
    close_after: int  # events read before the client closes the connection; 0: reads to the end
    marker: int  # token id biased by +100
    prompt: str


@dataclass
class Outcome:
    spec: Spec
    result: str  # ok, wrong, disconnected, http <status>, transport error
    seconds: float
    detail: str = ""


SHARED_SHARE = 0.5  # requests whose prompt starts with SHARED


def _shared_prefix() -> str:
    from edgelm import corpus

    return corpus.text("heldout", max_chars=800) + "\n"


SHARED = _shared_prefix()


def markers(path: Path) -> dict[int, str]:
    """Token id -> text for tokens that are one plain lower-case ASCII word after a space."""
    from edgelm.runtime.model import LlamaModel, LoadOptions

    with LlamaModel(path, LoadOptions(vocab_only=True)) as vocab:
        return {t: vocab.token_bytes(t).decode() for t in range(vocab.n_vocab)
                if not vocab.is_eog(t) and re.fullmatch(rb" [a-z]{3,10}", vocab.token_bytes(t))}


def specs(n: int, start: int, words: dict[int, str], rng: random.Random) -> list[Spec]:
    ids = sorted(words)
    out = []
    for i in range(start, start + n):
        stream = rng.random() < 0.5
        close_after = rng.randint(1, 3) if stream and rng.random() < DISCONNECT_SHARE else 0
        prompt = f"Request {i}:" + "".join(words[t] for t in rng.sample(ids, 6))
        if rng.random() < SHARED_SHARE:
            prompt = SHARED + prompt
        out.append(Spec(i, rng.random() < 0.5, stream, close_after, rng.choice(ids), prompt))
    return out


def body(spec: Spec) -> dict:
    b = {"max_tokens": DISCONNECT_TOKENS if spec.close_after else MARKER_TOKENS, "temperature": 0,
         "logit_bias": {str(spec.marker): 100}, "stream": spec.stream}
    if spec.chat:
        b["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        b["prompt"] = spec.prompt
    return b


def send(client: httpx.Client, base: str, spec: Spec, expected: str) -> Outcome:
    url = base + ("/v1/chat/completions" if spec.chat else "/v1/completions")
    t0 = time.perf_counter()
    try:
        if spec.stream:
            result, detail = read_stream(client, url, spec, expected)
        else:
            r = client.post(url, json=body(spec))
            result, detail = f"http {r.status_code}", r.text[:200]
            if r.status_code == 200:
                choice = r.json()["choices"][0]
                text = choice["message"]["content"] if spec.chat else choice["text"]
                result, detail = verdict(text, choice["finish_reason"], True, expected)
    except httpx.HTTPError as e:
        result, detail = "transport error", repr(e)
    return Outcome(spec, result, time.perf_counter() - t0, detail)


def read_stream(client: httpx.Client, url: str, spec: Spec, expected: str) -> tuple[str, str]:
    parts, finish, done, events = [], None, False, 0
    with client.stream("POST", url, json=body(spec)) as r:
        if r.status_code != 200:
            return f"http {r.status_code}", r.read().decode(errors="replace")[:200]
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            events += 1
            choice = json.loads(line[6:])["choices"][0]
            parts.append((choice["delta"].get("content") or "") if spec.chat else choice["text"])
            finish = choice["finish_reason"] or finish
            if events == spec.close_after:
                return "disconnected", ""  # leaving the block unread closes the connection
    return verdict("".join(parts), finish, done, expected)


def verdict(text: str, finish: str | None, done: bool, expected: str) -> tuple[str, str]:
    if text == expected and finish == "length" and done:
        return "ok", ""
    return "wrong", f"text {text!r}, finish_reason {finish}, [DONE] {'seen' if done else 'missing'}"


def drive(base: str, work: list[Spec], words: dict[int, str], clients: int) -> list[Outcome]:
    """Send `work` from `clients` threads, each with its own keep-alive connection."""
    todo: queue.Queue = queue.Queue()
    for spec in work:
        todo.put(spec)
    outcomes, lock = [], threading.Lock()

    def client_thread() -> None:
        with httpx.Client(timeout=120) as client:
            while True:
                try:
                    spec = todo.get_nowait()
                except queue.Empty:
                    return
                outcome = send(client, base, spec, words[spec.marker] * MARKER_TOKENS)
                with lock:
                    outcomes.append(outcome)

    threads = [threading.Thread(target=client_thread) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def metrics(base: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def idle_metrics(base: str, timeout: float = 10) -> dict[str, float]:
    """/metrics once no sequence is running or queued (or after `timeout` seconds)."""
    deadline = time.time() + timeout
    while True:
        m = metrics(base)
        if (m["edgelm_active_sequences"] == 0 and m["edgelm_queue_length"] == 0) or time.time() > deadline:
            return m
        time.sleep(0.2)


def soak(n_requests: int, n_warmup: int, clients: int, seed: int) -> dict:
    import psutil

    from edgelm.runtime.model import default_model_path

    path = default_model_path()
    words = markers(path)
    rng = random.Random(seed)
    with serving("edgelm", path, PARALLEL, "soak") as (base, proc):
        server = psutil.Process(proc.pid)
        drive(base, specs(n_warmup, 0, words, rng), words, clients)
        before = idle_metrics(base)
        rss_warm = server.memory_info().rss
        log(f"warm-up done, RSS {rss_warm / 2**20:.1f} MiB; soak of {n_requests} requests")
        t0 = time.perf_counter()
        outcomes = drive(base, specs(n_requests, n_warmup, words, rng), words, clients)
        wall = time.perf_counter() - t0
        after = idle_metrics(base)
        rss_after = server.memory_info().rss
    server_log = log_path("edgelm", path, PARALLEL, "soak").read_text()
    return {"outcomes": outcomes, "wall": wall, "rss_warm": rss_warm, "rss_after": rss_after, "before": before,
            "after": after, "tracebacks": server_log.count("Traceback"), "n_markers": len(words)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DOCS / "soak.md")
    args = p.parse_args(argv)
    result = soak(args.requests, args.warmup, args.clients, args.seed)
    failed = write_report(result, args)
    return 1 if failed else 0


def write_report(r: dict, args) -> bool:
    """Write the report; True if a goal failed."""
    outcomes = r["outcomes"]
    kinds = {}
    for o in outcomes:
        kind = ("chat" if o.spec.chat else "completions") + (", streaming" if o.spec.stream else "")
        kinds.setdefault(kind, []).append(o)
    results = ("ok", "disconnected", "wrong")
    rows = []
    for kind, group in sorted(kinds.items()):
        counts = [sum(o.result == res for o in group) for res in results]
        rows.append([kind, len(group), *counts, len(group) - sum(counts)])
    total = [sum(row[i] for row in rows) for i in range(1, 6)]
    rows.append(["**all**", *(f"**{n}**" for n in total)])
    table = markdown_table(["request", "sent", "ok", "disconnected by the client", "wrong or missing text",
                            "HTTP error or transport error"], rows)

    server_5xx = [o for o in outcomes if o.result.startswith("http 5")]
    lost = [o for o in outcomes if o.result not in ("ok", "disconnected")]
    disconnects = sum(o.result == "disconnected" for o in outcomes)
    before, after = r["before"], r["after"]

    def delta(name: str) -> int:
        return int(after[name] - before[name])

    metric_5xx = sum(v - before.get(k, 0) for k, v in after.items()
                     if k.startswith("edgelm_http_requests_total") and 'status="5' in k)
    growth = r["rss_after"] / r["rss_warm"] - 1
    idle = after["edgelm_active_sequences"] == 0 and after["edgelm_queue_length"] == 0
    latencies = sorted(o.seconds for o in outcomes if o.result == "ok")
    goals = [("no HTTP 5xx", not server_5xx and metric_5xx == 0,
              f"{len(server_5xx)} seen by the clients, {metric_5xx:g} in the server's metrics"),
             ("every connected request gets exactly its own marker text", not lost,
              f"{len(lost)} of {len(outcomes) - disconnects} wrong, missing or failed"),
             (f"RSS after the soak within {RSS_GROWTH_GOAL:.0%} of after the warm-up", growth <= RSS_GROWTH_GOAL,
              f"{r['rss_warm'] / 2**20:.1f} MiB → {r['rss_after'] / 2**20:.1f} MiB ({growth:+.1%})"),
             ("the engine is idle afterwards (check)", idle,
              f"{after['edgelm_active_sequences']:g} active, {after['edgelm_queue_length']:g} queued")]
    examples = "".join(f"\n- request {o.spec.index} ({'chat' if o.spec.chat else 'completions'}"
                       f"{', streaming' if o.spec.stream else ''}): {o.result}: {o.detail}" for o in lost[:5])
    args.out.write_text(
        "# Soak test of `edgelm serve`\n\n"
        f"Generated by `benchmarks/soak.py` on {today()}, {machine()}. The small model served with "
        f"`--parallel {PARALLEL} --ctx {CTX} --threads {THREADS}`; {args.requests:,} requests (after {args.warmup} "
        f"warm-up requests of the same mix) from {args.clients} client threads, seed {args.seed}.\n\n"
        "Each request biases one marker token, drawn from the "
        f"{r['n_markers']:,} tokens that are a plain lower-case word, by +100 and asks for {MARKER_TOKENS} greedy "
        f"tokens, so its text must be the marker {MARKER_TOKENS} times, with finish_reason `length` (and `[DONE]` "
        f"when streaming). {DISCONNECT_SHARE:.0%} of streaming requests ask for {DISCONNECT_TOKENS} tokens instead "
        "and close the connection after 1-3 events, while the server is still generating for them.\n\n"
        f"{table}\n\n"
        f"Soak wall time {r['wall']:.1f} s ({len(outcomes) / r['wall']:.1f} requests/s); latency of the "
        f"requests answered in full: median {latencies[len(latencies) // 2] * 1000:.0f} ms, 99th percentile "
        f"{latencies[int(len(latencies) * 0.99)] * 1000:.0f} ms.\n\n"
        "Server metrics over the soak: "
        f"{delta('edgelm_requests_total')} requests accepted, {delta('edgelm_requests_completed_total')} completed, "
        f"{delta('edgelm_requests_cancelled_total')} cancelled for {disconnects} client disconnects "
        f"(a disconnect counts as cancelled when the request was still generating), "
        f"{delta('edgelm_requests_rejected_total')} rejected; tracebacks in the server's log: {r['tracebacks']}.\n\n"
        "## Goals\n\n"
        + "\n".join(f"- {name}: **{'met' if ok else 'NOT MET'}** ({detail})" for name, ok, detail in goals)
        + (f"\n\nFirst wrong or missing responses:{examples}" if lost else "") + "\n"
    )
    print(args.out.read_text())
    return not all(ok for _, ok, _ in goals)


if __name__ == "__main__":
    sys.exit(main())
