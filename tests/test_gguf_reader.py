"""edgelm.gguf_reader: a real third-party GGUF, then a corpus of malformed files built here.

Malformed files are only ever given to read_gguf: llama.cpp may abort the whole
process on them, which is the reason the reader exists.
"""
from __future__ import annotations

import random
import struct
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES

from edgelm.errors import GGUFError, ModelNotFoundError
from edgelm.gguf_reader import GGML_TYPES, REMOVED_GGML_TYPES, read_gguf

STORIES = Path("/work/shared/models/stories260K.gguf")
needs_stories = pytest.mark.skipif(not STORIES.exists(), reason="stories260K.gguf not available")


# --- the real model ----------------------------------------------------------

@needs_stories
def test_stories260k_summary():
    g = read_gguf(STORIES)
    assert g.version == 3 and g.alignment == 32
    assert g.architecture == "llama"
    assert g.get("llama.block_count") == 5
    assert g.get("missing.key", "dflt") == "dflt"
    assert g.metadata_types["tokenizer.ggml.tokens"] == "array[string]"
    assert g.metadata_types["llama.attention.layer_norm_rms_epsilon"] == "float32"
    assert len(g.metadata["tokenizer.ggml.tokens"]) == 512
    assert g.metadata["tokenizer.ggml.tokens"][:3] == ["<unk>", "<s>", "</s>"]
    assert {t.type_name for t in g.tensors} == {"f32"}
    assert g.bytes_by_type() == {"f32": sum(t.n_bytes for t in g.tensors)}
    assert g.tensor("token_embd.weight").shape == (64, 512)  # ggml order: ne0 = n_embd
    with pytest.raises(KeyError):
        g.tensor("no.such.tensor")


@needs_stories
def test_stories260k_matches_gguf_package():
    ours, ref = read_gguf(STORIES), GGUFReader(STORIES)
    assert len(ours.tensors) == len(ref.tensors)
    assert ours.n_parameters == sum(int(t.n_elements) for t in ref.tensors)
    assert ours.data_offset == ref.data_offset
    for t, r in zip(ours.tensors, ref.tensors):
        assert (t.name, t.shape, t.n_bytes) == (r.name, tuple(int(d) for d in r.shape), int(r.n_bytes))
        assert ours.data_offset + t.offset == r.data_offset  # gguf-py reports absolute offsets
    assert ours.file_size == STORIES.stat().st_size


def test_type_table_matches_gguf_package():
    for type_id, gtype in GGML_TYPES.items():
        ref = next((v for k, v in GGML_QUANT_SIZES.items() if int(k) == type_id), None)
        if ref is None or type_id == 9:  # gguf-py predates q2_0; its q8_1 (40 B) is stale, ggml says 36
            continue
        assert (gtype.block_size, gtype.type_size) == ref, gtype.name
    assert not set(GGML_TYPES) & set(REMOVED_GGML_TYPES)


# --- a small valid file and its byte positions -------------------------------

