"""A loaded GGUF model: weights, vocabulary, tokenizer and metadata.

Every file is checked by edgelm's own GGUF reader before llama.cpp sees it,
because llama.cpp aborts the whole process on some malformed files.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import llama_cpp as lib

from edgelm.errors import ModelLoadError, ModelNotFoundError, UsageError
from edgelm.gguf_reader import GGUFFile, read_gguf
from edgelm.hub import fetch, is_hub_ref

from .backend import ensure_backend
from .lora import LoraAdapters, lora_specs

DEFAULT_MODEL = "edgelm-small-q8_0.gguf"


def default_model_path() -> Path:
    """The model bundled inside the package."""
    return Path(str(resources.files("edgelm") / "models" / DEFAULT_MODEL))


def resolve_model(ref: str | os.PathLike | None) -> Path:
    """A model reference -> an existing local file (None: the bundled model; hf://...: via the Hub cache)."""
    if is_hub_ref(ref):  # huggingface_hub loads only for Hub references
        return fetch(ref)
    path = default_model_path() if ref is None else Path(ref).expanduser()
    if not path.exists():
        named = " or named model (`edgelm list` shows them)" if isinstance(ref, str) and "/" not in ref else ""
        raise ModelNotFoundError(f"{path}: no such model file{named}")
    if path.is_dir():
        raise ModelNotFoundError(f"{path}: is a directory, not a GGUF file (convert it with `edgelm convert`)")
    return path


@dataclass(frozen=True)
class LoadOptions:
    n_gpu_layers: int = 0
    use_mmap: bool = True
    use_mlock: bool = False
    vocab_only: bool = False


class LlamaModel:
    """Weights and vocabulary; contexts (KV caches) are created from it."""

    def __init__(self, path: str | os.PathLike | None = None, options: LoadOptions | None = None, *,
                 parts: list[Path] | None = None, unused: tuple[str, ...] = (), metadata_arrays: bool = True,
                 lora=None, control=None, control_range: tuple[int, int] | None = None):
        """`parts`: the later files of a split model whose first file is `path` (split.no 1, 2, ...).
        `unused`: tensors this model never reads (an early-exit tail's token_embd), whose pages of the
        memory map are released after load so they do not count in RSS twice (see release_unused).
        `metadata_arrays=False`: keep no tokenizer arrays in Python (a model loaded for its weights only, such as
        an early-exit tail, whose vocabulary the draft already holds; llama.cpp still reads them).
        `lora`: LoRA adapters every context of this model applies (runtime/lora.py: a path, (path, scale), or a
        list of them); `control`: control vectors in the same shapes, over `control_range` (first, last layer)
        (runtime/control.py)."""
        self.options = options or LoadOptions()
        self.path = resolve_model(path)
        self.gguf: GGUFFile = read_gguf(self.path, keep_arrays=metadata_arrays)
        self.parts = [resolve_model(p) for p in parts or ()]
        part_infos = [read_gguf(p, keep_arrays=False) for p in self.parts]
        specs = lora_specs(lora)
        ensure_backend()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = self.options.n_gpu_layers
        params.vocab_only = self.options.vocab_only
        params.load_mode = _load_mode(self.options)
        before = _file_mappings([self.path, *self.parts]) if unused else None
        if self.parts:
            paths = (ctypes.c_char_p * (1 + len(self.parts)))(*(os.fsencode(p) for p in (self.path, *self.parts)))
            self._ptr = lib.llama_model_load_from_splits(paths, len(paths), params)
        else:
            self._ptr = lib.llama_model_load_from_file(os.fsencode(self.path), params)
        if not self._ptr:
            raise ModelLoadError(f"{self.path}: llama.cpp could not load this model (run with --verbose for its log)")
        self.vocab = lib.llama_model_get_vocab(self._ptr)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = lib.llama_model_n_ctx_train(self._ptr)
        self.n_embd = lib.llama_model_n_embd(self._ptr)
        self.n_layer = lib.llama_model_n_layer(self._ptr)
        self.bos = lib.llama_vocab_bos(self.vocab)
        self.eos = lib.llama_vocab_eos(self.vocab)
        self.add_bos = bool(lib.llama_vocab_get_add_bos(self.vocab))
        self.add_eos = bool(lib.llama_vocab_get_add_eos(self.vocab))
        self._piece_cache: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}
        if self.options.use_mmap and not self.options.vocab_only:
            for p in (self.path, *self.parts):
                populate_mapping(p)
        if unused and self.options.use_mmap and not self.options.use_mlock:
            release_unused([self.path, *self.parts], set(unused), before)
        self.lora = LoraAdapters(self, specs, [self.gguf, *part_infos]) if specs else None
        self.control = None
        if control is not None:
            from .control import control_vector

            self.control = control_vector(control, self.n_embd, self.n_layer, control_range)

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        if getattr(self, "_ptr", None):
            lib.llama_model_free(self._ptr)
            self._ptr = None

    def __del__(self):
        self.close()

    def __enter__(self) -> "LlamaModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def ptr(self):
        if not self._ptr:
            raise UsageError("model is closed")
        return self._ptr

    # ------------------------------------------------------------ metadata

    @property
    def architecture(self) -> str:
        return str(self.gguf.get("general.architecture", "unknown"))

    @property
    def name(self) -> str:
        return str(self.gguf.get("general.name", self.path.stem))

    @property
    def n_params(self) -> int:
        return int(lib.llama_model_n_params(self.ptr))

    @functools.cached_property
    def fingerprint(self) -> str:
        """What caches key their entries by: see GGUFFile.fingerprint (and the LoRA adapters, which change
        every KV state and answer)."""
        if self.lora is None and self.control is None:
            return self.gguf.fingerprint()
        lora = self.lora.fingerprint if self.lora else ""
        control = self.control.fingerprint if self.control else ""
        return hashlib.sha256(f"{self.gguf.fingerprint()}+lora:{lora}+control:{control}".encode()).hexdigest()

    @property
    def chat_template(self) -> str | None:
        value = self.gguf.get("tokenizer.chat_template")
        return str(value) if value is not None else None

    def describe(self) -> str:
        buf = ctypes.create_string_buffer(256)
        lib.llama_model_desc(self.ptr, buf, len(buf))
        return buf.value.decode()

    # ------------------------------------------------------------ tokens

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Text -> token ids; BOS is added when the model asks for it and add_special is set."""
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (lib.llama_token * n_max)()
        n = lib.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:  # cannot happen with one token per byte plus specials, but llama.cpp says so
            n_max = -n
            buf = (lib.llama_token * n_max)()
            n = lib.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            raise ModelLoadError(f"tokenization failed ({n})")
        return list(buf[:n])

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        """The raw bytes of one token (may be part of a multi-byte character)."""
        key = token if not special else -1 - token
        piece = self._piece_cache.get(key)
        if piece is None:
            self.check_tokens([token])
            buf = ctypes.create_string_buffer(64)
            n = lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
            piece = self._piece_cache[key] = buf.raw[:n]
        return piece

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str:
        return b"".join(self.token_bytes(t, special=special) for t in tokens).decode("utf-8", "replace")

    def special_text(self, token: int) -> str:
        """The text of a special token such as BOS ("" when the model has none, i.e. id -1)."""
        return self.detokenize([token], special=True) if 0 <= token < self.n_vocab else ""

    def is_eog(self, token: int) -> bool:
        eog = self._eog.get(token)
        if eog is None:  # asked once per token id: every generated token passes here
            eog = self._eog[token] = bool(lib.llama_vocab_is_eog(self.vocab, token))
        return eog

    def fim_tokens(self) -> dict[str, int | None]:
        """The fill-in-the-middle tokens (prefix, suffix, middle, pad, repo, file_sep) the vocabulary has, by the
        GGUF's keys or, without them, by their usual texts (llama.cpp's own search); None where it has none."""
        getters = {"prefix": lib.llama_vocab_fim_pre, "suffix": lib.llama_vocab_fim_suf,
                   "middle": lib.llama_vocab_fim_mid, "pad": lib.llama_vocab_fim_pad, "repo": lib.llama_vocab_fim_rep,
                   "file_sep": lib.llama_vocab_fim_sep}
        return {name: (t if 0 <= (t := get(self.vocab)) < self.n_vocab else None) for name, get in getters.items()}

    def check_tokens(self, tokens: list[int]) -> None:
        """llama.cpp indexes its tables with token ids unchecked: reject out-of-range ids here."""
        for t in tokens:
            if not 0 <= t < self.n_vocab:
                raise UsageError(f"token id {t} out of range [0, {self.n_vocab})")


MADV_POPULATE_READ = 22  # Linux 5.14+


def populate_mapping(path: Path) -> None:
    """Fault the pages of llama.cpp's memory map of `path` in now, at load, rather than during the first prompt
    (measured on the 0.5B-shape Q8_0, whose weights compute straight from the map: the first pp512 of a fresh
    process ran at 155 t/s against 193-215 for the next ones; 251 against 242-259 with this). Best effort: other
    systems and older kernels skip it, and so does a model larger than half the available memory."""
    if not sys.platform.startswith("linux"):
        return
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        if os.path.getsize(os.path.realpath(path)) > available // 2:
            return  # a model that hardly fits is left to page in on demand
        libc = ctypes.CDLL(None, use_errno=True)
    except (OSError, StopIteration, ValueError):
        return
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    for _, start, end, _ in _file_mappings([path]):
        libc.madvise(start, end - start, MADV_POPULATE_READ)  # an error (EINVAL before 5.14) changes nothing


def _file_mappings(paths: list[Path]) -> set[tuple[str, int, int, int]]:
    """(file, start, end, file offset) of every mapping of `paths` in this process (Linux; else empty)."""
    targets = {os.path.realpath(p) for p in paths}
    out = set()
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n") in targets:
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    out.add((fields[5].rstrip("\n"), start, end, int(fields[2], 16)))
    except OSError:
        pass
    return out


MADV_DONTNEED = 4


def release_unused(paths: list[Path], names: set[str], before: set) -> None:
    """Drop this load's page-table entries for the named tensors (they stay in the page cache, and a read
    would fault them back in): an early-exit tail maps the shared file's token_embd but never reads it."""
    new = _file_mappings(paths) - before
    if not new:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    page = os.sysconf("SC_PAGE_SIZE")
    for p in paths:
        info = read_gguf(p, keep_arrays=False)
        target = os.path.realpath(p)
        for t in info.tensors:
            if t.name not in names:
                continue
            lo, hi = info.data_offset + t.offset, info.data_offset + t.offset + t.n_bytes
            for file, start, end, offset in new:
                if file != target:
                    continue
                a = max(lo, offset)
                b = min(hi, offset + end - start)
                a = -(-a // page) * page  # whole pages inside the tensor only
                b = b // page * page
                if b > a:
                    libc.madvise(start + a - offset, b - a, MADV_DONTNEED)


def _load_mode(options: LoadOptions) -> int:
    if options.use_mmap and options.use_mlock:
        return lib.LLAMA_LOAD_MODE_MMAP_MLOCK
    if options.use_mlock:
        return lib.LLAMA_LOAD_MODE_MLOCK
    return lib.LLAMA_LOAD_MODE_MMAP if options.use_mmap else lib.LLAMA_LOAD_MODE_NONE
