"""`edgelm run [MODEL] [-p PROMPT]`: one-shot generation streamed to stdout, or an interactive chat."""
from __future__ import annotations

import argparse
import json
import resource
import sys
from typing import TextIO

from edgelm.errors import UsageError
from edgelm.repl import ReplyPrinter


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def stats_line(t) -> str:
    return (
        f"prompt {t.prompt_tokens} tok, {t.prompt_tps:.1f} tok/s | "
        f"generation {t.completion_tokens} tok, {t.gen_tps:.1f} tok/s | "
        f"ttft {t.ttft_s * 1000:.1f} ms | peak RSS {peak_rss_mb():.0f} MB"
    ) + (f" | drafts accepted {s.accepted}/{s.drafted}, {s.mean_accepted:.2f} tok/round"
         if (s := t.speculative) is not None else "")


def record(text: str, last) -> dict:
    """The --json object for one completion."""
    t = last.timings
    return {
        "text": text,
        "prompt_tokens": t.prompt_tokens,
        "cached_tokens": t.cached_tokens,
        "completion_tokens": t.completion_tokens,
        "prompt_tps": round(t.prompt_tps, 2),
        "gen_tps": round(t.gen_tps, 2),
        "ttft_ms": round(t.ttft_s * 1000, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "finish_reason": last.finish_reason,
        **({"drafted": s.drafted, "accepted": s.accepted, "rounds": s.rounds}
           if (s := t.speculative) is not None else {}),
    }


def run(model, prompt: str, *, chat: bool = False, system: str | None = None, out: TextIO | None = sys.stdout,
        **sampling):
    """Generate from `prompt` with a loaded model, streaming text to `out`; returns (text, last chunk, the
    reply's thinking or None).

    `chat` (implied by `system`) wraps the prompt in the model's chat template as a user message.
    """
    if chat or system:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        chunks = model.chat_stream(messages, **sampling)
    else:
        chunks = model.stream(prompt, **sampling)
    parts, thoughts, last = [], [], None

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    printer = ReplyPrinter(write, dim=out.isatty()) if out is not None else None
    for last in chunks:
        parts.append(last.text)
        thoughts.append(last.reasoning or "")
        if printer is not None:
            printer(last)
    if printer is not None:
        printer.end_thinking()  # a reply cut off while thinking
    return "".join(parts), last, "".join(thoughts).strip() or None


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--max-tokens", type=int, default=None, help="tokens to generate (default 256)")
    g.add_argument("--temp", type=float, help="temperature; 0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--min-p", type=float)
    g.add_argument("--typical-p", type=float)
    g.add_argument("--repeat-penalty", type=float, help="1 = off")
    g.add_argument("--presence-penalty", type=float, help="0 = off")
    g.add_argument("--frequency-penalty", type=float, help="0 = off")
    g.add_argument("--repeat-last-n", type=int, help="tokens the penalties look back over (-1: whole context)")
    g.add_argument("--mirostat", type=int, choices=(0, 1, 2), help="Mirostat 1.0 or 2.0 (0 = off)")
    g.add_argument("--mirostat-ent", type=float, metavar="TAU", help="Mirostat's target surprise (default 5.0)")
    g.add_argument("--mirostat-lr", type=float, metavar="ETA", help="Mirostat's learning rate (default 0.1)")
    g.add_argument("--xtc-probability", type=float, help="XTC: chance a step drops the most likely tokens (0 = off)")
    g.add_argument("--xtc-threshold", type=float, help="XTC: tokens above this probability may go (default 0.1)")
    g.add_argument("--dry-multiplier", type=float, help="DRY: penalty for extending a repeat (0 = off)")
    g.add_argument("--dry-base", type=float, help="DRY: base of the penalty's growth (default 1.75)")
    g.add_argument("--dry-allowed-length", type=int, help="DRY: repeats this long go free (default 2)")
    g.add_argument("--dry-penalty-last-n", type=int, help="DRY: tokens to look back over (-1: whole context)")
    g.add_argument("--dry-sequence-breaker", action="append", metavar="STR",
                   help="DRY: a repeat never runs across STR (repeatable; replaces \\n : \" *; 'none': no breakers)")
    g.add_argument("--top-nsigma", type=float, help="keep tokens within N standard deviations of the top logit")
    g.add_argument("--dynatemp-range", type=float, help="dynamic temperature: temp +- this, by entropy (0 = off)")
    g.add_argument("--dynatemp-exp", type=float, help="dynamic temperature's exponent (default 1.0)")
    g.add_argument("--samplers", metavar="LIST",
                   help="the samplers to run, in order, ';'-separated (llama.cpp's names: penalties;dry;top_n_sigma;"
                        "top_k;typ_p;top_p;min_p;xtc;temperature, and infill); those left out are off")
    g.add_argument("--grammar", metavar="GBNF", help="constrain output to a GBNF grammar given as text")
    g.add_argument("--grammar-file", metavar="FILE", help="the same, read from a file")
    g.add_argument("-j", "--json-schema", metavar="SCHEMA",
                   help="constrain output to a JSON schema (JSON text or @FILE)")
    g.add_argument("--json-schema-file", metavar="FILE", help="the same, read from a file")
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-text (benchmarks)")


FLASH_ATTN = {"on": True, "off": False, "auto": None}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgelm run", description=__doc__)
    p.add_argument("model", nargs="?", help="GGUF file or hf://owner/repo/file.gguf (default: the bundled model)")
    p.add_argument("-p", "--prompt", help="one-shot prompt (without it: chat, or the prompt read from piped stdin)")
    p.add_argument("-i", "--interactive", action="store_true", help="chat even when stdin is not a terminal")
    p.add_argument("--chat", action="store_true", help="apply the chat template to -p (implied by --system)")
    p.add_argument("--system", help="system message for chat")
    add_sampling_arguments(p)
    m = p.add_argument_group("model")
    m.add_argument("--ctx", type=int, help="context size in tokens (default 2048, or a named model's num_ctx)")
    m.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    m.add_argument("--gpu-layers", type=int, default=0, help="layers to offload to a GPU backend")
    add_lora_arguments(m)
    add_control_arguments(m)
    add_template_arguments(m)
    add_context_arguments(m)
    m.add_argument("--truncate", choices=("error", "left"), default="error",
                   help="a prompt longer than the context: fail, or keep its end")
    add_shift_arguments(m)
    c = p.add_argument_group("caching")
    c.add_argument("--prompt-cache", metavar="DIR",
                   help="keep prompt KV states in DIR, reused by later runs that share a prefix")
    c.add_argument("--prompt-cache-size", metavar="SIZE", type=parse_size, default=None,
                   help="disk budget of --prompt-cache, e.g. 512M or 2G (default 1G); oldest entries go first")
    add_speculative_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object with text and timings")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's log")
    return p


