"""The compression pipeline end to end on the tiny model: prune → distill → convert → quantize → early-exit
split, every stage measured, through `edgelm convert`."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgelm.converters.pipeline import parse_prune_spec
from edgelm.errors import ConversionError

pytest.importorskip("transformers")


def test_prune_spec_takes_edgelm_prune_options():
    o = parse_prune_spec("ffn-keep=0.5, hidden-keep=0.75,drop-layers=auto,target-params=2M")
    assert (o.ffn_keep, o.hidden_keep, o.drop_layers, o.target_params) == (0.5, 0.75, "auto", 2_000_000)
    assert parse_prune_spec("tie-embeddings").tie_embeddings == "auto"
    with pytest.raises(ConversionError, match="key=value"):
        parse_prune_spec("ffn-keep=lots")


@pytest.mark.slow
def test_convert_runs_the_whole_pipeline(tiny_dir, tmp_path):
    from edgelm import corpus

    text = tmp_path / "calib.txt"
    text.write_text(corpus.text("train", max_chars=20_000))
    out = tmp_path / "tiny-small.gguf"
    run = subprocess.run(
        [sys.executable, "-m", "edgelm", "convert", str(tiny_dir), "-o", str(out), "--calib", str(text),
         "--prune", "ffn-keep=0.5,drop-layers=1", "--distill", str(text), "--distill-steps", "3",
         "--distill-exit-layers", "1", "--quant", "q4_k_m", "--early-exit", "1", "--threads", "2"],
        capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.with_name(out.name + ".report.json").read_text())
    stages = [s["name"] for s in report["stages"]]
    assert stages == ["source", "pruned", "distilled", "quantized", "early exit"]
    source, pruned, quantized = report["stages"][0], report["stages"][1], report["stages"][3]
    assert pruned["n_params"] < source["n_params"] and quantized["gguf_bytes"] < pruned["gguf_bytes"]
    assert "same tokens" in report["stages"][4]["detail"]
    assert "| early exit |" in run.stdout
    for part in ("ee-shared", "ee1-draft", "ee1-tail"):
        assert (tmp_path / f"tiny-small.{part}.gguf").is_file()
    assert (tmp_path / "tiny-small.exit_heads.safetensors").is_file()  # trained while distilling
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no work folders left behind
