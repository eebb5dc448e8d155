"""The reference corpus: Python's standard library source and the pydoc topics.

Every machine with Python has this text, so the reference models can be
retrained anywhere without downloading data. The split is fixed by hashing
each document's name, so it does not move when files are added or removed.
"""
from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

HELDOUT_MODULUS = 50  # one document in 50 is held out (about 2%)
_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}


@dataclass(frozen=True)
class Document:
    name: str  # "stdlib/json/decoder.py" or "pydoc/topic-name"
    text: str

    @property
    def heldout(self) -> bool:
        digest = hashlib.sha1(self.name.encode()).digest()
        return int.from_bytes(digest[:4], "little") % HELDOUT_MODULUS == 0


def _stdlib_documents() -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield Document(f"stdlib/{rel.as_posix()}", text)


def _pydoc_documents() -> Iterator[Document]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Document(f"pydoc/{name}", topics[name])


def documents(split: str = "train") -> list[Document]:
    """Documents of one split: "train", "heldout" or "all"."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', not {split!r}")
    docs = [*_stdlib_documents(), *_pydoc_documents()]
    if split == "all":
        return docs
    want_heldout = split == "heldout"
    return [d for d in docs if d.heldout == want_heldout]


def text(split: str = "train", max_chars: int | None = None) -> str:
    """The split as one string, documents separated by blank lines."""
    out = "\n\n".join(d.text for d in documents(split))
    return out if max_chars is None else out[:max_chars]


def text_arg(name: str, split: str, *, max_chars: int | None = None, what: str = "text") -> str:
    """A command's text argument: "corpus" is this corpus's `split`, anything else a UTF-8 text file."""
    if name == "corpus":
        return text(split, max_chars=max_chars)
    path = Path(name)
    if not path.is_file():
        from edgelm.errors import UsageError

        raise UsageError(f"{name}: no such {what} file")
    return path.read_text(encoding="utf-8", errors="replace")


def fingerprint(split: str = "all") -> str:
    """sha256 over names and texts: tells whether two machines see the same corpus."""
    h = hashlib.sha256()
    for d in documents(split):
        h.update(d.name.encode())
        h.update(b"\0")
        h.update(d.text.encode())
    return h.hexdigest()
