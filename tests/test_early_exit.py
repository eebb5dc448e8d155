"""Early exit and speculative decoding on real models: the split's files and the checks that refuse
mismatched ones, greedy output token for token the full model's (early exit, prompt lookup, a draft
model), and the native capture of the boundary hidden state against a Python eval callback. Sampling
that keeps the full model's distribution is in test_speculative_sampling.py.

Every llama.cpp context runs on one thread (n_threads=1): the test machine shares its cores. The last
tests pin bugs this file found: verify batches larger than n_batch, and granite's embedding scale.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import astuple
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest

import edgelm
from edgelm import native
from edgelm.converters import convert
from edgelm.converters.early_exit import available_splits, check_split, split_model, split_paths
from edgelm.errors import ConversionError, ModelLoadError, NativeError, UsageError
from edgelm.gguf_reader import read_gguf
from edgelm.runtime import ggml
from edgelm.runtime.context import Context, ContextOptions
from edgelm.runtime.exits import block_output
from edgelm.runtime.model import LlamaModel, default_model_path
from edgelm.runtime.splits import choose_split

from conftest import check_stats, random_byte_checkpoint, reweight_gguf

ROOT = Path(__file__).resolve().parents[1]
KS = (2, 4, 8, 12)  # exit layers of the 16-layer bundled model under test
GEN = dict(n_threads=1, n_ctx=256)  # 256: llama.cpp's smallest context (it pads smaller ones)
N_GEN = 24
LONG_CODE = "def area(shape, scale=1.0):\n    if shape.kind == 'circle':\n        return 3.14159 * shape.r ** 2\n" * 12

# drafter: load options; draft_threshold 0 drafts every round, so shallow exits see many rejections
DRAFTERS = {
    "ee2": {"early_exit": 2, "draft_threshold": 0.0},
    "ee4": {"early_exit": 4, "draft_threshold": 0.0},
    "ee8": {"early_exit": 8},  # the default threshold: drafting stops at the first unsure token
    "ee12": {"early_exit": 12, "draft_threshold": 0.3},
    "lookup": {"lookup": True},
    "draft": {"draft": "tiny", "draft_threshold": 0.0},  # models/tiny, converted: same tokenizer, 4 layers
}


def options(drafter: str, draft_path: Path) -> dict:
    opts = dict(DRAFTERS[drafter])
    if "draft" in opts:
        opts["draft"] = draft_path
    return opts


def rewrite_gguf(src: Path, dst: Path, *, arch: str | None = None, extra: dict | None = None,
                 drop: tuple[str, ...] = ()) -> Path:
    """A copy of a GGUF under another architecture name and/or with extra float or string keys, without `drop`."""
    reader = gguf.GGUFReader(src)
    old = str(reader.fields["general.architecture"].contents())
    arch = arch or old
    writer = gguf.GGUFWriter(dst, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key.replace(old + ".", arch + ".", 1), field.contents(), vtype, sub)
    for key, value in (extra or {}).items():
        vtype = gguf.GGUFValueType.STRING if isinstance(value, str) else gguf.GGUFValueType.FLOAT32
        writer.add_key_value(key, value, vtype)
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """A copy of the bundled model split at every exit layer of KS (the package folder stays untouched)."""
    path = tmp_path_factory.mktemp("small") / "small.gguf"
    shutil.copy(default_model_path(), path)
    for k in KS:
        split_model(path, k)
    return path


@pytest.fixture(scope="module")
def plain(small):
    with edgelm.load(small, **GEN) as m:
        yield m


@pytest.fixture(scope="module")
def ee4(small):
    with edgelm.load(small, early_exit=4, draft_threshold=0.0, **GEN) as m:
        yield m


@pytest.fixture(scope="module")
def tiny_q8(tiny_gguf) -> Path:
    return tiny_gguf["q8_0"]


@pytest.fixture(scope="module")
def prompts(plain) -> dict[str, str | list[int]]:
    return {
        "code": "def fibonacci(n):\n",
        "class": "import numpy as np\n\nclass Matrix:\n    def __init__(self",
        "prose": "The history of the city began in the twelfth century, when",
        "repeated": "the cat sat on the mat. " * 6,  # lookup's case
        "loop": "for i in range(10):\n    print(i)\n" * 3,
        "json": '{"name": "edgelm", "version": "0.1", "deps": [',
        "unicode": "Über naïve café — ünïcödé ☃ test",
        "bos_only": "",  # one token: BOS
        "one_token": plain.tokenize("def", add_special=False),  # one token, no BOS
        "long": plain.tokenize(LONG_CODE)[:200],  # past the early-exit prefill batch (128)
        "near_end": plain.tokenize(LONG_CODE)[:plain.n_ctx - 3],  # the context ends after 4 tokens
    }


@pytest.fixture(scope="module")
def reference(plain, prompts) -> dict:
    return {name: plain.generate(p, temperature=0, max_tokens=N_GEN) for name, p in prompts.items()}


# ---------------------------------------------------------------------------- the split's files


@pytest.mark.parametrize("k", KS)
def test_split_layout(small, k):
    src = read_gguf(small)
    p = split_paths(small, k)
    shared, draft, tail = read_gguf(p.shared), read_gguf(p.draft), read_gguf(p.tail)  # edgelm's strict reader
    n_layer = src.get("llama.block_count")
    per_block = sorted(t.name[len("blk.0."):] for t in src.tensors if t.name.startswith("blk.0."))
    # shared holds the two big matrices only; the heads hold their blocks, renumbered, and a norm; the draft
    # (llama.cpp's "deci") ends in the passthrough layer k: no attention and an FFN of zeros, width 1
    assert sorted(t.name for t in shared.tensors) == ["output.weight", "token_embd.weight"]
    passthrough = {f"blk.{k}.{n}.weight" for n in ("ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    for part, lo, hi, arch in ((draft, 0, k, "deci"), (tail, k, n_layer, "llama")):
        want = {f"blk.{i - lo}.{rest}" for i in range(lo, hi) for rest in per_block} | {"output_norm.weight"}
        assert {t.name for t in part.tensors} == want | (passthrough if part is draft else set())
        assert part.get("general.architecture") == arch
        assert part.get(f"{arch}.block_count") == hi - lo + (part is draft)
        assert part.get("split.no") == 0 and part.get("split.count") == 2
        assert part.get("split.tensors.count") == len(part.tensors) + len(shared.tensors)
        assert part.get("edgelm.early_exit.layer") == k and part.get("edgelm.early_exit.n_layer") == n_layer
        assert part.get("edgelm.early_exit.passthrough") == (part is draft)
        for t in part.tensors:  # the bytes of the source tensor the name maps back to
            name = t.name
            if part is draft and name in passthrough:
                values = np.frombuffer(part.tensor_bytes(t), np.float32)
                assert np.all(values == (1.0 if "ffn_norm" in name else 0.0)), name
                continue
            if name.startswith("blk."):
                i, rest = name[4:].split(".", 1)
                name = f"blk.{int(i) + lo}.{rest}"
            assert part.tensor_bytes(t) == src.tensor_bytes(src.tensor(name)), t.name
    for key in ("attention.head_count", "attention.head_count_kv", "feed_forward_length"):
        assert draft.get(f"deci.{key}") == [src.get(f"llama.{key}")] * k + [1 if key == "feed_forward_length" else 0]
    assert shared.get("split.no") == 1
    # the draft tokenizes; the tail has a vocabulary of nameless tokens, as many, and no tokenizer tables
    assert draft.get("tokenizer.ggml.tokens") == src.get("tokenizer.ggml.tokens")
    assert tail.get("tokenizer.ggml.model") == "none" and tail.get("llama.vocab_size") == len(src.get("tokenizer.ggml.tokens"))
    assert not [key for key in tail.metadata if key.startswith("tokenizer.") and key != "tokenizer.ggml.model"]
    # no weight stored twice: only output_norm (the draft's exit norm, the tail's final norm) is in two files
    norm = src.tensor("output_norm.weight").n_bytes
    zeros = sum(draft.tensor(name).n_bytes for name in passthrough)
    assert shared.n_tensor_bytes + draft.n_tensor_bytes + tail.n_tensor_bytes == src.n_tensor_bytes + norm + zeros
    assert check_split(small, p).k == k and check_split(small, p).passthrough


def test_plain_draft_without_the_passthrough_layer(small, prompts, reference, tmp_path):
    """A split of format 2, as edgelm wrote it before the passthrough layer (split_model(passthrough=False)
    writes it still): a llama draft of k layers whose prefill asks for every row's logits. It loads, and the
    output is the full model's."""
    model = tmp_path / "plain.gguf"
    shutil.copy(small, model)
    p = split_model(model, 4, passthrough=False)
    draft = read_gguf(p.draft)
    assert draft.get("general.architecture") == "llama" and draft.get("llama.block_count") == 4
    assert not check_split(model, p).passthrough
    with edgelm.load(model, early_exit=4, draft_threshold=0.0, **GEN) as m:
        for name in ("code", "long", "near_end"):
            assert m.generate(prompts[name], temperature=0, max_tokens=N_GEN).tokens == reference[name].tokens, name


