"""`edgelm rm REF`: delete a Hub model from huggingface_hub's cache (without asking the Hub)."""
from __future__ import annotations

import argparse

from edgelm import hub


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="edgelm rm", description=__doc__)
    p.add_argument("refs", nargs="+", help="hf://owner/repo/file.gguf[@rev] or hf://owner/repo:QUANT")
    args = p.parse_args(argv)
    for ref in args.refs:
        for path in hub.remove(ref):
            print(f"removed {path}")
    return 0