def add_shift_arguments(p) -> None:
    """llama.cpp's --context-shift / --keep."""
    p.add_argument("--context-shift", action="store_true",
                   help="at the context's end, drop the older half of the text after --keep and generate on")
    p.add_argument("--keep", type=int, default=0, metavar="N",
                   help="prompt tokens a context shift keeps (-1: the whole prompt; default 0, BOS stays)")


def add_context_arguments(p) -> None:
    """llama.cpp's -fa / -ctk / -ctv / --no-warmup."""
    p.add_argument("-fa", "--flash-attn", choices=tuple(FLASH_ATTN), default="auto",
                   help="flash attention (default auto: llama.cpp's choice). Off lets a prompt-cache hit reuse all "
                        "but 8 positions exactly instead of all but 64")
    p.add_argument("-ctk", "--cache-type-k", default="f16", help="KV cache type of keys: f16 (default), f32, bf16, "
                                                                  "q8_0, q5_1, q5_0, q4_1 or q4_0")
    p.add_argument("-ctv", "--cache-type-v", default="f16", help="KV cache type of values (the same types)")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the throw-away decode at load that lets the first request run at full speed")
    p.add_argument("--no-mem-check", action="store_true",
                   help="load even when the model and context look larger than the memory available")


def context_from_args(args) -> dict:
    return {"flash_attn": FLASH_ATTN[args.flash_attn], "type_k": args.cache_type_k, "type_v": args.cache_type_v,
            "warmup": not args.no_warmup, "memory_check": not args.no_mem_check}