@pytest.mark.parametrize("arch, draft_arch, outtype", [("qwen2", "qwen2", "f32"), ("qwen2", "qwen2", "q8_0"),
                                                       ("llama3", "deci", "f32")])
def test_other_architectures_decode_the_full_models_output(tmp_path, arch, draft_arch, outtype):
    """qwen2 (biased QKV, NeoX RoPE: no deci draft) ends its draft in a copy of layer 0 whose bytes are all zero
    (at f32 and at q8_0); a Llama 3 with RoPE scaling (a rope_freqs tensor every layer reads) gets the deci draft.
    Both decode the full model's output."""
    ckpt = random_byte_checkpoint(tmp_path / "ckpt", 4, seed=3, arch=arch)
    model = convert(ckpt, tmp_path / "q.gguf", outtype=outtype).path
    p = split_model(model, 2)
    draft, src = read_gguf(p.draft), read_gguf(model)
    assert draft.get("general.architecture") == draft_arch and check_split(model, p).passthrough
    assert draft.get(f"{draft_arch}.block_count") == 3
    if arch == "qwen2":  # the zero layer: layer 0's names, types and shapes, zero bytes
        zero = sorted(t.name[len("blk.2."):] for t in draft.tensors if t.name.startswith("blk.2."))
        assert zero == sorted(t.name[len("blk.0."):] for t in src.tensors if t.name.startswith("blk.0."))
        for rest in zero:
            t, t0 = draft.tensor(f"blk.2.{rest}"), src.tensor(f"blk.0.{rest}")
            assert (t.type_name, t.shape) == (t0.type_name, t0.shape) and not any(draft.tensor_bytes(t))
    if arch == "llama3":
        assert "rope_freqs.weight" in {t.name for t in draft.tensors}
    prompt = [0, 3, 4, 5, 6, 7, 3, 4, 5] * 8  # past original_max_position_embeddings, where the scaling bites
    with edgelm.load(model, **GEN) as plain, edgelm.load(model, early_exit=2, draft_threshold=0.0, **GEN) as m:
        want = plain.generate(prompt, temperature=0, max_tokens=20, ignore_eos=True).tokens
        got = m.generate(prompt, temperature=0, max_tokens=20, ignore_eos=True)
    assert got.tokens == want and got.timings.speculative.drafted > 0


