"""`edgelm create NAME -f Modelfile [-q TYPE]`: name a model with its adapters, parameters and system message
(edgelm/modelfile.py), then `edgelm run NAME`, `edgelm serve NAME` or `edgelm.load("NAME")`. FROM may name a
safetensors checkpoint's folder and ADAPTER a PEFT adapter's: they are converted (and quantized with -q) into
$EDGELM_HOME/blobs, as `ollama create` does."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str]) -> int:
    from edgelm.modelfile import create

    p = argparse.ArgumentParser(prog="edgelm create", description=__doc__)
    p.add_argument("name", help="NAME or NAME:TAG (lower case; the tag defaults to latest)")
    p.add_argument("-f", "--file", default="Modelfile", help="the Modelfile (default: ./Modelfile)")
    p.add_argument("-q", "--quantize", metavar="TYPE", help="quantize the model (F32, F16 or BF16, or a checkpoint "
                   "folder in FROM) to TYPE: q4_K_M, q8_0, ... (Ollama's flag)")
    args = p.parse_args(argv)
    profile = create(args.name, args.file, args.quantize, status=lambda text: print(text, file=sys.stderr))
    extras = [f"{len(profile.adapters)} adapter(s)" if profile.adapters else "",
              f"{len(profile.sampling) + len(profile.load)} parameter(s)" if profile.sampling or profile.load else "",
              "a system message" if profile.system else "", f"{len(profile.messages)} example message(s)"
              if profile.messages else "", "a chat template" if profile.template else ""]
    print(f"created {profile.name} from {profile.model}"
          + (f" with {', '.join(e for e in extras if e)}" if any(extras) else ""), file=sys.stderr)
    return 0