def add_template_arguments(p) -> None:
    """llama.cpp's --chat-template NAME|JINJA and --chat-template-file FILE."""
    p.add_argument("--chat-template", metavar="NAME|JINJA",
                   help="chat template instead of the model's own: chatml, completion, one of llama.cpp's built-in "
                        "names (llama3, gemma, phi3, mistral-v7, ...; a wrong name lists them), or Jinja source")
    p.add_argument("--chat-template-file", metavar="FILE", help="the same, read from a Jinja file")


def template_from_args(args) -> str | None:
    return _text_or_file(args.chat_template, args.chat_template_file, "--chat-template", "chat template")


def add_lora_arguments(p) -> None:
    """llama.cpp's --lora FILE and --lora-scaled FILE SCALE."""
    p.add_argument("--lora", metavar="FILE", action="append", default=[],
                   help="apply a LoRA adapter GGUF (repeatable; `edgelm convert ADAPTER_DIR --base BASE_DIR` "
                        "writes one from a PEFT adapter)")
    p.add_argument("--lora-scaled", metavar=("FILE", "SCALE"), nargs=2, action="append", default=[],
                   help="apply a LoRA adapter with a user-defined scale (repeatable)")


def add_control_arguments(p) -> None:
    """llama.cpp's --control-vector FILE, --control-vector-scaled FILE SCALE, --control-vector-layer-range A B."""
    p.add_argument("--control-vector", metavar="FILE", action="append", default=[],
                   help="add a control vector to the layers' outputs (repeatable; `edgelm cvector` makes one)")
    p.add_argument("--control-vector-scaled", metavar=("FILE", "SCALE"), nargs=2, action="append", default=[],
                   help="the same with a scale (repeatable; vectors add up)")
    p.add_argument("--control-vector-layer-range", metavar=("START", "END"), nargs=2, type=int,
                   help="steer layers START..END only (default: all but the first)")


def control_from_args(args) -> dict:
    """The control vectors as load() options ({} when none)."""
    pairs = [(path, 1.0) for path in args.control_vector] + [
        (path, _number(scale, f"--control-vector-scaled {path} {scale}")) for path, scale in args.control_vector_scaled]
    if not pairs:
        if args.control_vector_layer_range:
            raise UsageError("--control-vector-layer-range needs a control vector")
        return {}
    return {"control": pairs, "control_range": tuple(args.control_vector_layer_range or ()) or None}


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"{what}: the scale must be a number") from None


def lora_from_args(args) -> list | None:
    """--lora and --lora-scaled as the API's lora= list (None: no adapters)."""
    pairs = [(path, 1.0) for path in args.lora]
    pairs += [(path, _number(scale, f"--lora-scaled {path} {scale}")) for path, scale in args.lora_scaled]
    return pairs or None


def add_speculative_arguments(p: argparse.ArgumentParser, early_exit: bool = True) -> None:
    s = p.add_argument_group("speculative decoding (greedy output stays the full model's, but at near ties)")
    if early_exit:
        s.add_argument("--early-exit", nargs="?", const=True, type=int, metavar="K",
                       help="draft with the model's own first K layers (the split beside the model; "
                            "write one with `edgelm exits MODEL --write auto`)")
    s.add_argument("--draft", metavar="MODEL", help="draft with a smaller model sharing the vocabulary")
    s.add_argument("--lookup", action="store_true", help="draft from n-grams of the prompt and the output")
    s.add_argument("--draft-max", type=int, default=None, help="drafts per round, at most (default 8)")
    s.add_argument("--draft-threshold", type=float, default=None,
                   help="draft while the drafter's top probability is at least this (default 0.6)")


def speculative_from_args(args) -> dict:
    pairs = {"early_exit": getattr(args, "early_exit", None), "draft": args.draft, "lookup": args.lookup or None,
             "draft_max": args.draft_max, "draft_threshold": args.draft_threshold}
    return {k: v for k, v in pairs.items() if v is not None}


