"""`edgelm batch PROMPTS.jsonl -o OUT.jsonl`: complete many prompts with continuous batching, resumably.

Each input line is a JSON string (a prompt) or an object with "prompt" or "messages" (chat), an
optional "id", and optional sampling fields ("max_tokens", "temperature", ...) that override the
flags. Each output line is {"index", "id", "text", "finish_reason", "prompt_tokens",
"completion_tokens"} (and "logprobs" where asked), written as soon as that completion is done. Run the same command again after
an interruption and it skips what OUT.jsonl already holds (a torn last line is dropped).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from edgelm.errors import ChatTemplateError, ContextOverflowError, UsageError

from .run import (add_lora_arguments, add_sampling_arguments, add_speculative_arguments, add_template_arguments,
                  lora_from_args, sampling_from_args, speculative_from_args, template_from_args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgelm batch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", help="JSONL file of prompts")
    p.add_argument("-o", "--output", required=True, help="JSONL file of completions (appended to, resumable)")
    p.add_argument("-m", "--model", help="GGUF file, hf:// reference or a name from `edgelm create` "
                                         "(default: the bundled model)")
    p.add_argument("--parallel", type=int, default=4, help="prompts decoded together (default 4)")
    p.add_argument("--ctx", type=int, help="context of each prompt in tokens (default 2048, or a named model's "
                                             "num_ctx)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_lora_arguments(p)
    add_template_arguments(p)
    add_speculative_arguments(p, early_exit=False)
    p.add_argument("--no-mem-check", action="store_true",
                   help="run even when the model and its contexts look larger than the memory available")
    add_sampling_arguments(p)
    return p


def read_prompts(path: str) -> list[dict]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read ({e.strerror if isinstance(e, OSError) else e})") from None
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as e:
            raise UsageError(f"{path}:{number}: not JSON ({e.msg})") from None
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, dict) or ("prompt" in item) == ("messages" in item):
            raise UsageError(f"{path}:{number}: expected a string, or an object with \"prompt\" or \"messages\"")
        item["_line"] = number
        items.append(item)
    if not items:
        raise UsageError(f"{path}: no prompts")
    return items


def done_indices(path: Path) -> set[int]:
    """Indices already completed in OUT; a torn last line (a killed run) is cut off."""
    if not path.exists():
        return set()
    raw = path.read_bytes()
    keep = raw.rfind(b"\n") + 1
    if keep < len(raw):
        with open(path, "r+b") as f:
            f.truncate(keep)
    done = set()
    for line in raw[:keep].decode("utf-8", errors="replace").splitlines():
        try:
            done.add(int(json.loads(line)["index"]))
        except (ValueError, KeyError, TypeError):
            raise UsageError(f"{path}: not an edgelm batch output (a line without an index)") from None
    return done


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from edgelm.runtime.sampling import SamplingParams

    from edgelm.modelfile import find

    # a name made by `edgelm create`: its model, adapters, template, defaults and preamble, under the flags
    profile = find(args.model)
    args.ctx = args.ctx or (profile.load.get("n_ctx") if profile else None) or 2048
    base = {**(profile.sampling if profile else {}), **sampling_from_args(args)}
    SamplingParams.from_kwargs(**base)
    items = read_prompts(args.prompts)
    out_path = Path(args.output)
    done = done_indices(out_path)
    todo = [i for i in range(len(items)) if i not in done]
    if not todo:
        print(f"edgelm: all {len(items)} prompts are already in {out_path}", file=sys.stderr)
        return 0
    from edgelm.api import prompt_tokens
    from edgelm.engine import POLL_S, Engine, EngineOptions
    from edgelm.runtime.chat import chat_tokens, template_for
    from edgelm.runtime.model import LlamaModel, LoadOptions

    # the weights and vocabulary only: the engine makes the one context (and KV cache) that decodes
    lora = lora_from_args(args) or (list(profile.adapters) if profile else None)
    from edgelm.runtime.model import resolve_model

    model = resolve_model(profile.model if profile else args.model)  # once: hf:// asks the Hub here
    spec = speculative_from_args(args)  # lookup, draft_max, draft_threshold: EngineOptions' own names
    draft = spec.pop("draft", None)
    if not args.no_mem_check:
        from edgelm.runtime.memory import ensure_fits

        ensure_fits(model, n_ctx=args.ctx * args.parallel, draft=draft)
    with contextlib.ExitStack() as stack:
        llama = stack.enter_context(LlamaModel(model, LoadOptions(), lora=lora))
        draft_model = stack.enter_context(LlamaModel(resolve_model(draft), LoadOptions())) if draft else None
        template = template_for(llama, template_from_args(args) or (profile.template if profile else None))
        preamble = profile.preamble if profile else (lambda messages: messages)
        requests = []
        for i in todo:  # everything is checked before anything runs
            item = items[i]
            overrides = {k: v for k, v in item.items() if k not in ("prompt", "messages", "id", "_line")}
            try:
                params = SamplingParams.from_kwargs(**{**base, **overrides})
                tokens = (chat_tokens(llama, preamble(item["messages"]), template) if "messages" in item
                          else item["prompt"])
                tokens = prompt_tokens(llama, tokens, args.ctx, params.max_tokens)
            except (UsageError, ContextOverflowError, ChatTemplateError) as e:
                raise type(e)(f"{args.prompts}:{item['_line']}: {e}") from None
            requests.append((i, tokens, params))
        cap = max(p.max_tokens for _, _, p in requests)
        options = EngineOptions(n_parallel=args.parallel, n_ctx=args.ctx, n_threads=args.threads,
                                max_queue=len(requests), max_tokens_cap=max(cap, 1), **spec)
        with Engine(llama, options, draft_model=draft_model) as engine, open(out_path, "a", encoding="utf-8") as out:
            running = dict(zip(engine.submit_many([(t, p) for _, t, p in requests]), (i for i, _, _ in requests)))
            bar = _progress(len(items), len(done), args.no_progress)
            while running:
                time.sleep(POLL_S)  # look now and then: a thread woken per token would slow llama.cpp down
                for req in [r for r in running if r.finished]:
                    req.drain()
                    i = running.pop(req)
                    result = req.completion()
                    record = {"index": i, "id": items[i].get("id"), "text": result.text,
                              "finish_reason": result.finish_reason, "prompt_tokens": result.timings.prompt_tokens,
                              "completion_tokens": result.timings.completion_tokens}
                    if result.logprobs is not None:
                        record["logprobs"] = [{"token": lp.token, "logprob": lp.logprob, "top": lp.top}
                                              for lp in result.logprobs]
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    out.flush()
                    os.fsync(out.fileno())
                    bar.update(1)
            bar.close()
    return 0


def _progress(total: int, done: int, disabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="prompt", disable=disabled or None, file=sys.stderr)
