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
    p.add_argument("--early-exit", metavar="K|auto",
                   help="also write the early-exit split at layer K (auto: the fastest predicted, measured here), "
                        "with the exit norms of HF_DIR/exit_heads.safetensors where trained")
    p.add_argument("--name", help="general.name (default: the directory name)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load pickled .bin/.pt weights (torch weights_only unpickler); refused otherwise")
    return p


def main(argv: list[str]) -> int:
    from edgelm.converters import convert
    from edgelm.converters.quantize import parse_tensor_types

    args = build_parser().parse_args(argv)
    from edgelm.converters.early_exit import parse_exit_layer, write_early_exit

    exit_layer = parse_exit_layer(args.early_exit) if args.early_exit is not None else None
    if isinstance(exit_layer, int):  # a layer the model does not have fails before anything is written
        import json
        from pathlib import Path

        from edgelm.errors import ConversionError

        try:
            n_layer = int(json.loads((Path(args.hf_dir) / "config.json").read_text())["num_hidden_layers"])
        except (OSError, ValueError, KeyError, TypeError):
            n_layer = None  # convert() reports a missing or broken config itself
        if n_layer is not None and not exit_layer < n_layer:
            raise ConversionError(f"--early-exit {exit_layer}: exits lie in [1, {n_layer - 1}] for this "
                                  f"{n_layer}-layer model")
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
    if exit_layer is not None:
        k, paths, _ = write_early_exit(args.output, exit_layer, hf_dir=args.hf_dir, calib=calib)
        print(f"early exit at layer {k}: {paths.draft.name}, {paths.tail.name}, {paths.shared.name}", file=sys.stderr)
    return 0