def test_available_splits_and_choice(small, tmp_path):
    assert available_splits(small) == list(KS)
    assert choose_split(small, True).k == max(KS)  # no trained exit norm: the deepest exit
    odd = tmp_path / "m[1]*.gguf"  # glob characters in the name
    shutil.copy(small, odd)
    split_model(odd, 4)
    norm = np.linspace(0.5, 1.5, 256, dtype=np.float32)
    split_model(odd, 2, exit_norm=norm, exit_norm_name="trained")
    assert available_splits(odd) == [2, 4]
    info = choose_split(odd, True)
    assert (info.k, info.exit_norm) == (2, "trained")  # a trained exit beats a deeper one
    d = read_gguf(split_paths(odd, 2).draft)
    assert np.array_equal(np.frombuffer(d.tensor_bytes(d.tensor("output_norm.weight")), np.float32), norm)
    split_paths(odd, 4).tail.unlink()
    assert available_splits(odd) == [2]  # a split with a part missing is not offered


def test_bundled_split_is_current():
    """The split committed beside the bundled model is of that model."""
    model = default_model_path()
    for k in available_splits(model):
        assert check_split(model, split_paths(model, k)).k == k


# ---------------------------------------------------------------------------- greedy output


@pytest.mark.parametrize("drafter", DRAFTERS)
def test_greedy_output_is_the_full_models(small, tiny_q8, prompts, reference, drafter):
    with edgelm.load(small, **GEN, **options(drafter, tiny_q8)) as m:  # one after another, KV kept
        got = {name: m.generate(p, temperature=0, max_tokens=N_GEN) for name, p in prompts.items()}
    for name, c in got.items():
        want = reference[name]
        assert (c.tokens, c.finish_reason, c.text) == (want.tokens, want.finish_reason, want.text), name
        check_stats(c)
    assert len(got["near_end"].tokens) == 4  # the context ended, in both
    drafted = sum(c.timings.speculative.drafted for c in got.values())
    accepted = sum(c.timings.speculative.accepted for c in got.values())
    assert 0 < accepted < drafted  # both kept drafts and rollbacks


@pytest.mark.parametrize("drafter", ["ee4", "lookup", "draft"])
def test_max_tokens_and_stop_strings(small, tiny_q8, plain, prompts, reference, drafter):
    prompt, full = prompts["code"], reference["code"]
    stops = [full.text[int(len(full.text) * f):][:3] for f in (0.2, 0.5, 0.8)]
    with edgelm.load(small, **GEN, **options(drafter, tiny_q8)) as m:
        for n in (0, 1, 2, 7):
            c = m.generate(prompt, temperature=0, max_tokens=n)
            assert (c.tokens, c.finish_reason) == (full.tokens[:n], "length"), n
            check_stats(c)
        for stop in stops:
            want = plain.generate(prompt, temperature=0, max_tokens=N_GEN, stop=stop)
            c = m.generate(prompt, temperature=0, max_tokens=N_GEN, stop=stop)
            assert want.finish_reason == "stop" and stop not in want.text
            assert (c.text, c.tokens, c.finish_reason) == (want.text, want.tokens, want.finish_reason), stop
        # a stopped stream leaves the model ready for the next request
        assert m.generate(prompt, temperature=0, max_tokens=N_GEN).tokens == full.tokens


@pytest.mark.parametrize("drafter", ["ee4", "lookup", "draft"])
def test_constrained_sampling_verifies_one_token_per_round(small, tiny_q8, plain, prompts, drafter):
    """Grammars, penalties and a greedy logit bias hold state a rejected draft would have advanced: no
    drafts, one verified token per round through the plain sampler chain, so even sampled output is the
    plain model's for the same seed."""
    cases = [
        {"temperature": 0, "repeat_penalty": 1.3},
        {"temperature": 0, "logit_bias": {203: -5.0}},
        {"temperature": 0, "grammar": 'root ::= "x" [a-z]+ "\\n"'},
        {"temperature": 0.8, "repeat_penalty": 1.2, "seed": 3},
    ]
    with edgelm.load(small, **GEN, **options(drafter, tiny_q8)) as m:
        for case in cases:
            want = plain.generate(prompts["code"], max_tokens=16, **case)
            c = m.generate(prompts["code"], max_tokens=16, **case)
            assert (c.tokens, c.finish_reason) == (want.tokens, want.finish_reason), case
            s = c.timings.speculative
            assert s.drafted == 0 and len(c.tokens) - 1 <= s.rounds <= len(c.tokens)  # a grammar's end: a round more


