"""`edgelm convert HF_DIR -o OUT.gguf`: a Hugging Face checkpoint to a GGUF llama.cpp runs unchanged.
`edgelm convert ADAPTER_DIR --base HF_DIR -o OUT.gguf`: a PEFT LoRA adapter to a GGUF LoRA (`--lora` loads it)."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from edgelm.converters.export import OUTTYPES

    p = argparse.ArgumentParser(prog="edgelm convert", description=__doc__)
    p.add_argument("hf_dir", help="checkpoint directory (config.json, *.safetensors, tokenizer.json), or a PEFT "
                                  "LoRA adapter directory (adapter_config.json) with --base")
    p.add_argument("-o", "--output", required=True, help="GGUF file to write (atomically)")
    p.add_argument("--outtype", choices=sorted(OUTTYPES), default="f16")
    p.add_argument("--quant", metavar="TYPE", help="quantize with llama.cpp's quantizer: q4_k_m, q6_k, iq4_xs, …")
    p.add_argument("--tensor-type", action="append", metavar="PATTERN=TYPE",
                   help="per-tensor type override, a regex on GGUF tensor names (repeatable)")
    p.add_argument("--imatrix", metavar="auto|FILE", help="importance matrix: computed from --calib, or an imatrix GGUF")
    p.add_argument("--calib", metavar="TEXT_FILE", help="calibration text for --imatrix auto (default: edgelm's corpus)")
    p.add_argument("--early-exit", metavar="K|auto",
                   help="also write the early-exit split at layer K (auto: the fastest predicted, measured here), "
                        "with the exit norms of HF_DIR/exit_heads.safetensors where trained, or its exit block "
                        "from HF_DIR/exit_blocks.safetensors")
    p.add_argument("--prune", metavar="SPEC",
                   help="prune first, with `edgelm prune` options as key=value pairs: ffn-keep=0.5,hidden-keep=0.75 "
                        "or target-params=8M (calibrated on --calib)")
    p.add_argument("--distill", nargs="+", metavar="TEXT_FILE|corpus",
                   help="then distill the pruned model from HF_DIR on this text (needs torch)")
    p.add_argument("--distill-steps", type=int, default=300)
    p.add_argument("--distill-exit-layers", type=int, nargs="+", default=(), metavar="K",
                   help="train exit norms at these layers while distilling (for --early-exit)")
    p.add_argument("--base", metavar="HF_DIR", help="for a LoRA adapter: its base model's checkpoint directory "
                                                    "(only config.json is read)")
    p.add_argument("--lora", metavar="ADAPTER_DIR", help="merge this PEFT LoRA adapter into the weights first "
                                                          "(then --quant quantizes the merged model)")
    p.add_argument("--lora-scale", type=float, default=1.0, help="scale of the merged --lora (default 1)")
    p.add_argument("--threads", type=int)
    p.add_argument("--name", help="general.name (default: the directory name)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load pickled .bin/.pt weights (torch weights_only unpickler); refused otherwise")
    return p


def main(argv: list[str]) -> int:
    from edgelm.converters import convert
    from edgelm.converters.quantize import parse_tensor_types

    args = build_parser().parse_args(argv)
    from edgelm.converters.lora import is_adapter

    if is_adapter(args.hf_dir):
        return _adapter(args)
    if args.base is not None:
        from edgelm.errors import UsageError

        raise UsageError(f"--base is for LoRA adapters; {args.hf_dir} has no adapter_config.json")
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
    if args.prune or args.distill:
        if args.lora:
            from edgelm.errors import UsageError

            raise UsageError("--lora merges into a plain conversion; it does not combine with --prune/--distill")
        return _pipeline(args, calib, exit_layer)
    result = convert(args.hf_dir, args.output, outtype=args.outtype, quant=args.quant,
                     tensor_types=parse_tensor_types(args.tensor_type), imatrix=args.imatrix, calib=calib,
                     name=args.name, allow_pickle=args.allow_pickle, lora=args.lora, lora_scale=args.lora_scale)
    print(result.summary(), file=sys.stderr)
    if exit_layer is not None:
        k, paths, _ = write_early_exit(args.output, exit_layer, hf_dir=args.hf_dir, calib=calib)
        print(f"early exit at layer {k}: {paths.draft.name}, {paths.tail.name}, {paths.shared.name}", file=sys.stderr)
    return 0


def _adapter(args) -> int:
    from edgelm.converters.lora import convert_lora
    from edgelm.errors import UsageError

    if args.base is None:
        raise UsageError(f"{args.hf_dir} is a LoRA adapter: give its base model's checkpoint with --base HF_DIR")
    others = [flag for flag, value in (("--quant", args.quant), ("--tensor-type", args.tensor_type),
                                       ("--imatrix", args.imatrix), ("--early-exit", args.early_exit),
                                       ("--prune", args.prune), ("--distill", args.distill), ("--lora", args.lora))
              if value]
    if others:
        raise UsageError(f"{', '.join(others)} do not apply to a LoRA adapter (only --outtype and --name do)")
    result = convert_lora(args.hf_dir, args.base, args.output, outtype=args.outtype, name=args.name)
    print(result.summary().replace(" bits/weight", " bits/weight (LoRA)"), file=sys.stderr)
    return 0


def _pipeline(args, calib: str | None, exit_layer) -> int:
    """prune → distill → convert → quantize → early-exit split, with one report table."""
    from edgelm.converters.pipeline import compress, parse_prune_spec
    from edgelm.errors import UsageError

    if args.tensor_type or (args.imatrix not in (None, "auto")):
        raise UsageError("with --prune/--distill the importance matrix comes from --calib; drop --tensor-type/--imatrix FILE")
    prune = parse_prune_spec(args.prune) if args.prune else None
    data, options = None, None
    if args.distill:
        from edgelm import corpus
        from edgelm.converters.distill import DistillOptions

        data = [corpus.text_arg(name, "train", what="distillation text") for name in args.distill]
        options = DistillOptions(steps=args.distill_steps, exit_layers=tuple(args.distill_exit_layers),
                                 n_threads=args.threads)
    report = compress(args.hf_dir, args.output, prune=prune, distill_data=data, distill_options=options,
                      outtype=args.outtype, quant=args.quant, early_exit=exit_layer, calib=calib, name=args.name,
                      n_threads=args.threads, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(report.table())
    return 0
