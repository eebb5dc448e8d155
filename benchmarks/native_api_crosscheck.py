"""llama-server's native API on edgelm vs llama-server itself, side by side on one GGUF: the same requests to
/completion, /infill and /apply-template on both servers, and what each answers compared field by field.

The model is the tiny reference model with six FIM tokens added (tests/conftest.py fim_checkpoint), converted by
edgelm to f32, so /infill's whole layout (repo and file-separator tokens, prefix and suffix cut to a batch of 64)
is in play. Both servers run greedy on one slot with the same context and batch; what must match: the prompt
each builds (tokens_evaluated, and its text), the generated tokens, content, stop_type and stopping_word.

    .venv/bin/python benchmarks/native_api_crosscheck.py      # needs llama-server: scripts/build_llama_tools.sh
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, DOCS, log, machine, markdown_table, python, today, tool, write_doc  # noqa: E402
from serve_bench import free_port, launched  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import fim_checkpoint, write_peft_adapter  # noqa: E402

CTX, BATCH = 256, 64
FIELDS = ("tokens_evaluated", "prompt", "tokens", "content", "stop_type", "stopping_word", "tokens_predicted")
PREFIX = "def total(values):\n" + "".join(f"    x{i} = values[{i}]\n" for i in range(12))
SUFFIX = "    return result\n" * 6
EXTRA = [{"filename": "util.py", "text": "def helper():\n    pass\n"}, {"text": "import os\n"}]
MIXED = [0, "def", " fib<|im_end|>", 13]  # its reply says "import" after a few lines
GREEDY = {"temperature": 0, "return_tokens": True, "n_predict": 24}

CASES = [  # (route, what, body)
    ("/infill", "prefix and suffix only", {"input_prefix": "def add(a, b):\n    ", "input_suffix": "\n"}),
    ("/infill", "long prefix and suffix (cut to the batch)", {"input_prefix": PREFIX, "input_suffix": SUFFIX}),
    ("/infill", "with input_extra files and a prompt", {"input_prefix": PREFIX, "input_suffix": SUFFIX,
                                                        "input_extra": EXTRA, "prompt": "    "}),
    ("/infill", "empty prefix and suffix, extra files only", {"input_prefix": "", "input_suffix": "",
                                                             "input_extra": EXTRA}),
    ("/infill", "many extra files, short prefix (their share: 194 tokens)",
     {"input_prefix": "x = ", "input_suffix": "\n", "input_extra": EXTRA * 12}),
    ("/infill", "n_predict 4 (the extra files' room)", {"input_prefix": PREFIX, "input_suffix": SUFFIX,
                                                        "input_extra": EXTRA * 20, "n_predict": 4}),
    ("/completion", "a text", {"prompt": "def fibonacci(n):"}),
    ("/completion", "token ids and texts mixed", {"prompt": MIXED}),
    ("/completion", "n_probs 3", {"prompt": "def fibonacci(n):", "n_probs": 3}),
    ("/completion", "a stop word", {"prompt": MIXED, "stop": ["import"], "ignore_eos": True}),
    ("/completion", "n_indent 8", {"prompt": "class A:\n    def f(self):\n        return 1\n\n    def g(self):\n"
                                             "        ", "n_indent": 8, "ignore_eos": True, "n_predict": 64}),
    ("/completion", "logit_bias banning a text's tokens", {"prompt": MIXED, "ignore_eos": True,
                                                           "logit_bias": [[" import", False]]}),
    ("/completion", "samplers [top_k, temperature], top_k 1", {"prompt": "import", "samplers": ["top_k", "temperature"],
                                                              "top_k": 1, "temperature": 0.7, "seed": 5}),
]
# on servers started with a LoRA adapter at scale 2 (llama-server's --lora-scaled), llama-server's per-request
# `lora` field against the adapter's scale (the four scales give four different replies)
LORA_SCALE = 2.0
LORA_CASES = [("/completion", "no lora: the server's scale 2", {"prompt": "def fibonacci(n):", "n_probs": 2}),
              ("/completion", "lora scale 8", {"prompt": "def fibonacci(n):", "lora": [{"id": 0, "scale": 8.0}],
                                               "n_probs": 2}),
              ("/completion", "lora [] after scale 8: the server's scale", {"prompt": "def fibonacci(n):", "lora": [],
                                                                           "n_probs": 2}),
              ("/completion", "lora scale 0", {"prompt": "def fibonacci(n):", "lora": [{"id": 0, "scale": 0}],
                                               "n_probs": 2}),
              ("/completion", "lora scale 8 again", {"prompt": "def fibonacci(n):", "lora": [{"id": 0, "scale": 8.0}],
                                                     "n_probs": 2}),
              ("/completion", "lora [] after scale 8, cache_prompt false",
               {"prompt": "def fibonacci(n):", "lora": [], "n_probs": 2, "cache_prompt": False}),
              ("/v1/completions", "lora scale 1 on the OpenAI route",
               {"prompt": "def fibonacci(n):", "lora": [{"id": 0, "scale": 1.0}], "max_tokens": 24})]
TEMPLATES = [[{"role": "user", "content": "hi"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
              {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]]


def fim_model() -> tuple[Path, Path]:
    """The FIM model's GGUF and a rank-4 LoRA adapter's (conftest.write_peft_adapter, converted against it)."""
    from edgelm.converters import convert
    from edgelm.converters.lora import convert_lora

    d = BENCH / "native"
    out, adapter = d / "fim.gguf", d / "fim-lora.gguf"
    if not (out.is_file() and adapter.is_file()):
        d.mkdir(parents=True, exist_ok=True)
        convert(fim_checkpoint(d / "ckpt"), out, outtype="f32")
        convert_lora(write_peft_adapter(d / "peft"), d / "ckpt", adapter, outtype="f32")
    return out, adapter


def answers(base: str, cases: list, templates: bool) -> list[dict]:
    def reply(route: str, body: dict) -> dict:
        openai = route == "/v1/completions"  # OpenAI's fields and shape: the fields compared, from it
        out = client.post(base + route, json={"temperature": 0, **body} if openai else {**GREEDY, **body}).json()
        if openai and "choices" in out:
            choice = out["choices"][0]
            return {"content": choice["text"], "tokens_evaluated": out["usage"]["prompt_tokens"],
                    "tokens_predicted": out["usage"]["completion_tokens"]}
        return out

    with httpx.Client(timeout=120) as client:
        out = [reply(route, body) for route, _, body in cases]
        if templates:
            out += [client.post(base + "/apply-template", json={"messages": m}).json() for m in TEMPLATES]
    return out


def measure(model: Path, adapter: Path) -> dict:
    servers = {
        "edgelm": [sys.executable, "-m", "edgelm", "serve", model, "--parallel", "1", "--ctx", CTX, "--batch", BATCH,
                   "--threads", "2"],
        "llama-server": [tool("llama-server"), "-m", model, "-np", "1", "-c", CTX, "-b", BATCH, "-ub", BATCH,
                         "-t", "2", "--jinja"],
    }
    lora = {"edgelm": ["--lora-scaled", adapter, LORA_SCALE],
            "llama-server": ["--lora-scaled", f"{adapter}:{LORA_SCALE}"]}
    replies = {}
    for name, argv in servers.items():
        for extra, cases in (([], CASES), (lora[name], LORA_CASES)):
            port = free_port()
            with launched(name, [*argv, *extra, "--host", "127.0.0.1", "--port", port], port, "/health",
                          BENCH / "native" / f"{name}.log"):
                log(f"{name}: {len(cases)} requests")
                replies.setdefault(name, []).extend(answers(f"http://127.0.0.1:{port}", cases, cases is CASES))
    return replies


def probabilities(reply: dict) -> list | None:
    """completion_probabilities' ids and logprobs (to 3 decimals: float32 sums on each side)."""
    probs = reply.get("completion_probabilities")
    return None if probs is None else [(p["id"], round(p["logprob"], 3), [(q["id"], round(q["logprob"], 3))
                                                                          for q in p["top_logprobs"]]) for p in probs]