@pytest.mark.parametrize("drafter", ["ee4", "lookup", "draft"])
def test_output_does_not_depend_on_earlier_requests(small, tiny_q8, prompts, reference, drafter):
    """A prompt sharing its first 200 tokens with the previous request's gets the cold output: reusing KV
    evaluated in other batches moved a near-tie here (logits 6.235 vs 6.231, moved by 0.03)."""
    with edgelm.load(small, **GEN, **options(drafter, tiny_q8)) as m:
        m.generate(prompts["long"], temperature=0, max_tokens=N_GEN)
        assert m.generate(prompts["near_end"], temperature=0, max_tokens=N_GEN).tokens == reference["near_end"].tokens


# ---------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory, tiny_q8):
    """models/tiny (another model, same tokenizer) split at layer 2."""
    path = tmp_path_factory.mktemp("tiny-split") / "tiny.gguf"
    shutil.copy(tiny_q8, path)
    return split_model(path, 2)


@pytest.fixture
def loose(small, tmp_path) -> Path:
    """A copy of the model with its splits at 4 and 8, free to damage."""
    model = tmp_path / small.name
    shutil.copy(small, model)
    for k in (4, 8):
        for src, dst in zip(astuple(split_paths(small, k)), astuple(split_paths(model, k))):
            shutil.copy(src, dst)
    return model


def _shared_rewritten(model, other):
    p = split_paths(model, 4).shared
    rewrite_gguf(p, p.with_suffix(".new"), extra={"general.comment": "rewritten"}).replace(p)


def _older_draft(model, other):
    """A draft as an edgelm before split format 2 wrote it (no format key)."""
    p = split_paths(model, 4).draft
    rewrite_gguf(p, p.with_suffix(".new"), drop=("edgelm.early_exit.format",)).replace(p)


def _copy(pairs) -> None:
    for src, dst in pairs:
        shutil.copy(src, dst)


