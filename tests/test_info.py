"""edgelm.commands.info on the real stories260K GGUF: the dict, the text report, --json."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from gguf import GGUFReader

from edgelm.commands.info import format_bytes, info, main
from edgelm.errors import EdgelmError, GGUFError
from edgelm.gguf_reader import format_count

STORIES = Path("/work/shared/models/stories260K.gguf")
pytestmark = pytest.mark.skipif(not STORIES.exists(), reason="stories260K.gguf not available")


@pytest.fixture(scope="module")
def n_params() -> int:
    # the count the file holds, from an independent reader
    return sum(int(t.n_elements) for t in GGUFReader(STORIES).tensors)


def test_info_dict(n_params: int):
    s = info(str(STORIES))
    assert s["architecture"] == "llama"
    assert s["n_parameters"] == n_params
    assert s["size_label"] == format_count(n_params)
    assert s["n_layers"] == 5 and s["n_embd"] == 64
    assert (s["n_heads"], s["n_kv_heads"]) == (8, 4)
    assert s["vocab_size"] == 512 and s["tokenizer_model"] == "llama"
    assert s["n_tensors"] == 48
    assert s["bits_per_weight"] == 32.0  # all f32
    assert s["bytes_by_type"] == {"f32": 4 * n_params}
    assert s["file_size"] == STORIES.stat().st_size
    assert "tensors" not in s and "metadata" not in s


@pytest.mark.parametrize(
    "n, label",
    [
        (512, "512"),
        (292_800, "292.8K"),  # stories260K
        (21_900_000, "21.9M"),
        (7_241_732_096, "7.2B"),
    ],
)
def test_format_count(n: int, label: str):
    assert format_count(n) == label


@pytest.mark.parametrize("n, text", [(512, "512 B"), (1_185_376, "1.13 MiB"), (4 << 30, "4.00 GiB")])
def test_format_bytes(n: int, text: str):
    assert format_bytes(n) == text


def test_text_report(capsys, n_params: int):
    assert main([str(STORIES)]) == 0
    out = capsys.readouterr().out
    for line in ("architecture     llama", f"parameters       {format_count(n_params)}", "layers           5",
                 "bits per weight  32.00", "tensor types     f32"):
        assert line in out
    assert "100.0%" in out  # bytes by type
    assert "tensors (" not in out and "metadata (" not in out


def test_text_report_tensors_and_metadata(capsys):
    assert main([str(STORIES), "--tensors", "--metadata"]) == 0
    out = capsys.readouterr().out
    assert "tensors (48)" in out
    assert "token_embd.weight" in out and "64 x 512" in out and "131,072" in out
    assert "metadata (19)" in out
    tokens_line = next(line for line in out.splitlines() if "tokenizer.ggml.tokens" in line)
    assert "'<unk>', '<s>'" in tokens_line and "(512 items)" in tokens_line  # truncated, not 512 tokens
    assert len(tokens_line) < 200


def test_json(capsys, n_params: int):
    assert main([str(STORIES), "--json", "--tensors", "--metadata"]) == 0
    data = json.loads(capsys.readouterr().out)  # exactly one JSON object
    assert data["n_parameters"] == n_params
    assert len(data["tensors"]) == 48
    assert data["tensors"][0] == {"name": "token_embd.weight", "type": "f32", "shape": [64, 512],
                                  "n_bytes": 131072, "offset": 0}
    tokens = data["metadata"]["tokenizer.ggml.tokens"]
    assert tokens["type"] == "array[string]" and tokens["length"] == 512 and len(tokens["value"]) < 512
    assert data["metadata"]["llama.block_count"] == {"type": "uint32", "value": 5}


def test_bad_file_raises_edgelm_error(tmp_path: Path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(GGUFError) as err:
        main([str(bad)])
    assert isinstance(err.value, EdgelmError)  # the dispatcher prints it on one line
    assert "not a GGUF file" in str(err.value)
