"""Quantization through llama.cpp's quantizer: types land in the file, models still run, bad input refused."""
from __future__ import annotations

import pytest

from edgelm.converters import convert
from edgelm.converters.quantize import parse_tensor_types, quantize
from edgelm.errors import ConversionError
from edgelm.gguf_reader import read_gguf


@pytest.mark.parametrize("qtype,expect", [
    ("q4_0", "q4_0"), ("q5_1", "q5_1"), ("iq4_nl", "iq4_nl"),
    # tiny's rows (128) are shorter than a k-quant block (256): llama.cpp falls back, as llama-quantize does
    ("q4_k_m", None),
])
def test_quantize_writes_the_type_and_runs(tiny_gguf, tmp_path, qtype, expect):
    import edgelm

    out = tmp_path / f"tiny-{qtype}.gguf"
    quantize(tiny_gguf["f32"], out, qtype)
    g = read_gguf(out)
    types = {t.type_name.lower() for t in g.tensors}
    if expect:
        assert expect in types
    assert "f32" in types  # norms stay f32
    assert out.stat().st_size < tiny_gguf["f16"].stat().st_size
    with edgelm.load(out, n_ctx=128, n_threads=2) as m:
        assert m.generate("import ", max_tokens=4, temperature=0).tokens


def test_tensor_type_override(tiny_gguf, tmp_path):
    out = tmp_path / "mixed.gguf"
    quantize(tiny_gguf["f32"], out, "q4_0", tensor_types={r"blk\.0\.ffn_down\.weight": "q8_0"})
    g = read_gguf(out)
    assert g.tensor("blk.0.ffn_down.weight").type_name.lower() == "q8_0"
    assert g.tensor("blk.1.ffn_down.weight").type_name.lower() == "q4_0"


def test_convert_with_quant_records_the_pipeline(tiny_dir, tmp_path):
    out = tmp_path / "tiny-q4_0.gguf"
    r = convert(tiny_dir, out, quant="q4_0")
    assert r.path == out and out.is_file()
    assert read_gguf(out).get("edgelm.pipeline") == ["convert:f16", "quantize:q4_0"]
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-q4_0.gguf"]  # no intermediate left


@pytest.mark.parametrize("kwargs,phrase", [
    ({"qtype": "q9_9"}, "unknown quantization type"),
    ({"qtype": "iq2_xxs"}, "needs an importance matrix"),
])
def test_bad_quant_requests(tiny_gguf, tmp_path, kwargs, phrase):
    out = tmp_path / "x.gguf"
    with pytest.raises(ConversionError, match=phrase):
        quantize(tiny_gguf["f32"], out, **kwargs)
    assert not out.exists()


@pytest.mark.parametrize("spec,phrase", [
    ("noequals", "PATTERN=TYPE"), ("blk.*=q7_7", "unknown type"), ("blk.[=q8_0", "bad pattern"),
])
def test_bad_tensor_type_specs(spec, phrase):
    with pytest.raises(ConversionError, match=phrase):
        parse_tensor_types([spec])


def test_convert_with_imatrix_auto(tiny_dir, tmp_path):
    from edgelm import corpus

    out = tmp_path / "tiny-iq4_nl.gguf"
    convert(tiny_dir, out, quant="iq4_nl", imatrix="auto", calib=corpus.text("train")[:20_000])
    assert read_gguf(out).get("edgelm.pipeline") == ["convert:f16", "imatrix", "quantize:iq4_nl"]


def test_imatrix_without_quant_is_refused(tiny_dir, tmp_path):
    with pytest.raises(ConversionError, match="needs --quant"):
        convert(tiny_dir, tmp_path / "x.gguf", imatrix="auto")
