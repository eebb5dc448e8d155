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
    p.add_argument("--imatrix", metavar="auto|FILE", help="importance matrix: computed from --calib, or an imatrix GGUF")
    p.add_argument("--calib", metavar="TEXT_FILE", help="calibration text for --imatrix auto (default: edgelm's corpus)")
    p.add_argument("--name", help="general.name (default: the directory name)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load pickled .bin/.pt weights (torch weights_only unpickler); refused otherwise")
    return p


def main(argv: list[str]) -> int:
    from edgelm.converters import convert
    from edgelm.converters.quantize import parse_tensor_types

    args = build_parser().parse_args(argv)
    calib = None
    if args.calib:
        from pathlib import Path

        from edgelm.errors import UsageError

        if not Path(args.calib).is_file():
            raise UsageError(f"{args.calib}: no such calibration text file")
        calib = Path(args.calib).read_text(encoding="utf-8", errors="replace")
    result = convert(args.hf_dir, args.output, outtype=args.outtype, quant=args.quant,
                     tensor_types=parse_tensor_types(args.tensor_type), imatrix=args.imatrix, calib=calib,
                     name=args.name, allow_pickle=args.allow_pickle)
    print(result.summary(), file=sys.stderr)
    return 0
