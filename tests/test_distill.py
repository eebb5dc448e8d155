"""Distillation: a tiny run in seconds lowers the loss and the student's perplexity, is deterministic,
resumes from its checkpoint to the same weights, takes a GGUF teacher, and refuses bad requests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
from safetensors.numpy import load_file  # noqa: E402

from edgelm.converters import distill as distill_mod  # noqa: E402
from edgelm.converters.distill import DistillOptions, distill  # noqa: E402
from edgelm.errors import ConversionError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "models" / "small"


@pytest.fixture(scope="module")
def text():
    from edgelm import corpus

    return corpus.text("train", max_chars=30_000)


@pytest.fixture(scope="module")
def student(tiny_dir, tmp_path_factory) -> Path:
    """The tiny model pruned as the pipeline would: layer 2 dropped, half of the FFN channels kept."""
    from edgelm.converters.surgery import Weights, drop_layers, keep_ffn_channels

    pruned = keep_ffn_channels(drop_layers(Weights.load(tiny_dir), [2]), [np.arange(192)] * 3)
    return pruned.save(tmp_path_factory.mktemp("student") / "ckpt")


@pytest.fixture(scope="module")
def teacher(tiny_dir) -> Path:
    return tiny_dir


def quick(**kw) -> DistillOptions:
    return DistillOptions(**({"steps": 4, "batch": 2, "seq_len": 64, "lr": 1e-3, "warmup": 2, "eval_every": 0,
                              "checkpoint_every": 0, "n_threads": 2} | kw))


def weights(path: Path) -> dict[str, np.ndarray]:
    return load_file(str(path / "model.safetensors"))


def test_a_tiny_distillation_lowers_loss_and_perplexity_on_its_text(teacher, student, tmp_path, text):
    report = distill(teacher, student, tmp_path / "out", data=[text], heldout=text[:6000],
                     options=quick(steps=16, batch=4, eval_every=8))
    assert report.loss_last < report.loss_first
    assert report.perplexity_after < report.perplexity_before
    assert list(report.perplexity_during) == [8]
    assert report.teacher_perplexity is not None and report.tokens_seen == 16 * 4 * 64
    saved = json.loads((tmp_path / "out" / "distill_report.json").read_text())
    assert saved["perplexity_after"] == report.perplexity_after
    assert not (tmp_path / "out" / distill_mod.CHECKPOINT).exists()
    import transformers

    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # a standard checkpoint


def test_same_seed_same_weights(teacher, student, tmp_path, text):
    a = distill(teacher, student, tmp_path / "a", data=[text], heldout=text[:2000], options=quick())
    b = distill(teacher, student, tmp_path / "b", data=[text], heldout=text[:2000], options=quick())
    assert a.loss_last == b.loss_last
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_a_killed_run_resumes_to_the_same_weights(teacher, student, tmp_path, text, monkeypatch):
    opts = quick(checkpoint_every=2)
    distill(teacher, student, tmp_path / "whole", data=[text], heldout=text[:2000], options=opts)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(distill_mod, "_write_output", killed)  # dies after the last step, before writing
        with pytest.raises(KeyboardInterrupt):
            distill(teacher, student, tmp_path / "resumed", data=[text], heldout=text[:2000], options=opts)
    assert json.loads((tmp_path / "resumed" / distill_mod.CHECKPOINT / "state.json").read_text())["step"] == 2
    with pytest.raises(ConversionError, match="other options"):
        distill(teacher, student, tmp_path / "resumed", data=[text], heldout=text[:2000],
                options=quick(checkpoint_every=2, lr=5e-4))
    distill(teacher, student, tmp_path / "resumed", data=[text], heldout=text[:2000], options=opts)
    whole, resumed = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert all(np.array_equal(whole[k], resumed[k]) for k in whole)


def test_gguf_teacher_with_cached_top_k_and_generated_data(student, tiny_gguf, tmp_path, text):
    report = distill(tiny_gguf["q8_0"], student, tmp_path / "out", data=[text], heldout=text[:6000],
                     options=quick(steps=12, batch=4, top_k=16))
    assert report.loss_last < report.loss_first and report.perplexity_after < report.perplexity_before
    assert report.teacher_perplexity is None
    with pytest.raises(ConversionError, match="temperature 1"):  # the mass outside the top k is only known at T=1
        distill(tiny_gguf["q8_0"], student, tmp_path / "warm", data=[text], options=quick(temperature=2.0))
    gen = distill(tiny_gguf["q8_0"], student, tmp_path / "gen", generate=300, heldout=text[:2000], options=quick(steps=2))
    assert gen.tokens_seen == 2 * 2 * 64


def test_exit_norms_alone_leave_the_student_unchanged(teacher, student, tmp_path, text):
    report = distill(teacher, student, tmp_path / "out", data=[text], heldout=text[:4000],
                     options=quick(exit_layers=(2,), exit_norm_only=True, lr=2e-2))
    heads = load_file(str(tmp_path / "out" / "exit_heads.safetensors"))
    assert list(heads) == ["exit_norm.2.weight"] and heads["exit_norm.2.weight"].shape == (128,)
    assert 0 < report.exit_agreement[2] <= 1
    before, after = weights(student), weights(tmp_path / "out")
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_hidden_state_matching_across_hidden_sizes(student, tmp_path, text):
    # student hidden 128, teacher 256: a learned projection maps one onto the other
    report = distill(SMALL, student, tmp_path / "out", data=[text], heldout=text[:2000],
                     options=quick(hidden_weight=1.0, ce_weight=0.5))
    assert report.loss_last > 0


@pytest.mark.parametrize("kwargs,phrase", [
    (dict(data=None), "one of the two"),  # neither data nor --generate
    (dict(generate=100), "one of the two"),  # both
    (dict(data=["x = 1"]), "too short"),
    (dict(options=quick(exit_layers=(9,))), "exits lie in 1..2"),
    (dict(options=quick(exit_norm_only=True)), "needs --exit-layers"),
    (dict(options=quick(steps=0)), "at least 1"),
])
def test_bad_requests_are_clear_errors(teacher, student, tmp_path, text, kwargs, phrase):
    args = dict(data=[text], options=quick()) | kwargs
    with pytest.raises(ConversionError, match=phrase):
        distill(teacher, student, tmp_path / "out", heldout=text[:2000], **args)


def test_existing_output_is_refused_and_kept(teacher, student, tmp_path, text):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not empty"):
        distill(teacher, student, out, data=[text], options=quick())
    assert (out / "notes.txt").read_text() == "mine"