def _write_valid(path: Path, names: tuple[str, ...] = ("t.aaaa", "t.bbbb", "t.cccc")) -> bytes:
    w = GGUFWriter(path, "testarch")
    w.add_custom_alignment(32)
    w.add_string("test.key_a", "hello")  # test.key_a / test.key_b: same length, for the duplicate case
    w.add_uint32("test.key_b", 7)
    w.add_array("test.tokens", ["<s>", "</s>", "a", "b"])
    w.add_array("test.ints", [1, 2, 3])
    shapes = [(2, 8), (4,), (8,)]  # numpy order; the last tensor is 32 bytes, so the file ends unpadded
    for name, shape in zip(names, shapes):
        w.add_tensor(name, np.ones(shape, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@pytest.fixture
def valid(tmp_path: Path) -> bytes:
    return _write_valid(tmp_path / "valid.gguf")


def _after(b: bytes, marker: str) -> int:
    """Position just past the (unique) string `marker` in the file."""
    pos = b.find(marker.encode())
    assert pos >= 0 and b.find(marker.encode(), pos + 1) < 0, marker
    return pos + len(marker)


def _put(b: bytes, pos: int, fmt: str, value) -> bytes:
    out = bytearray(b)
    struct.pack_into("<" + fmt, out, pos, value)
    return bytes(out)


def _set_key(b: bytes, key: str, fmt: str, value, skip: int = 0) -> bytes:
    # skip: bytes past the key (0 = value type, 4 = array element type / scalar value, 8 = array length)
    return _put(b, _after(b, key) + skip, fmt, value)


def _token(b: bytes, text: str) -> int:
    """Where the one-byte token string `text` of test.tokens starts."""
    return b.index(struct.pack("<Q", 1) + text.encode(), _after(b, "test.tokens")) + 8


def _set_tensor(b: bytes, name: str, field: str, value, dim: int = 0) -> bytes:
    p = _after(b, name)
    n_dims = struct.unpack_from("<I", b, p)[0]
    pos = {"n_dims": p, "dim": p + 4 + 8 * dim, "type": p + 4 + 8 * n_dims, "offset": p + 8 + 8 * n_dims}[field]
    return _put(b, pos, {"n_dims": "I", "dim": "q", "type": "i", "offset": "Q"}[field], value)


def _rename(b: bytes, old: str, new: str) -> bytes:
    assert len(old) == len(new)
    p = _after(b, old) - len(old)
    return b[:p] + new.encode() + b[p + len(new):]


DATA_OFFSET = 416  # where the valid file's tensor data starts (checked below)

# (case id, valid bytes -> malformed bytes, phrase the error must contain)
CORPUS: list[tuple[str, Callable[[bytes], bytes], str]] = [
    ("empty", lambda b: b"", "not a GGUF file (empty file)"),
    ("zip", lambda b: b"PK\x03\x04" + bytes(60), "not a GGUF file (magic b'PK\\x03\\x04')"),
    ("text", lambda b: b"hello, world\n" * 4, "not a GGUF file (magic b'hell')"),
    ("three bytes", lambda b: b"GGU", "not a GGUF file (only 3 bytes)"),
    ("version 0", lambda b: _put(b, 4, "I", 0), "bad GGUF version 0"),
    ("version 1", lambda b: _put(b, 4, "I", 1), "GGUF v1 is no longer supported"),
    ("version 4", lambda b: _put(b, 4, "I", 4), "unsupported GGUF version 4"),
    ("big-endian", lambda b: _put(b, 4, "I", 0x03000000), "byte-swapped"),
    # truncation at several points
    ("cut in header", lambda b: b[:12], "truncated: header runs past end of file"),
    # (inside the last token string: earlier cuts trip the up-front count bound instead)
    ("cut in key-value", lambda b: b[:b.find(b"test.ints") - 10], "truncated: key-value 4 of 6 ('test.tokens') runs past"),
    ("cut in tensor info", lambda b: b[:_after(b, "t.bbbb") + 6], "truncated: tensor info 1 of 3 ('t.bbbb')"),
    ("cut before data", lambda b: b[:DATA_OFFSET - 4], "truncated: data section starts at 416"),
    ("cut in data", lambda b: b[:-4], "truncated: tensor 2 of 3 ('t.cccc') data [512, 544)"),
    # counts and lengths bounded by the file size
    ("huge tensor count", lambda b: _put(b, 8, "q", 1 << 40), "tensor count 1099511627776 cannot fit"),
    ("negative tensor count", lambda b: _put(b, 8, "q", -1), "tensor count -1 is negative"),
    ("huge kv count", lambda b: _put(b, 16, "q", 1 << 40), "key-value count 1099511627776 cannot fit"),
    ("counts fit apart, not together", lambda b: _put(b, 16, "q", 33), "33 key-values and 3 tensor infos cannot fit"),
    ("string over llama.cpp's cap", lambda b: _put(b, 24, "Q", 1 << 62), "exceeds llama.cpp's limit"),
    ("string past end", lambda b: _put(b, 24, "Q", 10**6), "string of 1000000 bytes) runs past end of file"),
    ("array over llama.cpp's cap", lambda b: _set_key(b, "test.tokens", "Q", 1 << 50, 8), "1125899906842624 exceeds"),
    ("array past end", lambda b: _set_key(b, "test.ints", "Q", 10**6, 8), "array length 1000000 cannot fit"),
    ("invalid UTF-8 key", lambda b: _put(b, _after(b, "test.key_a") - 1, "B", 0xFF), "string is not valid UTF-8"),
    # token strings "a", "b" -> b"\xc3", b"\xa9": each invalid alone, "é" if read as one
    ("split UTF-8 across elements", lambda b: _put(_put(b, _token(b, "a"), "B", 0xC3), _token(b, "b"), "B", 0xA9),
     "key 'test.tokens' element 2 of 4: string is not valid UTF-8"),
    ("array string over llama.cpp's cap", lambda b: _put(b, _token(b, "a") - 8, "Q", 1 << 62),
     "key 'test.tokens' element 2 of 4: string length 4611686018427387904 exceeds"),
    ("array string past end", lambda b: _put(b, _token(b, "b") - 8, "Q", 10**6),
     "key 'test.tokens' element 3 of 4 (string of 1000000 bytes) runs past end of file"),
    ("empty key", lambda b: _put(b, _after(b, "test.key_a") - len("test.key_a") - 8, "Q", 0), "key-value 2 of 6: empty key"),
    # value types
    ("unknown value type", lambda b: _set_key(b, "test.key_b", "i", 13), "key 'test.key_b' has unknown value type 13"),
    ("unknown element type", lambda b: _set_key(b, "test.ints", "i", 99, 4), "unknown array element type 99"),
    ("nested array", lambda b: _set_key(b, "test.ints", "i", 9, 4), "nested array"),
    ("duplicate key", lambda b: _rename(b, "test.key_b", "test.key_a"), "duplicate key 'test.key_a'"),
    # alignment
    ("alignment 3", lambda b: _set_key(b, "general.alignment", "I", 3, 4), "general.alignment is 3, not a power of two"),
    ("alignment 0", lambda b: _set_key(b, "general.alignment", "I", 0, 4), "general.alignment is 0, not a power of two"),
    ("alignment int32", lambda b: _set_key(b, "general.alignment", "i", 5), "must be of type uint32 but is int32"),
    # tensor infos
    ("duplicate tensor name", lambda b: _rename(b, "t.bbbb", "t.aaaa"), "duplicate tensor name 't.aaaa'"),
    ("n_dims 0", lambda b: _set_tensor(b, "t.bbbb", "n_dims", 0), "'t.bbbb' has 0 dimensions"),
    ("n_dims 5", lambda b: _set_tensor(b, "t.bbbb", "n_dims", 5), "'t.bbbb' has 5 dimensions"),
    ("zero dim", lambda b: _set_tensor(b, "t.aaaa", "dim", 0, 1), "dimension 1 is 0"),
    ("negative dim", lambda b: _set_tensor(b, "t.aaaa", "dim", -8), "dimension 0 is -8"),
    ("dims overflow int64", lambda b: _set_tensor(_set_tensor(b, "t.aaaa", "dim", 1 << 40), "t.aaaa", "dim", 1 << 40, 1),
     "overflows int64"),
    ("removed ggml type", lambda b: _set_tensor(b, "t.bbbb", "type", 31), "removed ggml type 31 (q4_0_4_4)"),
    ("deprecated ggml type", lambda b: _set_tensor(b, "t.bbbb", "type", 4), "removed ggml type 4 (q4_2)"),
    ("unknown ggml type", lambda b: _set_tensor(b, "t.bbbb", "type", 43), "unknown ggml type 43"),
    ("negative ggml type", lambda b: _set_tensor(b, "t.bbbb", "type", -1), "unknown ggml type -1"),
    ("row not whole blocks", lambda b: _set_tensor(b, "t.aaaa", "type", 8), "not a multiple of the block size 32"),
    # data layout
    ("offset past end", lambda b: _set_tensor(b, "t.cccc", "offset", 1 << 40), "runs past end of file"),
    ("misaligned offset", lambda b: _set_tensor(b, "t.bbbb", "offset", 65), "offset 65 is not a multiple of the alignment"),
    ("overlapping tensors", lambda b: _set_tensor(b, "t.bbbb", "offset", 32), "offset 32 overlaps tensor 't.aaaa'"),
    ("gap between tensors", lambda b: _set_tensor(b, "t.bbbb", "offset", 96), "has offset 96, expected 64"),
]


def test_valid_file_reads(valid: bytes, tmp_path: Path):
    g = read_gguf(tmp_path / "valid.gguf")
    assert g.data_offset == DATA_OFFSET and g.file_size == len(valid)
    assert [(t.name, t.shape, t.offset, t.n_bytes) for t in g.tensors] == [
        ("t.aaaa", (8, 2), 0, 64), ("t.bbbb", (4,), 64, 16), ("t.cccc", (8,), 96, 32),
    ]
    assert g.metadata["test.tokens"] == ["<s>", "</s>", "a", "b"]
    assert g.metadata_types["test.ints"] == "array[int32]"
    assert g.n_parameters == 28


@pytest.mark.parametrize("case, mutate, phrase", CORPUS, ids=[c[0] for c in CORPUS])
def test_malformed_file_rejected(valid: bytes, tmp_path: Path, case: str, mutate, phrase: str):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(mutate(valid))
    for keep_arrays in (True, False):  # the same checks whether arrays are kept or only walked
        with pytest.raises(GGUFError) as err:
            read_gguf(bad, keep_arrays=keep_arrays)
        message = str(err.value)
        assert message.startswith(f"{bad}: ") and "\n" not in message  # the CLI prints it as one line
        assert phrase in message


def test_tensor_name_too_long(tmp_path: Path):
    path = tmp_path / "long.gguf"
    _write_valid(path, names=("t.aaaa", "x" * 64, "t.cccc"))
    with pytest.raises(GGUFError, match="is too long \\(64 bytes, llama.cpp allows 63\\)"):
        read_gguf(path)


def test_metadata_budget(tmp_path: Path, valid: bytes):
    with pytest.raises(GGUFError, match="max_metadata_bytes=100"):
        read_gguf(tmp_path / "valid.gguf", max_metadata_bytes=100)


def test_check_data_false_reads_a_partial_download(tmp_path: Path, valid: bytes):
    part = tmp_path / "part.gguf"
    part.write_bytes(valid[:DATA_OFFSET - 4])  # tensor infos complete (409 bytes), no tensor data
    assert len(read_gguf(part, check_data=False).tensors) == 3
    part.write_bytes(_set_tensor(valid, "t.bbbb", "offset", 65)[:DATA_OFFSET])
    with pytest.raises(GGUFError, match="alignment"):  # layout checks still run
        read_gguf(part, check_data=False)


def test_missing_file(tmp_path: Path):
    with pytest.raises(ModelNotFoundError):
        read_gguf(tmp_path / "nope.gguf")
    with pytest.raises(GGUFError, match="cannot read"):
        read_gguf(tmp_path)  # a directory


def test_every_prefix_and_corruption_rejected_cleanly(valid: bytes, tmp_path: Path):
    """Whatever the damage, read_gguf answers with GGUFError or a parse, never another exception.

    This is the guarantee that keeps malformed files away from llama.cpp's asserts.
    """
    path = tmp_path / "fuzz.gguf"
    for n in range(len(valid)):  # every proper prefix: the valid file has no trailing padding
        path.write_bytes(valid[:n])
        with pytest.raises(GGUFError):
            read_gguf(path)
    rng = random.Random(0)
    for _ in range(400):  # random byte damage in the header, metadata and tensor infos
        damaged = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(DATA_OFFSET)] = rng.randrange(256)
        path.write_bytes(bytes(damaged))
        try:
            read_gguf(path)
        except GGUFError:
            pass


def test_keep_arrays_false_validates_but_keeps_only_lengths(tmp_path):
    from edgelm.gguf_reader import SkippedArray
    from edgelm.runtime.model import default_model_path

    full = read_gguf(default_model_path())
    light = read_gguf(default_model_path(), keep_arrays=False)
    assert light.data_offset == full.data_offset and light.tensors == full.tensors
    tokens = light.get("tokenizer.ggml.tokens")
    assert isinstance(tokens, SkippedArray) and tokens.length == len(full.get("tokenizer.ggml.tokens")) == 8192
    assert {k: v for k, v in light.metadata.items() if not isinstance(v, SkippedArray)} == \
        {k: v for k, v in full.metadata.items() if not isinstance(v, list)}
    cut = tmp_path / "cut.gguf"  # cut inside the token array: still an error without keeping it
    cut.write_bytes(default_model_path().read_bytes()[:200_000])
    with pytest.raises(GGUFError, match="truncated|cannot fit"):
        read_gguf(cut, keep_arrays=False)
