"""Atomic file writes: a temporary file in the target's folder, fsync, rename, fsync the folder.

A reader sees the old file or the new one, never half of one, and a writer killed mid-write
leaves only a temporary file behind (names start with ".", so folder scans skip them).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

TMP_SUFFIX = ".part"


@contextlib.contextmanager
def atomic_path(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path beside `out`; it replaces `out` only if the block succeeds."""
    out = Path(out)
    fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write(out: str | os.PathLike, data: bytes | bytearray | memoryview | list) -> None:
    """Write `data` (bytes, or a list of byte chunks) to `out` atomically."""
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        for part in data if isinstance(data, list) else (data,):
            f.write(part)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in `path` durable (a no-op where folders cannot be opened, as on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