def parse_size(text: str) -> int:
    """'1G', '512M', '64k' or a plain byte count."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in units else ""
    try:
        value = float(t[:len(t) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 512M or 2G)") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(value * units[unit])


def _read(path: str, what: str) -> str:
    from pathlib import Path

    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read the {what}: {e.strerror if isinstance(e, OSError) else e}") from None


def _text_or_file(text: str | None, path: str | None, flag: str, what: str) -> str | None:
    """The value of llama.cpp's --FLAG TEXT / --FLAG-file FILE pair, one of them at most."""
    if text is not None and path is not None:
        raise UsageError(f"give {flag} or {flag}-file, not both")
    return _read(path, what) if path is not None else text


def sampling_from_args(args) -> dict:
    schema = _text_or_file(args.json_schema, args.json_schema_file, "--json-schema", "JSON schema")
    if args.json_schema_file is None and schema is not None and schema.startswith("@"):
        schema = _read(schema[1:], "JSON schema")
    grammar = _text_or_file(args.grammar, args.grammar_file, "--grammar", "grammar")
    pairs = {"max_tokens": args.max_tokens, "temperature": args.temp, "top_k": args.top_k, "top_p": args.top_p,
             "min_p": args.min_p, "typical_p": args.typical_p, "repeat_penalty": args.repeat_penalty,
             "presence_penalty": args.presence_penalty, "frequency_penalty": args.frequency_penalty,
             "penalty_last_n": args.repeat_last_n, "seed": args.seed, "stop": args.stop,
             "grammar": grammar, "json_schema": schema, "ignore_eos": args.ignore_eos or None,
             "mirostat": args.mirostat, "mirostat_tau": args.mirostat_ent, "mirostat_eta": args.mirostat_lr,
             "xtc_probability": args.xtc_probability, "xtc_threshold": args.xtc_threshold,
             "dry_multiplier": args.dry_multiplier, "dry_base": args.dry_base,
             "dry_allowed_length": args.dry_allowed_length, "dry_penalty_last_n": args.dry_penalty_last_n,
             "dry_sequence_breakers": None if args.dry_sequence_breaker is None else
             () if args.dry_sequence_breaker == ["none"] else tuple(args.dry_sequence_breaker),
             "top_n_sigma": args.top_nsigma, "dynatemp_range": args.dynatemp_range,
             "dynatemp_exponent": args.dynatemp_exp, "samplers": args.samplers}
    return {k: v for k, v in pairs.items() if v is not None}


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    sampling = sampling_from_args(args)
    from edgelm.runtime.sampling import SamplingParams

    SamplingParams.from_kwargs(**sampling)  # bad values fail before the model loads
    interactive = args.prompt is None and (args.interactive or sys.stdin.isatty())
    if args.json and interactive:
        raise UsageError("--json needs a one-shot prompt (-p, or piped stdin)")
    if args.verbose:
        from edgelm.runtime.backend import set_verbose

        set_verbose(True)
    import edgelm

    caching = {"prompt_cache": args.prompt_cache}
    if args.prompt_cache_size is not None:
        caching["prompt_cache_bytes"] = args.prompt_cache_size
    if not interactive:  # one request: an in-memory copy of its KV would never be read
        caching["prefix_cache_bytes"] = 0
    # only what was given: a named model's own settings (edgelm create) fill in the rest
    given = {"n_ctx": args.ctx, "n_threads": args.threads, "lora": lora_from_args(args),
             "chat_template": template_from_args(args)}
    if args.context_shift:
        caching.update(context_shift=True, keep=args.keep)
    with edgelm.load(args.model, n_gpu_layers=args.gpu_layers, truncate=args.truncate,
                     **{k: v for k, v in given.items() if v is not None}, **control_from_args(args),
                     **context_from_args(args), **caching,
                     **speculative_from_args(args)) as model:
        if interactive:
            from edgelm.repl import ChatSession, repl

            session = ChatSession(model, args.system, **sampling)
            return repl(session, on_reply=lambda last: print(stats_line(last.timings), file=sys.stderr))
        prompt = args.prompt if args.prompt is not None else sys.stdin.read()
        chat = args.chat or model.profile is not None  # a named model chats, as `ollama run NAME "..."` does
        text, last, reasoning = run(model, prompt, chat=chat, system=args.system,
                                    out=None if args.json else sys.stdout, **sampling)
    if args.json:
        print(json.dumps({**record(text, last), **({"reasoning": reasoning} if reasoning else {})},
                         ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        print(stats_line(last.timings), file=sys.stderr)
    return 0
