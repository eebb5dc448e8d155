"""HF checkpoint -> GGUF: logits and tokenizer parity with transformers, metadata, bad input."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgelm import corpus
from edgelm.converters import convert
from edgelm.errors import ConversionError
from edgelm.gguf_reader import read_gguf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = ["import os\n\ndef main():\n    return 1", "class Foo(object):\n    \"\"\"A docstring.\"\"\"\n"]


@pytest.fixture(scope="module")
def hf_tiny(tiny_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("outtype,tolerance", [("f32", 1e-3), ("f16", 1e-2)])
def test_logits_match_transformers(tiny_gguf, hf_tiny, outtype, tolerance):
    import edgelm

    with edgelm.load(tiny_gguf[outtype], n_ctx=256, n_threads=2) as m:
        for prompt in PROMPTS:
            ids = m.tokenize(prompt)
            with torch.no_grad():
                ref = hf_tiny(torch.tensor([ids])).logits[0].numpy()
            for pos in range(len(ids)):  # every position, one decode each
                m.ctx.clear()
                m.ctx.decode(ids[:pos + 1], 0)
                got = m.ctx.logits()
                spread = ref[pos].max() - ref[pos].min()
                assert np.abs(got - ref[pos]).max() <= tolerance * spread, (outtype, pos)
                assert got.argmax() == ref[pos].argmax(), (outtype, pos)


def test_tokenization_matches_hf_on_heldout(tiny_model, tiny_dir):
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    texts = [d.text for d in corpus.documents("heldout")]
    texts += ["  leading spaces\n\n\ttabs\r\n", "numbers 1234567 3.14159 0x1F", "accents: café naïve Ωmega",
              "CJK: 日本語のテキスト 中文", "emoji: 🙂👍🏽 🇫🇷", "x = {'a': [1, 2]}  # comment   \n"]
    for text in texts:
        assert tiny_model.tokenize(text) == hf.encode(text).ids, text[:60]


def test_metadata_keys(tiny_gguf):
    g = read_gguf(tiny_gguf["q8_0"])
    assert g.get("general.architecture") == "llama"
    for key in ("llama.context_length", "llama.embedding_length", "llama.block_count", "llama.feed_forward_length",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.dimension_count",
                "llama.attention.layer_norm_rms_epsilon", "tokenizer.ggml.model", "tokenizer.ggml.pre",
                "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template", "edgelm.source.sha256"):
        assert g.get(key) is not None, key
    assert g.get("tokenizer.ggml.pre") == "llama-bpe"
    types = {t.type_name for t in g.tensors}
    assert {"q8_0", "f32"} == {t.lower() for t in types}  # norms stay f32


@pytest.fixture
def ckpt_copy(tmp_path, tiny_dir):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, dst)
    return dst


def _mutate_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


BAD_INPUTS = [
    # (mutation, phrase expected in the error)
    (lambda d: (d / "config.json").unlink(), "missing config.json"),
    (lambda d: _mutate_config(d, architectures=["GPTNeoXForCausalLM"]), "unsupported architecture"),
    (lambda d: _mutate_config(d, hidden_size=256), "shape"),
    (lambda d: (d / "tokenizer.json").unlink(), "missing tokenizer.json"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100_000]), "truncated"),
    (lambda d: (d / "model.safetensors").unlink(), "no weight files"),
]


@pytest.mark.parametrize("mutate,phrase", BAD_INPUTS)
def test_bad_checkpoint_is_a_clear_error_and_writes_nothing(ckpt_copy, tmp_path, mutate, phrase):
    mutate(ckpt_copy)
    out = tmp_path / "out.gguf"
    with pytest.raises(ConversionError, match=phrase):
        convert(ckpt_copy, out)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.gguf*"))  # no temporary left behind


def test_missing_tensor(ckpt_copy, tmp_path):
    from safetensors.numpy import load_file, save_file

    ref = ckpt_copy / "model.safetensors"
    tensors = load_file(ref)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, ref)
    with pytest.raises(ConversionError, match="missing tensor"):
        convert(ckpt_copy, tmp_path / "out.gguf")


def test_failed_write_leaves_no_output(tiny_dir, tmp_path):
    """A write that fails part-way (file-size limit) leaves neither OUT nor a temporary."""
    import subprocess
    import sys

    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))\n"
        "from edgelm.converters import convert\n"
        "from edgelm.errors import ConversionError\n"
        f"try:\n    convert({str(tiny_dir)!r}, {str(tmp_path / 'out.gguf')!r}, outtype='f32')\n"
        "except ConversionError as e:\n    print('ERR', e); sys.exit(3)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    assert "write failed" in r.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mask", [0o022, 0o077], ids=["umask-022", "umask-077"])
def test_output_permissions_follow_the_umask(tiny_dir, tmp_path, mask):
    """A converted model gets what open() would give it (0666 less the umask), not the 0600 of its temporary."""
    import subprocess
    import sys

    out = tmp_path / "out.gguf"
    code = (f"import os; os.umask({mask})\nfrom edgelm.converters import convert\n"
            f"convert({str(tiny_dir)!r}, {str(out)!r}, outtype='q8_0')\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask


def test_output_folder_not_writable(tiny_dir, tmp_path):
    with pytest.raises(ConversionError, match="does not exist"):
        convert(tiny_dir, tmp_path / "no" / "such" / "dir" / "out.gguf")


def _as_pickle(d, sharded: bool = False):
    """Replace the safetensors weights with torch-pickled ones (optionally two shards and an index)."""
    from safetensors.torch import load_file

    state = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    if not sharded:
        torch.save(state, d / "pytorch_model.bin")
        return
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, part in shards.items():
        torch.save({n: state[n] for n in part}, d / file)
    index = {"weight_map": {n: f for f, part in shards.items() for n in part}}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def test_pickled_weights_need_allow_pickle(ckpt_copy, tmp_path):
    _as_pickle(ckpt_copy)
    with pytest.raises(ConversionError, match="--allow-pickle"):
        convert(ckpt_copy, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("sharded", [False, True])
def test_pickled_weights_convert_like_safetensors(ckpt_copy, tmp_path, tiny_gguf, sharded):
    _as_pickle(ckpt_copy, sharded=sharded)
    out = convert(ckpt_copy, tmp_path / "out.gguf", outtype="f32", allow_pickle=True).path
    ref, got = read_gguf(tiny_gguf["f32"]), read_gguf(out)
    assert sorted((t.name, t.shape) for t in got.tensors) == sorted((t.name, t.shape) for t in ref.tensors)
    for t in ref.tensors:  # shards may change the order, never the data
        assert ref.tensor_bytes(t) == got.tensor_bytes(got.tensor(t.name)), t.name


def test_early_exit_files_beside_the_weights_are_not_weights(ckpt_copy, tmp_path, tiny_gguf):
    """exit_heads.safetensors and exit_blocks.safetensors are read by the early-exit split, not converted."""
    from safetensors.numpy import save_file

    save_file({"exit_norm.2.weight": np.ones(64, np.float32)}, str(ckpt_copy / "exit_heads.safetensors"))
    save_file({"exit_block.2.ffn_gate.weight": np.ones((8, 64), np.float32)}, str(ckpt_copy / "exit_blocks.safetensors"))
    out = convert(ckpt_copy, tmp_path / "out.gguf", outtype="f32").path
    ref, got = read_gguf(tiny_gguf["f32"]), read_gguf(out)
    assert sorted(t.name for t in got.tensors) == sorted(t.name for t in ref.tensors)


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_hostile_pickle_is_refused_even_with_allow_pickle(ckpt_copy, tmp_path, monkeypatch):
    import pickle

    monkeypatch.chdir(tmp_path)
    (ckpt_copy / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": _Exploit()}, ckpt_copy / "pytorch_model.bin", pickle_module=pickle)
    with pytest.raises(ConversionError, match="cannot load pickled weights safely"):
        convert(ckpt_copy, tmp_path / "out.gguf", allow_pickle=True)
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "out.gguf").exists()


def test_license_from_model_card(ckpt_copy, tmp_path):
    (ckpt_copy / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n  - code\n---\n# A model\nlicense: no\n")
    g = read_gguf(convert(ckpt_copy, tmp_path / "out.gguf", outtype="q8_0").path)
    assert g.get("general.license") == "apache-2.0"
    assert g.get("general.size_label") == "2.9M"
    assert g.get("edgelm.pipeline") == ["convert:q8_0"]


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_row_blocks_write_the_same_bytes(tiny_dir, tiny_gguf, tmp_path, monkeypatch, outtype):
    """Large tensors stream in row blocks; forcing tiny blocks must not change a byte."""
    from edgelm.converters import export

    monkeypatch.setattr(export, "CHUNK_ELEMENTS", 5000)  # 32+ rows per block: every matrix splits
    out = convert(tiny_dir, tmp_path / "blocks.gguf", outtype=outtype).path
    assert out.read_bytes() == tiny_gguf[outtype].read_bytes()
