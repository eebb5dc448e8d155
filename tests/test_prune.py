"""Pruning: each edit leaves a standard checkpoint whose transformers and llama.cpp logits agree, edits that
must not change the function do not, and bad requests are one-line errors that leave files alone."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import save_random_checkpoint
from edgelm.converters import convert
from edgelm.converters.calibrate import compute_calibration
from edgelm.converters.prune import PruneOptions, head_layout, make_plan, prune
from edgelm.converters.surgery import (Weights, drop_layers, fold_norms, keep_ffn_channels, keep_heads, mlp,
                                       principal_basis, rotate_hidden, sparsify, tie_embeddings)
from edgelm.errors import ConversionError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT = 'def area(r):\n    """Circle area."""\n    return 3.14159 * r * r\n\n\nclass Stack:\n    pass\n'
TEXT_CHARS = 12_000


@pytest.fixture(scope="module")
def calib_text():
    from edgelm import corpus

    return corpus.text("train", max_chars=TEXT_CHARS)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    w = Weights.load(tiny_dir)
    w.dtype = "float32"  # exact comparisons: no f16 rounding on save
    return w


def llama_logits(path, ids=None):
    import edgelm

    with edgelm.load(path, n_ctx=128, n_threads=2, type_k="f32", type_v="f32", flash_attn=False) as m:
        ids = ids or m.tokenize(PROMPT)
        m.ctx.clear()
        m.ctx.decode(ids, 0, logits_from=0)
        return ids, m.ctx.all_logits(len(ids))


def saved(w: Weights, tmp_path, name: str):
    ckpt = w.save(tmp_path / name)
    return ckpt, convert(ckpt, tmp_path / f"{name}.gguf", outtype="f32").path


def assert_same_function(a: np.ndarray, b: np.ndarray, tol: float = 1e-4):
    err = np.abs(a - b).max() / (b.max() - b.min())
    assert err <= tol, f"{err:.2e} of the logit range"


def random_checkpoint(case: str, out, tiny_dir):
    """A random qwen2 (q/k/v biases, tied) or qwen3 (q/k norms) checkpoint with 4 KV groups of 2."""
    cls, cfg_cls, extra = {"qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {"tie_word_embeddings": True}),
                           "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {"head_dim": 16})}[case]
    config = getattr(transformers, cfg_cls)(vocab_size=8192, hidden_size=128, intermediate_size=256,
                                            num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4,
                                            max_position_embeddings=256, bos_token_id=0, eos_token_id=1,
                                            pad_token_id=2, initializer_range=0.1, **extra)
    save_random_checkpoint(cls, config, out, tiny_dir)
    return out


# ---------------------------------------------------------------- edits that keep the function
def test_folding_norms_and_rotating_with_every_direction_keeps_the_logits(tiny, tmp_path):
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((128, 128)))
    rotated = rotate_hidden(fold_norms(tiny), q.astype(np.float32))
    ids, ref = llama_logits(saved(tiny, tmp_path, "orig")[1])
    _, got = llama_logits(saved(rotated, tmp_path, "rot")[1], ids)
    assert_same_function(got, ref)


def test_removing_ffn_channels_equals_zeroing_their_down_projection(tiny, tmp_path):
    keep = [np.arange(0, 384, 2) for _ in range(tiny.n_layer)]  # every other channel
    zeroed = dict(tiny.tensors)
    for i in range(tiny.n_layer):
        down = zeroed[mlp(i, "down_proj")].copy()
        down[:, 1::2] = 0
        zeroed[mlp(i, "down_proj")] = down
    ids, ref = llama_logits(saved(tiny.with_(tiny.config, zeroed), tmp_path, "zeroed")[1])
    pruned = keep_ffn_channels(tiny, keep)
    assert pruned.config["intermediate_size"] == 192
    _, got = llama_logits(saved(pruned, tmp_path, "pruned")[1], ids)
    assert_same_function(got, ref)


def test_removing_query_heads_equals_zeroing_their_output_columns(tiny, tmp_path):
    # 4 heads in 2 KV groups: keep head 1 of group 0 and head 0 of group 1 (global heads 1 and 2)
    zeroed = dict(tiny.tensors)
    for i in range(tiny.n_layer):
        o = zeroed[f"model.layers.{i}.self_attn.o_proj.weight"].copy()
        o[:, 0:32] = 0
        o[:, 96:128] = 0
        zeroed[f"model.layers.{i}.self_attn.o_proj.weight"] = o
    ids, ref = llama_logits(saved(tiny.with_(tiny.config, zeroed), tmp_path, "zeroed")[1])
    pruned = keep_heads(tiny, [np.array([0, 1])] * tiny.n_layer, [[np.array([1]), np.array([0])]] * tiny.n_layer)
    assert (pruned.n_head, pruned.n_head_kv, pruned.head_dim) == (2, 2, 32)
    _, got = llama_logits(saved(pruned, tmp_path, "pruned")[1], ids)
    assert_same_function(got, ref)


# ---------------------------------------------------------------- standard checkpoints: transformers == llama.cpp
EDITS = {
    # name: edit of a loaded checkpoint
    "drop": lambda w: drop_layers(w, [1]),
    "heads-within-groups": lambda w: keep_heads(w, [np.arange(w.n_head_kv)] * w.n_layer,
                                               [[np.array([0])] * w.n_head_kv] * w.n_layer),
    "heads-whole-groups": lambda w: keep_heads(w, [np.array([0, 2][: max(1, w.n_head_kv // 2)])] * w.n_layer,
                                              [[np.arange(w.n_head // w.n_head_kv)] * max(1, w.n_head_kv // 2)]
                                              * w.n_layer),
    "ffn": lambda w: keep_ffn_channels(w, [np.arange(0, w.config["intermediate_size"], 2)] * w.n_layer),
    "hidden": lambda w: rotate_hidden(fold_norms(w), np.linalg.qr(np.random.default_rng(1).standard_normal(
        (w.config["hidden_size"],) * 2))[0][:, : w.config["hidden_size"] * 3 // 4].astype(np.float32)),
    "tie": lambda w: tie_embeddings(w, "head") if not w.tied else drop_layers(w, []),
}


@pytest.mark.parametrize("case", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("edit", list(EDITS))
def test_pruned_checkpoints_load_in_transformers_with_llama_cpp_logit_parity(case, edit, tiny_dir, tmp_path):
    src = tiny_dir if case == "llama" else random_checkpoint(case, tmp_path / "src", tiny_dir)
    w = Weights.load(src)
    w.dtype = "float32"
    pruned = EDITS[edit](w)
    ckpt, gguf = saved(pruned, tmp_path, "pruned")
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    assert sum(p.numel() for p in hf.parameters()) == pruned.n_params == pruned.predicted_params(pruned.config)
    ids, got = llama_logits(gguf)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    assert_same_function(got, ref, 1e-3)
    assert (got.argmax(axis=1) == ref.argmax(axis=1)).all()


# ---------------------------------------------------------------- calibration and the stage
def test_calibration_statistics(tiny_gguf, calib_text):
    cal = compute_calibration(tiny_gguf["f32"], calib_text, max_chunks=3, n_threads=2)
    assert cal.n_tokens == 3 * 256 and cal.influence.shape == (4,)
    assert ((cal.influence > 0) & (cal.influence < 2)).all()
    # every normalized row has mean square 1 (before the norm's weight): the trace counts rows × hidden
    rows = cal.n_tokens * (2 * 4 + 1)
    assert cal.covariance.trace() == pytest.approx(rows * 128, rel=1e-3)
    assert cal.rms("blk.0.ffn_down.weight").shape == (384,)
    basis = principal_basis(cal.covariance)
    assert np.allclose(basis.T @ basis, np.eye(128), atol=1e-4)


def test_prune_writes_a_checkpoint_and_a_report_per_step(tiny_dir, tmp_path, calib_text):
    out = tmp_path / "pruned"
    opts = PruneOptions(drop_layers=1, heads_keep=0.5, ffn_keep=0.5, hidden_keep=0.75, calib_chunks=2, n_threads=2)
    report = prune(tiny_dir, out, calib=calib_text, heldout=calib_text[-3000:], options=opts)
    assert [s.name for s in report.steps] == ["original", "depth", "heads", "ffn", "hidden"]
    params = [s.n_params for s in report.steps]
    assert params == sorted(params, reverse=True) and len(set(params)) == 5
    assert all(s.perplexity > 1 and s.gguf_bytes > 0 and s.tokens_per_second > 0 for s in report.steps)
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["intermediate_size"],
            config["hidden_size"]) == (3, 2, 192, 96)
    assert json.loads((out / "prune_report.json").read_text())["steps"][-1]["n_params"] == params[-1]
    assert "| hidden |" in (out / "prune_report.md").read_text()
    assert Weights.load(out).n_params == params[-1]
    from edgelm.fsutil import umask
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask()  # a folder as mkdir() makes it, not mkdtemp()'s 0700


def test_depth_drops_the_lowest_influence_layers(tiny_dir, tiny_gguf, tmp_path, calib_text):
    cal = compute_calibration(tiny_gguf["f32"], calib_text, max_chunks=2, n_threads=2)
    report = prune(tiny_dir, tmp_path / "out", calib=calib_text, heldout=calib_text[-2000:],
                   options=PruneOptions(drop_layers=2, calib_chunks=2, n_threads=2))
    assert f"{sorted(np.argsort(cal.influence)[:2].tolist())}" in report.steps[1].detail


def test_target_params_lands_at_or_under_the_target(tiny, tmp_path):
    target = tiny.n_params // 2
    plan = make_plan(tiny, PruneOptions(target_params=target))
    predicted = tiny.predicted_params(plan.config(tiny))
    assert predicted <= target and predicted > 0.8 * target
    assert plan.ffn and plan.hidden and plan.ffn % 32 == 0 and plan.hidden % 32 == 0


def test_sparsity_zeroes_each_row_and_keeps_shapes(tiny):
    rms = {n: np.ones(a.shape[1], np.float32) for n, a in tiny.tensors.items() if n.endswith("_proj.weight")}
    for method in ("magnitude", "wanda"):
        sparse = sparsify(tiny, 0.5, method, rms)
        a = sparse.tensors[mlp(0, "up_proj")]
        assert a.shape == tiny.tensors[mlp(0, "up_proj")].shape
        assert ((a == 0).sum(axis=1) == a.shape[1] // 2).all()


# ---------------------------------------------------------------- bad input: one clear error, nothing lost
@pytest.mark.parametrize("options,phrase", [
    # a ratio outside (0, 1]
    (dict(ffn_keep=0.0), "must be in (0, 1]"),
    (dict(hidden_keep=1.5), "must be in (0, 1]"),
    # removing every layer
    (dict(drop_layers=4), "remove every one of the 4 layers"),
    # 3 of 4 heads do not split over 2 KV groups
    (dict(heads_keep=0.75), "breaks the 2 GQA groups"),
    (dict(ffn_keep="auto"), "needs --target-params"),
    (dict(target_params=10), "out of reach"),
    (dict(target_params=10**9), "not below"),
    (dict(sparsity=1.0), "--sparsity must be in (0, 1)"),
])
def test_bad_requests_are_clear_errors(tiny, options, phrase):
    with pytest.raises(ConversionError, match=phrase.replace("(", r"\(").replace(")", r"\)")):
        make_plan(tiny, PruneOptions(**options))


def test_head_layout_keeps_gqa_groups_whole():
    assert head_layout(8, 4, 0.5) == (4, 1)  # one query head per group
    assert head_layout(8, 2, 0.5) == (2, 2)
    assert head_layout(12, 4, 2 / 3) == (4, 2)
    with pytest.raises(ConversionError, match="valid head counts"):
        head_layout(8, 2, 0.375)


def test_existing_output_and_unsupported_architectures_are_refused(tiny_dir, tmp_path, calib_text):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not empty"):
        prune(tiny_dir, out, calib=calib_text, options=PruneOptions(ffn_keep=0.5))
    assert (out / "keep.txt").read_text() == "mine"
    phi = tmp_path / "phi"
    shutil.copytree(tiny_dir, phi)
    config = json.loads((phi / "config.json").read_text())
    (phi / "config.json").write_text(json.dumps(config | {"model_type": "phi3"}))
    with pytest.raises(ConversionError, match="pruning supports"):
        Weights.load(phi)
    with pytest.raises(ConversionError, match="too short"):
        prune(tiny_dir, tmp_path / "new", calib="x = 1\n", options=PruneOptions(ffn_keep=0.5, calib_chunks=2))
    assert not (tmp_path / "new").exists()


def test_cli_prints_the_report_and_bad_flags_fail_in_one_line(tiny_dir, tmp_path):
    import subprocess
    import sys

    text = tmp_path / "calib.txt"
    from edgelm import corpus

    text.write_text(corpus.text("train", max_chars=TEXT_CHARS))
    run = [sys.executable, "-m", "edgelm", "prune", str(tiny_dir), "--calib", str(text), "--heldout", str(text),
           "--threads", "2"]
    ok = subprocess.run(run + ["-o", str(tmp_path / "out"), "--ffn-keep", "0.5"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "| ffn | FFN 384→192 channels |" in ok.stdout
    bad = subprocess.run(run + ["-o", str(tmp_path / "bad"), "--heads-keep", "0.75"], capture_output=True, text=True)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and "GQA" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_vocabulary_trimming_as_the_last_step_saves_the_rewritten_tokenizer(tiny_dir, tmp_path, calib_text):
    from tokenizers import Tokenizer

    out = tmp_path / "trimmed"
    report = prune(tiny_dir, out, calib=calib_text, heldout=calib_text[-3000:],
                   options=PruneOptions(ffn_keep=0.5, trim_vocab="calib", calib_chunks=2, n_threads=2))
    assert [s.name for s in report.steps] == ["original", "ffn", "vocab"]
    config = json.loads((out / "config.json").read_text())
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert config["vocab_size"] == tok.get_vocab_size() < 8192
    old = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    sample = calib_text[:2000]
    assert tok.encode(sample).tokens == old.encode(sample).tokens  # in-domain text: the same tokens
    with pytest.raises(ConversionError, match="no such text file"):
        make_plan(Weights.load(out), PruneOptions(trim_vocab=str(tmp_path / "missing.txt")))
