"""`edgelm list`: the bundled model, the models named by `edgelm create`, and the GGUF models in huggingface_hub's
cache (HF_HOME / HF_HUB_CACHE)."""
from __future__ import annotations

import argparse
import json
from datetime import datetime

from pathlib import Path

from edgelm import hub, modelfile
from edgelm.runtime.model import default_model_path


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="edgelm list", description=__doc__)
    p.add_argument("--json", action="store_true", help="one JSON object per model")
    args = p.parse_args(argv)
    bundled = default_model_path()
    rows = [("(bundled)", bundled, bundled.stat().st_size, bundled.stat().st_mtime)]
    for profile in modelfile.profiles():  # named models: the size is their base file's (adapters aside)
        base = Path(profile.model)
        size = base.stat().st_size if base.is_file() else 0
        rows.append((profile.name, profile.model, size, profile.created))
    rows += [(m.ref, m.path, m.size, m.path.stat().st_mtime) for m in hub.cached_models()]
    for ref, path, size, mtime in rows:
        if args.json:
            print(json.dumps({"ref": ref, "path": str(path), "size": size}))
        else:
            when = datetime.fromtimestamp(mtime).strftime("%Y-%m-%d %H:%M")
            print(f"{ref:<64} {size / 2**20:>9.1f} MiB  {when}  {path}")
    return 0
