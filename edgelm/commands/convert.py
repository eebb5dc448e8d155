"""`edgelm convert HF_DIR -o OUT.gguf`: a Hugging Face checkpoint to a GGUF llama.cpp runs unchanged."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from edgelm.converters.export import OUTTYPES

    p = argparse.ArgumentParser(prog="edgelm convert", description=__doc__)
    p.add_argument("hf_dir", help="checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("-o", "--output", required=True, help="GGUF file to write (atomically)")
    p.add_argument("--outtype", choices=sorted(OUTTYPES), default="f16")
    p.add_argument("--quant", metavar="TYPE", help="quantize with llama.cpp's quantizer: q4_k_m, q6_k, iq4_xs, …")
    p.add_argument("--tensor-type", action="append", metavar="PATTERN=TYPE",
                   help="per-tensor type override, a regex on GGUF tensor names (repeatable)")
    p.add_argument("--name", help="general.name (default: the directory name)")
    return p


def main(argv: list[str]) -> int:
    from edgelm.converters import convert
    from edgelm.converters.quantize import parse_tensor_types

    args = build_parser().parse_args(argv)
    result = convert(args.hf_dir, args.output, outtype=args.outtype, quant=args.quant,
                     tensor_types=parse_tensor_types(args.tensor_type), name=args.name)
    print(result.summary(), file=sys.stderr)
    return 0