DAMAGE = {
    # case: (what happens to the split at 4, given `other` = models/tiny's split; the error's words;
    #        whether the split at 4 and 8 both break, through their shared file)
    "tail_of_another_split": (lambda m, other: _copy([(split_paths(m, 8).tail, split_paths(m, 4).tail)]),
                              "are parts of different splits", False),
    "draft_of_another_model": (lambda m, other: _copy([(other.draft, split_paths(m, 4).draft)]),
                               "belongs to another model", False),
    "draft_as_tail": (lambda m, other: _copy([(split_paths(m, 4).draft, split_paths(m, 4).tail)]),
                      "not an early-exit tail split", False),
    "shared_of_another_model": (lambda m, other: _copy([(other.shared, split_paths(m, 4).shared)]),
                                "belongs to another model", True),
    "split_of_another_model": (lambda m, other: _copy(zip(astuple(other), astuple(split_paths(m, 4)))),
                               "split of another model than", True),
    "shared_rewritten": (_shared_rewritten, "was rewritten after", True),
    "model_reweighted": (lambda m, other: reweight_gguf(m), "or of an earlier version of it", True),
    "draft_of_an_older_edgelm": (_older_draft, "split of format 1, this edgelm reads formats 2 and 3", False),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_mismatched_split_is_refused_before_llama_cpp(loose, tiny_split, case):
    damage, words, shared = DAMAGE[case]
    damage(loose, tiny_split)
    with pytest.raises(ModelLoadError, match=words) as err:
        check_split(loose, split_paths(loose, 4))
    assert "llama.cpp" not in str(err.value)
    with pytest.raises(ModelLoadError, match=words):
        edgelm.load(loose, early_exit=4, **GEN)
    if shared:  # every split uses the shared file
        with pytest.raises(ModelLoadError):
            edgelm.load(loose, early_exit=8, **GEN)
    else:
        with edgelm.load(loose, early_exit=8, **GEN) as m:
            assert m.early_exit.k == 8


def test_missing_or_absent_split(loose, tiny_q8, tmp_path):
    split_paths(loose, 4).tail.unlink()
    with pytest.raises(ModelLoadError, match=r"no early-exit split at layer 4 beside it \(there are: 8\)"):
        edgelm.load(loose, early_exit=4, **GEN)
    with pytest.raises(ModelLoadError, match=r"no early-exit split at layer 99 .*there are: 8"):
        edgelm.load(loose, early_exit=99, **GEN)
    bare = tmp_path / "bare.gguf"
    shutil.copy(tiny_q8, bare)
    with pytest.raises(ModelLoadError, match="no early-exit split beside it"):
        edgelm.load(bare, early_exit=True, **GEN)


def test_split_model_bad_exit_layer(small, tmp_path):
    model = tmp_path / "m.gguf"
    shutil.copy(small, model)
    for k in (0, 16, True, "4"):  # 16 layers: exits 1..15
        with pytest.raises(ConversionError, match=r"exit layer must be an integer in \[1, 15\]"):
            split_model(model, k)
    assert not list(tmp_path.glob("m.ee*"))


def test_split_model_bad_input(loose):
    with pytest.raises(ConversionError, match="one part of a split model"):
        split_model(split_paths(loose, 4).draft, 1)
    for norm in (np.ones(3, np.float32), np.full(256, np.nan, np.float32)):
        with pytest.raises(ConversionError, match="exit norm must be 256 finite floats"):
            split_model(loose, 2, exit_norm=norm)
    assert available_splits(loose) == [4, 8]  # nothing written


def random_exit_block(n_embd: int, width: int, seed: int = 0) -> dict[str, np.ndarray]:
    """An exit block (scripts/train_exit.py's layout) with weights large enough to move the draft's argmax."""
    rng = np.random.default_rng(seed)
    return {"ffn_norm": 1 + 0.1 * rng.standard_normal(n_embd), "output_norm": 1 + 0.1 * rng.standard_normal(n_embd),
            "ffn_gate": 0.2 * rng.standard_normal((width, n_embd)), "ffn_up": 0.2 * rng.standard_normal((width, n_embd)),
            "ffn_down": 0.2 * rng.standard_normal((n_embd, width))}


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def draft_logits(paths, tokens: list[int], n_embd: int) -> tuple[np.ndarray, np.ndarray]:
    """(the boundary state l_out-3 the tail receives, the draft's logits) for the last of `tokens`."""
    with LlamaModel(paths.draft, parts=[paths.shared]) as draft:
        capture = native.Capture("l_out-3", n_embd, 64)
        with contextlib.closing(Context(draft, ContextOptions(n_ctx=64, n_threads=1), eval_callback=capture.callback,
                                        eval_user_data=capture.user_data)) as ctx:
            ctx.decode(tokens, 0)
            capture.check()
            return capture.take(len(tokens))[-1], ctx.logits()


def test_an_exit_block_is_the_drafts_last_layer(small, tmp_path, prompts, reference):
    """The draft computes head(exit_norm(h + FFN(h))) from the boundary state h, which the tail still receives
    unchanged, and greedy output stays the full model's."""
    model = tmp_path / "block.gguf"
    shutil.copy(small, model)
    fields = gguf.GGUFReader(model).fields
    n_embd, eps = int(fields["llama.embedding_length"].contents()), float(
        fields["llama.attention.layer_norm_rms_epsilon"].contents())
    block = random_exit_block(n_embd, 64)
    paths = split_model(model, 4, exit_block=block)
    assert check_split(model, paths).exit_norm == "trained block"
    head = next(t for t in gguf.GGUFReader(paths.shared).tensors if t.name == "output.weight")
    head = gguf.quants.dequantize(head.data, head.tensor_type).reshape(-1, n_embd)  # (n_vocab, n_embd)
    with LlamaModel(model) as m:
        tokens = m.tokenize(LONG_CODE)[:40]

    h, logits = draft_logits(paths, tokens, n_embd)
    x = rms_norm(h, block["ffn_norm"], eps)
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    out = h + block["ffn_down"] @ (silu(block["ffn_gate"] @ x) * (block["ffn_up"] @ x))
    expected = head @ rms_norm(out, block["output_norm"], eps)  # the f32 block: the split stores f16 matrices
    f32 = {name: w.astype(np.float32) for name, w in block.items()}
    np.testing.assert_allclose(block_output(h[None], f32, eps)[0], out, rtol=1e-4, atol=1e-4)  # `edgelm exits`' copy
    scale = np.abs(expected).max()
    np.testing.assert_allclose(logits, expected, atol=0.02 * scale)  # Q8_0 head: activations quantized too
    assert logits.argmax() == expected.argmax()
    plain_h, plain_logits = draft_logits(split_paths(small, 4), tokens, n_embd)
    np.testing.assert_array_equal(h, plain_h)  # the tail's input does not depend on the block
    assert np.abs(plain_logits - logits).max() > 0.1 * scale  # the block is what the draft read

    with edgelm.load(model, early_exit=4, draft_threshold=0.0, **GEN) as ee:
        for name in ("code", "prose", "long"):
            assert ee.generate(prompts[name], temperature=0, max_tokens=N_GEN).tokens == reference[name].tokens


def test_convert_takes_an_exit_block_from_the_checkpoint_folder(small, tmp_path):
    from safetensors.numpy import save_file

    from edgelm.converters.early_exit import EXIT_BLOCKS, write_early_exit

    model, hf_dir = tmp_path / "m.gguf", tmp_path / "hf"
    shutil.copy(small, model)
    hf_dir.mkdir()
    block = random_exit_block(256, 8)
    save_file({f"exit_block.4.{name}.weight": w.astype(np.float32) for name, w in block.items()},
              str(hf_dir / EXIT_BLOCKS))
    k, paths, _ = write_early_exit(model, 4, hf_dir=hf_dir)
    assert (k, check_split(model, paths).exit_norm) == (4, "trained block")
    k, paths, _ = write_early_exit(model, 2, hf_dir=hf_dir)  # no block for layer 2: the final norm
    assert (k, check_split(model, paths).exit_norm) == (2, "final")


def test_bad_exit_blocks_are_refused(loose, tmp_path):
    good = random_exit_block(256, 8)
    cases = {
        "no ffn_up tensor": {k: v for k, v in good.items() if k != "ffn_up"},
        r"ffn_down has shape \(256, 9\)": {**good, "ffn_down": np.zeros((256, 9))},
        r"output_norm has shape \(3,\)": {**good, "output_norm": np.ones(3)},
        "not finite": {**good, "ffn_gate": np.full((8, 256), np.inf)},
        "not finite ": {**good, "ffn_gate": np.full((8, 256), 1e6)},  # past float16's range
    }
    for message, block in cases.items():
        with pytest.raises(ConversionError, match=message):
            split_model(loose, 2, exit_block=block)
    with pytest.raises(ConversionError, match="not both"):
        split_model(loose, 2, exit_block=good, exit_norm=np.ones(256, np.float32))
    assert available_splits(loose) == [4, 8]  # nothing written
    other = tmp_path / "plain-draft.gguf"
    shutil.copy(loose, other)
    with pytest.raises(ConversionError, match="needs a llama draft with a passthrough layer"):
        split_model(other, 2, exit_block=good, passthrough=False)


BAD_OPTIONS = {
    "early_exit_and_lookup": {"early_exit": 4, "lookup": True},
    "early_exit_and_draft": {"early_exit": 4, "draft": "tiny"},
    "draft_and_lookup": {"draft": "tiny", "lookup": True},
    "early_exit_0": {"early_exit": 0},
    "early_exit_negative": {"early_exit": -2},
    "early_exit_str": {"early_exit": "4"},
}


@pytest.mark.parametrize("opts", BAD_OPTIONS.values(), ids=BAD_OPTIONS)
def test_bad_speculative_options(small, tiny_q8, tmp_path, opts):
    opts = {k: tiny_q8 if v == "tiny" else v for k, v in opts.items()}
    with pytest.raises(UsageError):
        edgelm.load(small, **GEN, **opts)


def test_draft_model_of_another_vocabulary(small, rand):
    with pytest.raises(UsageError, match="vocabulary differs"):
        edgelm.load(small, draft=rand["draft"], **GEN)


def test_whole_model_calls_refuse_an_early_exit_model(ee4):
    with pytest.raises(UsageError, match="early-exit split"):
        ee4.embed("hello")
    with pytest.raises(UsageError, match="early-exit split"):
        ee4.perplexity("def f(x):\n    return x\n" * 4)
    with pytest.raises(UsageError, match="early-exit split"):
        ee4.generate_batch(["a", "b"], max_tokens=2)
    assert len(ee4.generate("def", temperature=0, max_tokens=3).tokens) == 3  # still usable


# ---------------------------------------------------------------------------- native capture


def python_reference(target: str, seen: list, disagree: list, capture: native.Capture | None = None):
    """An eval callback in Python that copies the target node's rows (ggml.read_rows); with `capture`, it
    also hands every call to the native callback, so both read the very same tensor."""

    def on_tensor(address, ask, _user_data):
        try:
            t = ggml.GGMLTensor.from_address(address)
            hit = t.name.decode() == target
            if capture is not None:
                answer = bool(capture.callback(address, ask, capture.user_data))
                if ask and answer != hit:
                    disagree.append(t.name.decode())
            if ask:
                return hit
            seen.append(ggml.read_rows(t, address).copy())
            return True
        except BaseException as e:  # never across the C boundary
            disagree.append(e)
            return False

    return llama_cpp.ggml_backend_sched_eval_callback(on_tensor)


def test_capture_rows_equal_a_python_reference(small):
    target = "l_out-3"
    with LlamaModel(small) as model:
        capture = native.Capture(target, model.n_embd, 8)
        seen, disagree = [], []
        callback = python_reference(target, seen, disagree, capture)
        with contextlib.closing(Context(model, ContextOptions(n_ctx=64, n_batch=8, n_threads=1),
                                        eval_callback=callback)) as ctx:
            tokens = model.tokenize("def f(x):\n    return x + 1\n")
            ctx.decode(tokens[:6], 0)
            for i, t in enumerate(tokens[6:11]):
                ctx.decode_one(t, 6 + i)  # 11 rows through a ring of 8
        capture.check()
        assert not disagree
        ref = np.concatenate(seen)
        assert ref.shape == (11, model.n_embd) and (capture.head, capture.calls) == (11, 6)
        np.testing.assert_array_equal(capture.take(8), ref[-8:])
        np.testing.assert_array_equal(capture.take(3, end=9), ref[6:9])
        with pytest.raises(ValueError, match="not in the ring"):
            capture.take(4, end=6)  # overwritten


def test_draft_split_hands_over_the_full_models_hidden_states(small):
    """What the tail receives (Capture on the draft split, as Model wires it) is the full model's state."""
    k, target = 4, "l_out-3"
    p = split_paths(small, k)
    seen, disagree = [], []
    callback = python_reference(target, seen, disagree)  # kept alive while the context runs
    with LlamaModel(small) as model:
        tokens = model.tokenize(LONG_CODE)[:40]
        with contextlib.closing(Context(model, ContextOptions(n_ctx=64, n_threads=1),
                                        eval_callback=callback)) as ctx:
            ctx.decode(tokens, 0)
    assert not disagree
    with LlamaModel(p.draft, parts=[p.shared]) as draft:
        capture = native.Capture(target, draft.n_embd, 64)
        with contextlib.closing(Context(draft, ContextOptions(n_ctx=64, n_threads=1), eval_callback=capture.callback,
                                        eval_user_data=capture.user_data)) as ctx:
            # logits for the last row only: the passthrough layer after l_out-3 is the one that drops the others
            ctx.decode(tokens, 0)
        capture.check()
    np.testing.assert_array_equal(capture.take(len(tokens)), np.concatenate(seen))  # the same kernels, bit for bit


def test_capture_errors_raise_native_error(small):
    with LlamaModel(small) as model:
        tokens = model.tokenize(LONG_CODE)[:6]
        for capture, words in ((native.Capture("l_out-3", model.n_embd, 4), "has more than 4 rows"),
                               (native.Capture("l_out-3", model.n_embd + 1, 8), f"is not {model.n_embd + 1} wide")):
            with contextlib.closing(Context(model, ContextOptions(n_ctx=64, n_threads=1),
                                            eval_callback=capture.callback,
                                            eval_user_data=capture.user_data)) as ctx:
                ctx.decode(tokens, 0)
            with pytest.raises(NativeError, match=words):
                capture.check()
            assert capture.head == 0
            capture.check()  # the error was cleared


# ---------------------------------------------------------------------------- fixed bugs


@pytest.mark.parametrize("drafter", ["ee4", "lookup", "draft"])
def test_small_batch_with_drafts(small, tiny_q8, prompts, reference, drafter):
    try:
        m = edgelm.load(small, n_batch=8, draft_max=8, **GEN, **options(drafter, tiny_q8))
    except UsageError:
        return  # refusing the combination at load is a fix too
    with m:
        assert m.generate(prompts["repeated"], temperature=0, max_tokens=N_GEN).tokens == reference["repeated"].tokens


def test_granite_embedding_scale(tiny_q8, tmp_path):
    model = rewrite_gguf(tiny_q8, tmp_path / "granite.gguf", arch="granite", extra={
        "granite.embedding_scale": 4.0, "granite.logit_scale": 1.0, "granite.residual_scale": 1.0,
        "granite.attention.scale": 32 ** -0.5})
    try:
        split_model(model, 2)
    except ConversionError:
        return  # refusing the architecture is a fix too
    with edgelm.load(model, **GEN) as m:
        want = m.generate("def fibonacci(n):\n", temperature=0, max_tokens=12).tokens
    with edgelm.load(model, early_exit=2, **GEN) as m:
        assert m.generate("def fibonacci(n):\n", temperature=0, max_tokens=12).tokens == want


# ---------------------------------------------------------------------------- exit analysis


def test_exits_command_reports_and_writes_a_split(tmp_path, capsys):
    """`edgelm exits`: per-layer agreement in [0, 1] (the trained exit norm beside the model is used), measured
    round costs and a predicted speedup for the measured layers, and --write leaves a split that loads."""
    from edgelm.cli import main

    model = tmp_path / "m.gguf"
    shutil.copy(default_model_path(), model)
    heads = default_model_path().with_name(default_model_path().stem + ".exit_heads.safetensors")
    shutil.copy(heads, tmp_path / "m.exit_heads.safetensors")
    assert main(["exits", str(model), "--tokens", "256", "--layers", "4", "--draft-max", "2", "--threads", "1",
                 "--json", "--write", "4"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out.splitlines()[0])
    layers = {row["k"]: row for row in report["layers"]}
    assert set(layers) == set(range(1, 16)) and report["tokens"] == 256
    assert all(0.0 <= row["agreement"] <= 1.0 for row in layers.values())
    assert layers[4]["trained"] and not layers[3]["trained"]
    assert layers[4]["speedup"] >= 1.0 and layers[4]["draft_ms"] > 0 and layers[3]["speedup"] is None
    assert available_splits(model) == [4]
    assert check_split(model, split_paths(model, 4)).exit_norm == "trained"
    with edgelm.load(model, early_exit=True, **GEN) as m, edgelm.load(model, **GEN) as plain:
        assert m.generate("import os\n", temperature=0, max_tokens=16).tokens == \
            plain.generate("import os\n", temperature=0, max_tokens=16).tokens


def test_exits_command_scores_and_writes_an_exit_block(tmp_path, capsys):
    """An exit block beside the model: its layer is scored through the block, and --write puts it in the draft."""
    from safetensors.numpy import save_file

    from edgelm.cli import main

    model = tmp_path / "m.gguf"
    shutil.copy(default_model_path(), model)
    block = random_exit_block(256, 32, seed=3)
    save_file({f"exit_block.4.{name}.weight": w.astype(np.float32) for name, w in block.items()},
              str(tmp_path / "m.exit_blocks.safetensors"))
    argv = ["exits", str(model), "--tokens", "128", "--layers", "4", "--draft-max", "2", "--threads", "1", "--json"]
    assert main([*argv, "--write", "4"]) == 0
    with_block = {row["k"]: row for row in json.loads(capsys.readouterr().out.splitlines()[0])["layers"]}
    assert with_block[4]["exit"] == "block" and with_block[3]["exit"] == "final" and with_block[4]["draft_ms"] > 0
    assert check_split(model, split_paths(model, 4)).exit_norm == "trained block"
    (tmp_path / "m.exit_blocks.safetensors").unlink()
    assert main(argv) == 0
    without = {row["k"]: row for row in json.loads(capsys.readouterr().out.splitlines()[0])["layers"]}
    assert without[4]["exit"] == "final" and without[4]["agreement"] != with_block[4]["agreement"]
    assert without[5]["agreement"] == with_block[5]["agreement"]
    assert main(["exits", str(model), "--exit-blocks", str(tmp_path / "none.safetensors")]) == 2


def test_exits_command_bad_input(tmp_path):
    from edgelm.cli import main

    assert main(["exits", str(default_model_path()), "--layers", "16"]) == 2  # exits lie in 1..15
    assert main(["exits", str(default_model_path()), "--calib", str(tmp_path / "missing.txt")]) == 2
    assert main(["exits", str(tmp_path / "missing.gguf")]) != 0


@pytest.mark.parametrize("flash_attn", [None, False], ids=["flash attention auto", "flash attention off"])
def test_early_exit_reuses_an_earlier_requests_kv_exactly(small, flash_attn):
    """A chat's next turn: the shared prefix stays in both halves' KV (less the last canonical_rows positions,
    which are evaluated again canonically: 64, or 8 without flash attention), and the output is still the plain
    model's token for token."""
    head = "".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(15))
    turns = [head + "def main():\n", head + "class Point:\n", head + "class Point:\n    pass\n"]
    with (edgelm.load(small, early_exit=4, flash_attn=flash_attn, **GEN) as ee,
          edgelm.load(small, flash_attn=flash_attn, **GEN) as plain):
        cached = []
        for text in turns:
            got = ee.generate(text, temperature=0, max_tokens=12)
            assert got.tokens == plain.generate(text, temperature=0, max_tokens=12).tokens
            cached.append(got.timings.cached_tokens)
        assert cached[0] == 0 and cached[1] > 64 and cached[2] > cached[1] - 8
        if flash_attn is False:  # only the 8-row floor (and a row-group remainder) is evaluated again
            assert cached[2] >= len(ee.tokenize(turns[2])) - 8 - 4
        ee.reset()
        assert ee.generate(turns[0], temperature=0, max_tokens=4).timings.cached_tokens == 0


def test_early_exit_honours_kv_reuse(small):
    """kv_reuse "off" keeps nothing between requests; "fast" keeps every shared position both halves hold (as
    plain decoding does with it), more than "exact", whose output stays the plain model's."""
    head = "".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(15))
    first, later = head + "def main():\n", head + "def main():\n    return f3(2)\n"
    cached = {}
    for reuse in ("off", "exact", "fast"):
        with edgelm.load(small, early_exit=4, kv_reuse=reuse, prefix_cache_bytes=0, **GEN) as ee:
            ee.generate(first, temperature=0, max_tokens=6)
            cached[reuse] = ee.generate(later, temperature=0, max_tokens=6).timings.cached_tokens
    n_later = len(edgelm.load(small, n_threads=1, n_ctx=256).tokenize(later))  # fast may keep generated tokens too
    assert cached["off"] == 0 and 0 < cached["exact"] < cached["fast"] < n_later


