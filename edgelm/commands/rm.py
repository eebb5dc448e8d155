"""`edgelm rm REF`: delete a named model's record (`edgelm create`; its files stay), or a Hub model from
huggingface_hub's cache (without asking the Hub)."""
from __future__ import annotations

import argparse

from edgelm import hub, modelfile


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="edgelm rm", description=__doc__)
    p.add_argument("refs", nargs="+", help="NAME, hf://owner/repo/file.gguf[@rev] or hf://owner/repo:QUANT")
    args = p.parse_args(argv)
    for ref in args.refs:
        if not hub.is_hub_ref(ref):
            removed = modelfile.remove(ref)
            if removed is None:
                from edgelm.errors import ModelNotFoundError

                raise ModelNotFoundError(f"{ref}: no model of that name (`edgelm list` shows them)")
            print(f"removed {modelfile.check_name(ref)}")
            continue
        for path in hub.remove(ref):
            print(f"removed {path}")
    return 0
