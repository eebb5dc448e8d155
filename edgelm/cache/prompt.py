"""Prompt (KV) cache: sequence states kept in RAM and, optionally, on disk for later processes.

An entry is one sequence's KV state as llama.cpp serialises it (`llama_state_seq_get_data`),
with the tokens it holds. A request restores the entry sharing its longest token prefix
(`llama_state_seq_set_data`), drops the positions past the shared part and evaluates only the rest.

On disk an entry is `<key>.kvc` in the cache folder:

    b"EDGELMKV" | u32 format version | u32 header length | header (JSON) | tokens (int32 LE) | payload

The header names everything the payload depends on (model fingerprint, llama.cpp state version
and library version, n_ctx, KV types, flash attention) and carries the payload's sha256; any
mismatch, truncation or corruption is a miss with a debug log line. Keys are derived from the
signature and the tokens, never taken from input; entries are opened without following symlinks.
Writes are atomic, so concurrent writers and a writer killed mid-write leave no torn entry.
"""
from __future__ import annotations

import array
import ctypes
import hashlib
import json
import logging
import os
import re
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as lib

from edgelm.errors import UsageError
from edgelm.fsutil import TMP_SUFFIX, atomic_write

from .prefix import PrefixTree

log = logging.getLogger("edgelm.cache")

MAGIC = b"EDGELMKV"
FORMAT_VERSION = 1
FIXED = struct.Struct("<8sII")  # magic, format version, header length
MAX_HEADER = 1 << 16
ENTRY_NAME = re.compile(r"^[0-9a-f]{40}\.kvc$")
STALE_TMP_S = 3600  # a temporary file this old belongs to a writer that died
DEFAULT_RAM_BYTES = 128 << 20
DEFAULT_DISK_BYTES = 1 << 30
DEFAULT_MIN_TOKENS = 16


@dataclass
class Entry:
    key: str
    tokens: tuple[int, ...]
    nbytes: int  # payload size
    used: float  # last use, for LRU
    exact: int = 0  # leading positions evaluated canonically (see edgelm.runtime.generate.prefill)
    payload: bytearray | None = None  # the RAM copy
    on_disk: bool = False


def _token_bytes(tokens) -> bytes:
    a = array.array("i", tokens)
    if sys.byteorder == "big":
        a.byteswap()
    return a.tobytes()


def _tokens_from(raw: bytes) -> tuple[int, ...]:
    a = array.array("i")
    a.frombytes(raw)
    if sys.byteorder == "big":
        a.byteswap()
    return tuple(a)


class CacheMiss(Exception):
    """An entry that cannot be used; the message says why (logged at debug level)."""


