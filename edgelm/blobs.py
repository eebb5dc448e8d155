"""Content-addressed model files in $EDGELM_HOME/blobs, named sha256-HEX as Ollama names its layers.

What a client uploads (`POST /api/blobs/sha256:HEX`: a GGUF, a safetensors checkpoint's files, a LoRA adapter) and
what the server makes of it (a conversion, a quantization) live here under their own digest, and named models'
records (modelfile.Profile) point at them. A blob's name is its content's SHA-256, checked while it arrives: a
digest in a request can only name a file of this folder, and bytes that do not match the digest they were sent
under are never kept. An upload that would leave less than RESERVE bytes free on the disk is refused.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from .errors import InsufficientStorageError, ModelNotFoundError, UsageError
from .fsutil import TMP_SUFFIX, fsync_dir, public_mode

DIGEST = re.compile(r"sha256[:-]([0-9a-f]{64})")
FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")  # an uploaded file's name in a request
RESERVE = 1 << 30  # bytes an upload leaves free on the disk
STALE_S = 24 * 3600  # a temporary file this old was left by a server that stopped mid-upload
CHECK_EVERY = 256 << 20  # bytes between free-space checks of an upload of unknown size


def folder() -> Path:
    from .modelfile import home

    return home().parent / "blobs"


def path(digest: str) -> Path:
    """Where the blob of `digest` ("sha256:HEX", or Ollama's file name "sha256-HEX") lives; UsageError for
    anything else."""
    match = DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    if match is None:
        raise UsageError(f"{digest!r} is not a blob digest (sha256:<64 lower-case hex digits>)")
    return folder() / f"sha256-{match[1]}"


def existing(digest: str) -> Path:
    """The blob of `digest`; ModelNotFoundError if it was never uploaded."""
    blob = path(digest)
    if not blob.is_file():
        raise ModelNotFoundError(f"blob {digest} not found: upload it first (POST /api/blobs/{digest})")
    return blob


def check_file_name(name) -> str:
    """`name` if it is a plain file name (so it stays inside the folder it is put in), else UsageError."""
    if not isinstance(name, str) or not FILE_NAME.fullmatch(name):
        raise UsageError(f"file name {name!r}: a plain file name (letters, digits, '.', '_', '-') is expected")
    return name


def digest_of(file: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def is_blob(file: str | os.PathLike) -> bool:
    """Whether `file` is a blob of this store (what a named model's record may point at)."""
    p = Path(file)
    return p.parent == folder() and DIGEST.fullmatch(p.name) is not None


def _check_room(where: Path, size: int) -> None:
    free = shutil.disk_usage(where).free
    if free - size < RESERVE:
        raise InsufficientStorageError(f"not enough disk space for the blob: {free >> 20} MiB free, and an upload "
                                       f"of {size >> 20} MiB must leave {RESERVE >> 20} MiB")


class Upload:
    """One blob arriving in chunks: written beside its place, hashed as it comes, and kept (atomically) only if
    its hash is the digest it was sent under. `size`: its announced length, checked against the free space first."""

    def __init__(self, digest: str, size: int | None = None):
        self.digest, self.target = digest, path(digest)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        _check_room(self.target.parent, size or 0)
        fd, name = tempfile.mkstemp(dir=self.target.parent, prefix=".upload-", suffix=TMP_SUFFIX)
        self.file, self.tmp = os.fdopen(fd, "wb"), Path(name)
        self.hash, self.received = hashlib.sha256(), 0

    def write(self, chunk: bytes) -> None:
        before, self.received = self.received, self.received + len(chunk)
        if before // CHECK_EVERY != self.received // CHECK_EVERY:
            _check_room(self.target.parent, 0)
        self.hash.update(chunk)
        self.file.write(chunk)

    def commit(self) -> Path:
        got = f"sha256:{self.hash.hexdigest()}"
        if self.target.name != got.replace(":", "-"):
            self.discard()
            raise UsageError(f"the upload's SHA-256 is {got}, not the digest it was sent under "
                             f"({self.digest}); nothing was kept")
        self.file.flush()
        os.fchmod(self.file.fileno(), public_mode())
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.target)
        fsync_dir(self.target.parent)
        return self.target

    def discard(self) -> None:
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


@contextlib.contextmanager
def making() -> Iterator[Path]:
    """A temporary path in the blob folder for a file being made (a conversion's output); `add` it once made.
    Whatever is left at the path when the block ends is removed."""
    where = folder()
    where.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=where, prefix=".make-", suffix=TMP_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def add(file: Path) -> Path:
    """Move a file made in the blob folder (`making`) to its digest's name; the blob's path."""
    target = path(digest_of(file))
    os.chmod(file, public_mode())
    os.replace(file, target)
    fsync_dir(target.parent)
    return target


@contextlib.contextmanager
def staged(files: dict[str, str]) -> Iterator[Path]:
    """A temporary folder holding each blob under its file name (`files`: name -> digest), as a checkpoint's
    folder would."""
    blobs = {check_file_name(name): existing(digest) for name, digest in files.items()}
    with tempfile.TemporaryDirectory(dir=folder(), prefix=".staged-") as d:
        for name, blob in blobs.items():
            os.symlink(blob, Path(d) / name)
        yield Path(d)


def prune(candidates, keep) -> list[Path]:
    """Remove the blobs among `candidates` (paths) that are not in `keep` (the paths records still use)."""
    keep = {str(k) for k in keep}
    removed = []
    for c in {str(c) for c in candidates}:
        if is_blob(c) and c not in keep:
            with contextlib.suppress(FileNotFoundError):
                Path(c).unlink()
                removed.append(Path(c))
    return removed


def prune_unused(keep) -> list[Path]:
    """Remove every blob not in `keep` (the paths records use), and temporary files left by a stopped server, as
    Ollama prunes its layers when it starts (EDGELM_NOPRUNE=1: keep them). Uploaded blobs that no create used
    go too: a client uploads again what the server lacks."""
    where = folder()
    if os.environ.get("EDGELM_NOPRUNE") or not where.is_dir():
        return []
    removed = prune((p for p in where.iterdir() if DIGEST.fullmatch(p.name)), keep)
    now = time.time()
    for p in where.glob(".*"):
        with contextlib.suppress(OSError):
            if now - p.lstat().st_mtime > STALE_S:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                removed.append(p)
    return removed