def compare(replies: dict) -> list[list]:
    rows = []
    ours, theirs = replies["edgelm"], replies["llama-server"]
    n_cases = len(CASES) + len(TEMPLATES)
    ours, theirs = ours[:len(CASES)] + ours[n_cases:], theirs[:len(CASES)] + theirs[n_cases:]
    templates = replies["edgelm"][len(CASES):n_cases], replies["llama-server"][len(CASES):n_cases]
    for (route, what, _), a, b in zip(CASES + LORA_CASES, ours, theirs):
        differ = [f for f in FIELDS if a.get(f) != b.get(f)]
        if probabilities(a) != probabilities(b):
            differ.append("completion_probabilities")
        verdict = "all equal" if not differ else "differ: " + ", ".join(differ)
        if "error" in b:
            verdict = f"llama-server: {b['error'].get('code')} \"{b['error'].get('message')}\""
        rows.append([f"`{route}`", what, a.get("tokens_evaluated"), a.get("tokens_predicted"), a.get("stop_type"),
                     verdict])
    for messages, a, b in zip(TEMPLATES, *templates):
        rows.append(["`/apply-template`", f"{len(messages)} messages", "", "", "",
                     "all equal" if a == b else f"differ: {a} vs {b}"])
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DOCS / "llama-native.md")
    args = p.parse_args(argv)
    model, adapter = fim_model()
    replies = measure(model, adapter)
    (BENCH / "native" / "replies.json").write_text(json.dumps(replies, indent=1))
    rows = compare(replies)
    equal = sum(r[-1] == "all equal" for r in rows)
    log(f"{equal} of {len(rows)} requests answered alike")
    text = f"""# llama-server's native API: edgelm vs llama-server

`edgelm serve` answers llama-server's own routes (`/completion`, `/completions`, `/infill`, `/embedding`,
`/embeddings`, `/apply-template`, beside `/tokenize`, `/detokenize`, `/props`) in llama-server's shapes, so
editors and scripts written for llama-server run unchanged: llama.vim and llama.vscode post to `/infill` with
`input_extra` files, `samplers: ["top_k", "top_p", "infill"]`, `n_indent` and `t_max_predict_ms`.

Measured {today()} by `benchmarks/native_api_crosscheck.py`: the same greedy requests to both servers on one GGUF
(the tiny reference model with Qwen2.5-Coder's six FIM tokens added, f32; one slot, context {CTX}, batch {BATCH},
so /infill cuts the prefix to its last 48 tokens and the suffix to its first 16 less the prompt's); the `lora` rows
on both servers restarted with a rank-4 LoRA adapter at scale {LORA_SCALE:g} (`--lora-scaled`), whose four scales
give four different replies. Compared:
{", ".join(f"`{f}`" for f in FIELDS)} (where the reply has them), and `completion_probabilities` (ids,
log-probabilities to 3 decimals); for `/apply-template`, the whole reply.
{machine()}; {python()}.

**{equal} of {len(rows)} requests answered alike.**

{markdown_table(["route", "request", "prompt tokens", "tokens", "stop_type", "edgelm vs llama-server"], rows)}

Where llama-server's /infill gives the extra files `n_ctx - n_batch - 2 * n_predict` tokens (its server's
`n_predict`, -1 by default, not the request's) whatever the FIM part takes, so that many extra files send the
prompt past the context and the request gets a 400, edgelm takes that share too but never more than leaves the
FIM part and the request's `n_predict` tokens room in the context: the "n_predict 4" row.

An empty `lora` list means the server's scales, in llama-server as in edgelm. But llama-server, given one after a
request at other scales, keeps the prompt's KV computed under those (it clears a slot's cache on a LoRA change
only when the request lists adapters): its "lora [] after scale 8" reply is not its own reply at the server's
scale (the first `lora` row), and with `cache_prompt: false` it is. edgelm reuses only KV computed under the
request's scales, so its reply is the server-scale reply either way.

What edgelm does not take: `post_sampling_probs`, `return_progress`, `min_keep` above 1 (each a 400 that names the
field). `cache_prompt`, `t_max_prompt_ms`, `n_cache_reuse` and `id_slot` are accepted: edgelm reuses a shared
prefix's KV exactly whatever they say, and picks the slot itself.
"""
    write_doc(args.out, text)
    return 0 if equal >= len(rows) - 2 else 1  # the two differences the report explains


if __name__ == "__main__":
    sys.exit(main())