class PromptCache:
    """Sequence states of one context, LRU under a RAM budget and (with `path`) a disk budget."""

    def __init__(self, ctx, *, ram_bytes: int = DEFAULT_RAM_BYTES, path: str | os.PathLike | None = None,
                 disk_bytes: int = DEFAULT_DISK_BYTES, min_tokens: int = DEFAULT_MIN_TOKENS):
        for name, value in (("ram_bytes", ram_bytes), ("disk_bytes", disk_bytes), ("min_tokens", min_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UsageError(f"{name} must be a non-negative integer, not {value!r}")
        self.ctx = ctx
        self.ram_bytes, self.disk_bytes, self.min_tokens = ram_bytes, disk_bytes, max(1, min_tokens)
        self.signature = state_signature(ctx)
        self._sig_bytes = json.dumps(self.signature, sort_keys=True).encode()
        self.dir = None
        if path is not None:
            self.dir = Path(path).expanduser().resolve()
            try:
                self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as e:
                raise UsageError(f"prompt cache {self.dir}: cannot create the folder ({e.strerror or e})") from None
            if not self.dir.is_dir():
                raise UsageError(f"prompt cache {self.dir}: not a folder")
        self._tree = PrefixTree()
        self._entries: dict[str, Entry] = {}
        self._ram_used = 0
        self._disk_seen: dict[str, tuple[int, int]] = {}  # name -> (size, mtime_ns) of indexed files
        self._dir_mtime = None
        self._lock = threading.RLock()
        self.stats = {"hits": 0, "misses": 0, "stores": 0}

    # ------------------------------------------------------------ public

    def lookup(self, tokens) -> tuple[int, Entry | None]:
        """The entry sharing the most leading tokens with `tokens`, and how many it shares."""
        with self._lock:
            self._refresh()
            n, keys = self._tree.longest(tokens)
            if not keys:
                return 0, None
            return n, max((self._entries[k] for k in keys), key=lambda e: (e.payload is not None, e.used))

    def restore(self, seq: int, entry: Entry) -> bool:
        """Load `entry` into sequence `seq` (replacing what it held). False (a miss, logged) if it cannot be."""
        with self._lock:
            try:
                payload = entry.payload if entry.payload is not None else self._read(entry)
            except CacheMiss as why:
                log.debug("prompt cache miss: %s", why)
                self.stats["misses"] += 1
                self._forget(entry, disk=True)
                return False
            self.ctx.remove(seq)
            buf = (ctypes.c_uint8 * len(payload)).from_buffer(payload)
            n = lib.llama_state_seq_set_data(self.ctx.ptr, buf, len(payload), seq)
            if n != len(payload):
                log.debug("prompt cache miss: llama.cpp refused entry %s (read %d of %d bytes)",
                          entry.key, n, len(payload))
                self.ctx.remove(seq)
                self.stats["misses"] += 1
                self._forget(entry, disk=True)
                return False
            self.ctx.set_tokens(seq, entry.tokens, exact=entry.exact)
            entry.used = time.monotonic()
            if entry.payload is None and entry.nbytes <= self.ram_bytes:
                entry.payload = payload
                self._ram_used += entry.nbytes
                self._evict_ram(keep=entry.key)
            self.stats["hits"] += 1
            return True

    def store(self, seq: int, tokens=None) -> Entry | None:
        """Keep the state of `seq` (which holds `tokens`; default: what the context says it holds)."""
        tokens = tuple(self.ctx.seq_tokens(seq) if tokens is None else tokens)
        exact = min(self.ctx.exact_tokens(seq), len(tokens))
        if len(tokens) < self.min_tokens or (self.ram_bytes == 0 and self.dir is None):
            return None
        with self._lock:
            n, keys = self._tree.longest(tokens)
            covering = [self._entries[k] for k in keys if self._entries[k].exact >= exact] if n == len(tokens) else []
            if covering:  # an entry already holds these tokens (and maybe more), at least as exactly
                for e in covering:
                    e.used = time.monotonic()
                return None
            size = lib.llama_state_seq_get_size(self.ctx.ptr, seq)
            if size <= 0 or (size > self.ram_bytes and (self.dir is None or size > self.disk_bytes)):
                return None
            payload = bytearray(size)
            got = lib.llama_state_seq_get_data(self.ctx.ptr, (ctypes.c_uint8 * size).from_buffer(payload), size, seq)
            if got != size:
                log.debug("prompt cache: llama.cpp wrote %d of %d state bytes; not stored", got, size)
                return None
            entry = Entry(self._key(tokens), tokens, size, time.monotonic(), exact)
            for k in list(keys) if n else []:  # shorter entries this one extends are superseded in RAM
                old = self._entries[k]
                if (len(old.tokens) <= n and old.tokens == tokens[:len(old.tokens)] and old.exact <= exact
                        and old.payload is not None):
                    self._drop_ram(old)
            if size <= self.ram_bytes:
                entry.payload = payload
                self._ram_used += size
            self._entries[entry.key] = entry
            self._tree.insert(entry.key, tokens)
            if self.dir is not None and size <= self.disk_bytes:
                self._write(entry, payload)
            self._evict_ram(keep=entry.key)
            if not entry.payload and not entry.on_disk:
                self._forget(entry)
                return None
            self.stats["stores"] += 1
            return entry

    def clear(self) -> None:
        """Forget the RAM entries (files on disk stay for other processes)."""
        with self._lock:
            self._tree = PrefixTree()
            self._entries.clear()
            self._ram_used = 0
            self._disk_seen.clear()
            self._dir_mtime = None

    @property
    def ram_used(self) -> int:
        return self._ram_used

    def disk_used(self) -> int:
        return sum(size for size, _ in self._scan().values()) if self.dir is not None else 0

    # ------------------------------------------------------------ RAM tier

    def _key(self, tokens) -> str:
        return hashlib.sha256(self._sig_bytes + _token_bytes(tokens)).hexdigest()[:40]

    def _drop_ram(self, entry: Entry) -> None:
        if entry.payload is not None:
            entry.payload = None
            self._ram_used -= entry.nbytes
        if not entry.on_disk:
            self._forget(entry)

    def _forget(self, entry: Entry, disk: bool = False) -> None:
        if entry.payload is not None:
            self._ram_used -= entry.nbytes
            entry.payload = None
        if disk and entry.on_disk and self.dir is not None:
            self._unlink(entry.key + ".kvc")
        if self._entries.pop(entry.key, None) is not None:
            self._tree.remove(entry.key)

    def _evict_ram(self, keep: str) -> None:
        if self._ram_used <= self.ram_bytes:
            return
        for entry in sorted((e for e in self._entries.values() if e.payload is not None), key=lambda e: e.used):
            if self._ram_used <= self.ram_bytes:
                break
            if entry.key != keep:
                self._drop_ram(entry)

    # ------------------------------------------------------------ disk tier

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.kvc"  # key is hex we derived: the path cannot leave the folder

    def _write(self, entry: Entry, payload: bytearray) -> None:
        try:
            write_state(self._path(entry.key), self.signature, entry.tokens, entry.exact, payload)
        except OSError as e:
            log.debug("prompt cache: cannot write %s (%s)", entry.key, e.strerror or e)
            return
        entry.on_disk = True
        self._evict_disk(keep=entry.key + ".kvc")

    def _open(self, name: str):
        try:
            fd = os.open(self.dir / name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
        except OSError as e:
            raise CacheMiss(f"{name}: cannot open ({e.strerror or e})") from None
        return os.fdopen(fd, "rb")

    def _read_header(self, f, name: str, file_size: int) -> tuple[dict, tuple[int, ...]]:
        return read_state_header(f, name, file_size, self.signature, self.ctx.n_ctx)

    def _read(self, entry: Entry) -> bytearray:
        name = entry.key + ".kvc"
        with self._open(name) as f:
            header, tokens = self._read_header(f, name, os.fstat(f.fileno()).st_size)
            if tokens != entry.tokens:
                raise CacheMiss(f"{name}: holds other tokens than its index entry")
            payload = read_state_payload(f, name, header, tokens)
        try:
            os.utime(self._path(entry.key), follow_symlinks=False)  # LRU order across processes
        except (OSError, NotImplementedError):
            pass
        return payload

    def _scan(self) -> dict[str, tuple[int, int]]:
        """name -> (size, mtime_ns) of the folder's entries; removes temporary files of dead writers."""
        found = {}
        now = time.time()
        try:
            it = os.scandir(self.dir)
        except OSError:
            return found
        with it:
            for d in it:
                try:
                    if d.is_symlink() or not d.is_file(follow_symlinks=False):
                        continue
                    st = d.stat(follow_symlinks=False)
                except OSError:
                    continue
                if ENTRY_NAME.match(d.name):
                    found[d.name] = (st.st_size, st.st_mtime_ns)
                elif d.name.startswith(".") and d.name.endswith(TMP_SUFFIX) and now - st.st_mtime > STALE_TMP_S:
                    self._unlink(d.name)
        return found

    def _refresh(self) -> None:
        """Index entries other processes wrote since the last look (and drop the ones they evicted)."""
        if self.dir is None:
            return
        try:
            mtime = os.stat(self.dir).st_mtime_ns
        except OSError:
            return
        if mtime == self._dir_mtime:
            return
        self._dir_mtime = mtime
        found = self._scan()
        for name in set(self._disk_seen) - set(found):
            entry = self._entries.get(name[:-4])
            if entry is not None:
                entry.on_disk = False
                if entry.payload is None:
                    self._forget(entry)
        for name, (size, mtime_ns) in found.items():
            key = name[:-4]
            entry = self._entries.get(key)
            if entry is not None:
                entry.on_disk = True
                continue
            if self._disk_seen.get(name) == (size, mtime_ns):
                continue  # looked at before and skipped (another model's entry, or a bad one)
            try:
                with self._open(name) as f:
                    header, tokens = self._read_header(f, name, size)
            except CacheMiss as why:
                log.debug("prompt cache: skipping %s", why)
                continue
            if self._key(tokens) != key:
                log.debug("prompt cache: skipping %s: its name does not match its tokens", name)
                continue
            self._entries[key] = Entry(key, tokens, header["payload_bytes"], mtime_ns / 1e9 - time.time()
                                       + time.monotonic(), header["exact"], on_disk=True)
            self._tree.insert(key, tokens)
        self._disk_seen = found

    def _evict_disk(self, keep: str) -> None:
        found = self._scan()
        total = sum(size for size, _ in found.values())
        for name, (size, _) in sorted(found.items(), key=lambda kv: kv[1][1]):
            if total <= self.disk_bytes:
                break
            if name == keep:
                continue
            self._unlink(name)
            total -= size
            entry = self._entries.get(name[:-4])
            if entry is not None:
                entry.on_disk = False
                if entry.payload is None:
                    self._forget(entry)

    def _unlink(self, name: str) -> None:
        try:
            os.unlink(self.dir / name)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.debug("prompt cache: cannot remove %s (%s)", name, e.strerror or e)

# ---------------------------------------------------------------------------- the file format


def state_signature(ctx) -> dict:
    """What a sequence state of `ctx` depends on: a state file made under anything else is refused."""
    opts = ctx.options
    return {"model": ctx.model.fingerprint, "llama_state_version": lib.LLAMA_STATE_SEQ_VERSION,
            "llama_cpp": lib.__version__, "n_ctx": ctx.n_ctx, "type_k": opts.type_k, "type_v": opts.type_v,
            "flash_attn": opts.flash_attn}


def write_state(path: Path, signature: dict, tokens, exact: int, payload) -> None:
    """A sequence state file, written atomically (OSError when it cannot be)."""
    raw = _token_bytes(tokens)
    digest = hashlib.sha256(raw)
    digest.update(payload)
    header = json.dumps({**signature, "n_tokens": len(tokens), "exact": exact, "payload_bytes": len(payload),
                         "sha256": digest.hexdigest()}, sort_keys=True).encode()
    atomic_write(path, [FIXED.pack(MAGIC, FORMAT_VERSION, len(header)), header, raw, payload], private=True)


def read_state_header(f, name: str, file_size: int, signature: dict, n_ctx: int) -> tuple[dict, tuple[int, ...]]:
    """A state file's header and tokens, checked against `signature`; CacheMiss naming what is wrong."""
    fixed = f.read(FIXED.size)
    if len(fixed) < FIXED.size:
        raise CacheMiss(f"{name}: truncated header")
    magic, version, hlen = FIXED.unpack(fixed)
    if magic != MAGIC:
        raise CacheMiss(f"{name}: not an edgelm cache entry")
    if version != FORMAT_VERSION:
        raise CacheMiss(f"{name}: format version {version}, this edgelm reads {FORMAT_VERSION}")
    if hlen > MAX_HEADER:
        raise CacheMiss(f"{name}: header of {hlen} bytes")
    try:
        header = json.loads(f.read(hlen))
    except (UnicodeDecodeError, ValueError):
        raise CacheMiss(f"{name}: unreadable header") from None
    if not isinstance(header, dict):
        raise CacheMiss(f"{name}: unreadable header")
    for field, want in signature.items():
        if header.get(field) != want:
            raise CacheMiss(f"{name}: made with {field}={header.get(field)!r}, this context has {want!r}")
    n, size, exact = header.get("n_tokens"), header.get("payload_bytes"), header.get("exact")
    if not (isinstance(n, int) and isinstance(size, int) and isinstance(exact, int) and 0 < n <= n_ctx
            and size > 0 and 0 <= exact <= n and isinstance(header.get("sha256"), str)):
        raise CacheMiss(f"{name}: bad token or payload count")
    if FIXED.size + hlen + 4 * n + size != file_size:
        raise CacheMiss(f"{name}: {file_size} bytes, the header says {FIXED.size + hlen + 4 * n + size}")
    raw = f.read(4 * n)
    if len(raw) != 4 * n:
        raise CacheMiss(f"{name}: truncated tokens")
    return header, _tokens_from(raw)


def read_state_payload(f, name: str, header: dict, tokens) -> bytearray:
    """The payload after the tokens, checked against the header's sha256."""
    payload = bytearray(header["payload_bytes"])
    if f.readinto(payload) != len(payload):
        raise CacheMiss(f"{name}: truncated payload")
    digest = hashlib.sha256(_token_bytes(tokens))
    digest.update(payload)
    if digest.hexdigest() != header["sha256"]:
        raise CacheMiss(f"{name}: checksum mismatch (corrupt entry)")
    return payload
