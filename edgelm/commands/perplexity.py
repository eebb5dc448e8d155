"""`edgelm perplexity MODEL TEXT_FILE`: perplexity from llama.cpp's logits over strided windows."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgelm.errors import UsageError


def perplexity(model: str | None, text: str, *, window: int = 512, stride: int | None = None,
               n_threads: int | None = None, lora=None) -> dict:
    from edgelm.runtime.model import LlamaModel
    from edgelm.runtime.perplexity import perplexity as measure

    with LlamaModel(model, lora=lora) as llama:
        r = measure(llama, llama.tokenize(text), window=window, stride=stride, n_threads=n_threads)
    return {"model": str(model), "perplexity": round(r.perplexity, 4), "nll": round(r.nll, 6),
            "tokens_scored": r.n_scored, "windows": r.n_windows, "window": window, "stride": stride or window // 2}


def main(argv: list[str]) -> int:
    from .run import add_lora_arguments, lora_from_args

    p = argparse.ArgumentParser(prog="edgelm perplexity", description=__doc__)
    p.add_argument("model", help="GGUF file")
    p.add_argument("text", help="UTF-8 text file, or 'heldout' for the reference corpus's held-out split")
    p.add_argument("--ctx", type=int, default=512, help="window size in tokens")
    p.add_argument("--stride", type=int, help="tokens between windows (default: half the window)")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", action="store_true")
    add_lora_arguments(p)
    args = p.parse_args(argv)
    if args.text == "heldout":
        from edgelm import corpus

        text = corpus.text("heldout")
    else:
        path = Path(args.text)
        if not path.is_file():
            raise UsageError(f"{path}: no such text file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    r = perplexity(args.model, text, window=args.ctx, stride=args.stride, n_threads=args.threads,
                   lora=lora_from_args(args))
    if args.json:
        print(json.dumps(r))
    else:
        print(f"perplexity {r['perplexity']:.3f} over {r['tokens_scored']:,} tokens "
              f"({r['windows']} windows of {r['window']}, stride {r['stride']})")
    return 0
