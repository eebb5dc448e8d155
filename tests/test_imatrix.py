"""Importance matrix from llama.cpp's eval callback: equals the activations transformers sees,
round-trips through llama.cpp's imatrix GGUF layout, and steers the quantizer."""
from __future__ import annotations

import numpy as np
import pytest

from edgelm import corpus
from edgelm.converters.imatrix import compute_imatrix, load_imatrix, save_imatrix
from edgelm.converters.quantize import quantize
from edgelm.errors import ConversionError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}
CHUNK = 128


@pytest.fixture(scope="module")
def calib_text():
    return corpus.text("train")[:40_000]


@pytest.fixture(scope="module")
def imatrix(tiny_gguf, calib_text):
    return compute_imatrix(tiny_gguf["f32"], calib_text, chunk_size=CHUNK, max_chunks=4, n_threads=2)


def test_matches_transformers_activations(imatrix, tiny_gguf, tiny_dir, calib_text, tiny_model):
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    sums: dict[str, np.ndarray] = {}

    def hook(name):
        def fn(_module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0).numpy()
        return fn

    for name, module in hf.named_modules():
        for hf_part, gguf_part in HF_TO_GGUF.items():
            if name.endswith(hf_part):
                layer = name.split(".")[2]
                module.register_forward_pre_hook(hook(f"blk.{layer}.{gguf_part}.weight"))
    tokens = tiny_model.tokenize(calib_text)
    with torch.no_grad():
        for i in range(4):  # the same chunks, each from an empty cache and starting with BOS (as llama-imatrix)
            chunk = tokens[i * CHUNK:(i + 1) * CHUNK]
            hf(torch.tensor([[tiny_model.llama.bos] + chunk[1:]]))
    assert set(imatrix.sums) == set(sums)  # every matmul of every layer, the last one included
    for name, want in sums.items():
        assert imatrix.counts[name] == 4 * CHUNK
        np.testing.assert_allclose(imatrix.sums[name], want, rtol=2e-3, err_msg=name)


def test_gguf_round_trip(imatrix, tmp_path):
    path = tmp_path / "imatrix.gguf"
    save_imatrix(imatrix, path)
    back = load_imatrix(path)
    assert back.counts == imatrix.counts and back.chunks == imatrix.chunks == 4
    for name in imatrix.sums:
        np.testing.assert_allclose(back.sums[name], imatrix.sums[name], rtol=1e-6)


def test_imatrix_changes_the_quantization(imatrix, tiny_gguf, tmp_path):
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "weighted.gguf"
    quantize(tiny_gguf["f32"], plain, "iq4_nl")
    quantize(tiny_gguf["f32"], weighted, "iq4_nl", imatrix=imatrix.means())
    assert plain.stat().st_size == weighted.stat().st_size
    assert plain.read_bytes() != weighted.read_bytes()


def test_too_short_calibration_text(tiny_gguf):
    with pytest.raises(ConversionError, match="too short"):
        compute_imatrix(tiny_gguf["f32"], "x = 1", chunk_size=CHUNK)


def test_not_an_imatrix_file(tiny_gguf):
    with pytest.raises(ConversionError, match="not an imatrix"):
        load_imatrix(tiny_gguf["f32"])