@pytest.mark.parametrize("drafter", ["lookup", "draft", "early exit"])
def test_speculative_decoding_uses_the_prompt_cache(small, tiny_q8, tmp_path, drafter):
    """A request sharing a long prefix with an earlier one (an unrelated request in between, so the live KV no
    longer holds it) restores it from the prompt cache, in RAM and in a later process's folder; the output stays
    the plain model's. Early exit keeps one entry per half of the split."""
    head = "".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(15))
    first, other, later = head + "def main():\n", "import sys\n", head + "class Point:\n"
    spec = {"lookup": dict(lookup=True), "draft": dict(draft=tiny_q8), "early exit": dict(early_exit=4)}[drafter]
    options = dict(GEN, n_ctx=512, prompt_cache=tmp_path / "cache")
    with edgelm.load(small, **dict(GEN, n_ctx=512)) as plain:
        want = plain.generate(later, temperature=0, max_tokens=12).tokens
    with edgelm.load(small, **spec, **options) as m:
        assert m.generate(first, temperature=0, max_tokens=12).timings.cached_tokens == 0
        m.generate(other, temperature=0, max_tokens=4)
        got = m.generate(later, temperature=0, max_tokens=12)
        assert got.tokens == want and got.timings.cached_tokens > 64
        assert got.timings.speculative.rounds > 0
    with edgelm.load(small, **spec, **options, prefix_cache_bytes=0) as m:  # the folder, in a new model
        got = m.generate(later, temperature=0, max_tokens=12)
        assert got.tokens == want and got.timings.cached_tokens > 64
    if drafter == "early exit":  # both halves wrote their entry; one without the other is a miss, not a crash
        names = sorted((tmp_path / "cache").glob("*.kvc"))
        assert len(names) >= 2
        with edgelm.load(small, **spec, **options, prefix_cache_bytes=0) as m:
            tail_cache = m._pair.caches[1]
            tail_cache._refresh()
            for entry in list(tail_cache._entries.values()):
                (tmp_path / "cache" / f"{entry.key}.kvc").unlink()
        with edgelm.load(small, **spec, **options, prefix_cache_bytes=0) as m:
            got = m.generate(later, temperature=0, max_tokens=12)
            assert got.tokens == want and got.timings.cached_tokens == 0
