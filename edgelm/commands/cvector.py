"""`edgelm cvector MODEL --positive FILE --negative FILE -o OUT.gguf`: a control vector from contrasting prompts
(line i of each file is pair i), for `--control-vector` (edgelm/runtime/control.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgelm.errors import UsageError


def _lines(path: str) -> list[str]:
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read the prompts: {e}") from None
    return [line.replace("\\n", "\n") for line in lines if line]


def main(argv: list[str]) -> int:
    from edgelm.runtime.control import make_control_vector, write_control_vector
    from edgelm.runtime.model import resolve_model

    p = argparse.ArgumentParser(prog="edgelm cvector", description=__doc__)
    p.add_argument("model", help="GGUF file or hf:// reference")
    p.add_argument("--positive", required=True, help="prompts of the direction to steer towards, one per line")
    p.add_argument("--negative", required=True, help="their contrasts, one per line (\\n for a line break)")
    p.add_argument("-o", "--output", required=True, help="control-vector GGUF to write (atomically)")
    p.add_argument("--method", choices=("mean", "pca"), default="mean",
                   help="mean of the pairs' differences, or their first principal component")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    model = resolve_model(args.model)
    directions = make_control_vector(model, _lines(args.positive), _lines(args.negative), method=args.method,
                                     n_threads=args.threads)
    write_control_vector(args.output, directions, model_hint=model.stem)
    print(f"wrote {args.output}: {len(directions)} layer directions ({args.method})", file=sys.stderr)
    return 0
