"""`edgelm pull REF`: download a Hub model into huggingface_hub's cache, so later runs (offline too) find it."""
from __future__ import annotations

import argparse

from edgelm import hub
from edgelm.gguf_reader import read_gguf


def pull(ref: str, on_part=None, on_bytes=None) -> tuple[str, int]:
    """(the cached path, its size in bytes) of `ref`, downloaded if needed and checked as a GGUF file;
    `on_part(filename, path)` hears of each part of it in the cache, `on_bytes` of each chunk (hub.fetch)."""
    path = hub.fetch(ref, on_part, on_bytes)
    read_gguf(path, keep_arrays=False)  # a file that would not load is an error now, not at `edgelm run`
    return str(path), sum(p.stat().st_size for p in (path.parent / name for name in hub.shards(path.name)))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="edgelm pull", description=__doc__)
    p.add_argument("ref", help="hf://owner/repo/file.gguf[@rev], hf://owner/repo:QUANT or hf.co/owner/repo:QUANT")
    args = p.parse_args(argv)
    path, size = pull(args.ref)
    print(f"{args.ref}: {path} ({size / 2**20:.1f} MiB)")
    return 0
