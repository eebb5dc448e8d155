"""Atomic file writes: a temporary file in the target's folder, fsync, rename, fsync the folder.

A reader sees the old file or the new one, never half of one, and a writer killed mid-write
leaves only a temporary file behind (names start with ".", so folder scans skip them). The file
gets the permissions a plain open() would give it (0666 less the umask), or 0600 when private
(cache entries, which hold what prompts said).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

TMP_SUFFIX = ".part"


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only set it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def public_mode(mode: int = 0o666) -> int:
    """What open() (0o666) or mkdir() (0o777) would give a new file or folder under the umask."""
    return mode & ~umask()


@contextlib.contextmanager
def atomic_path(out: str | os.PathLike, *, private: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary path beside `out`; it replaces `out` only if the block succeeds."""
    out = Path(out)
    fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=TMP_SUFFIX)  # 0600
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            if not private:
                os.fchmod(f.fileno(), public_mode())
            os.fsync(f.fileno())
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write(out: str | os.PathLike, data: bytes | bytearray | memoryview | list, *, private: bool = False) -> None:
    """Write `data` (bytes, or a list of byte chunks) to `out` atomically."""
    with atomic_path(out, private=private) as tmp, open(tmp, "wb") as f:
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
