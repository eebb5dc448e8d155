"""Vocabulary trimming: in-domain text tokenizes as before, any text still round-trips, the model's logits are
the original's restricted to the kept ids, and the saved checkpoint loads in transformers and llama.cpp."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from edgelm.converters import convert
from edgelm.converters.surgery import Weights
from edgelm.converters.vocab_trim import trim_vocab
from edgelm.errors import ConversionError

tokenizers = pytest.importorskip("tokenizers")

DOMAIN_CHARS = 20_000
OUT_OF_DOMAIN = "Grüße aus Zürich 🌍🚀 日本語のテキスト 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√ \t\r\n zzqxjvw ¯\\_(ツ)_/¯ <|im_start|>"


@pytest.fixture(scope="module")
def domain():
    from edgelm import corpus

    return corpus.text("train", max_chars=DOMAIN_CHARS)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return Weights.load(tiny_dir)


@pytest.fixture(scope="module")
def trimmed(tiny, domain):
    return trim_vocab(tiny, domain)


@pytest.fixture(scope="module")
def toks(tiny_dir, trimmed):
    """(old, new) tokenizers and the new id -> old id map."""
    old = tokenizers.Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    new = tokenizers.Tokenizer.from_str(trimmed[1]["tokenizer.json"])
    old_of_new = np.array([old.token_to_id(new.id_to_token(j)) for j in range(new.get_vocab_size())])
    return old, new, old_of_new


@pytest.fixture(scope="module")
def saved(trimmed, tiny_dir, tmp_path_factory):
    """(trimmed checkpoint, its f32 GGUF, the original's f32 GGUF)."""
    out = tmp_path_factory.mktemp("vocab-trim")
    w2, files = trimmed
    ckpt = w2.save(out / "trimmed", extra_files=files)
    return (ckpt, convert(ckpt, out / "trimmed.gguf", outtype="f32").path,
            convert(tiny_dir, out / "orig.gguf", outtype="f32").path)


def llama_logits(path, ids):
    import edgelm

    with edgelm.load(path, n_ctx=256, n_threads=2, type_k="f32", type_v="f32", flash_attn=False) as m:
        m.ctx.clear()
        m.ctx.decode(ids, 0, logits_from=0)
        return m.ctx.all_logits(len(ids))


# ---------------------------------------------------------------- the tokenizer
def test_in_domain_text_tokenizes_as_before_and_any_text_round_trips(tiny, trimmed, toks, domain):
    w2, files = trimmed
    old, new, old_of_new = toks
    n = w2.config["vocab_size"]
    assert 256 < n < tiny.config["vocab_size"] // 2 and new.get_vocab_size() == n
    assert w2.tensors["model.embed_tokens.weight"].shape == w2.tensors["lm_head.weight"].shape == (n, 128)
    assert (np.diff(old_of_new) > 0).all()  # old relative order
    assert old.encode(domain).tokens == new.encode(domain).tokens
    for text in (OUT_OF_DOMAIN, domain[:500] + OUT_OF_DOMAIN, "".join(map(chr, range(1, 256)))):
        ids = new.encode(text, add_special_tokens=False).ids
        assert new.decode(ids, skip_special_tokens=False) == text
    # embedding and output rows moved with their tokens
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert np.array_equal(w2.tensors[name], tiny.tensors[name][old_of_new])


def test_special_ids_and_side_files_are_remapped(trimmed, toks):
    w2, files = trimmed
    _, new, _ = toks
    assert set(files) == {"tokenizer.json", "tokenizer_config.json", "generation_config.json",
                          "special_tokens_map.json"}
    gen = json.loads(files["generation_config.json"])
    for key, text in (("bos_token_id", "<|begin_of_text|>"), ("eos_token_id", "<|end_of_text|>"),
                      ("pad_token_id", "<|pad|>")):
        assert w2.config[key] == gen[key] == new.token_to_id(text)
    tj = json.loads(files["tokenizer.json"])
    assert all(new.id_to_token(t["id"]) == t["content"] for t in tj["added_tokens"])
    assert all(isinstance(m, list) and "".join(m) in tj["model"]["vocab"] for m in tj["model"]["merges"])


def test_string_merges_stay_strings_and_higher_min_count_keeps_fewer(tiny, tiny_dir, trimmed, domain, tmp_path):
    tj = json.loads((tiny_dir / "tokenizer.json").read_text())
    tj["model"]["merges"] = [" ".join(m) for m in tj["model"]["merges"]]  # the pre-0.20 form
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    w2, files = trim_vocab(replace(tiny, source=tmp_path), domain)
    merges = json.loads(files["tokenizer.json"])["model"]["merges"]
    assert merges == [" ".join(m) for m in json.loads(trimmed[1]["tokenizer.json"])["model"]["merges"]]
    assert set(files) == {"tokenizer.json"}  # only the side files the source has
    assert trim_vocab(tiny, domain, min_count=5)[0].config["vocab_size"] < w2.config["vocab_size"]


def test_trimming_again_reads_the_earlier_rewrite(trimmed, toks, domain):
    w2, files = trimmed
    w2 = replace(w2)
    w2.files = files  # side files an earlier edit rewrote replace the source's
    w3, files3 = trim_vocab(w2, domain[:4000])
    new3 = tokenizers.Tokenizer.from_str(files3["tokenizer.json"])
    assert w3.config["vocab_size"] < w2.config["vocab_size"]
    assert new3.encode(domain[:4000]).tokens == toks[0].encode(domain[:4000]).tokens
    assert new3.decode(new3.encode(OUT_OF_DOMAIN, add_special_tokens=False).ids, skip_special_tokens=False) \
        == OUT_OF_DOMAIN


# ---------------------------------------------------------------- the model
def test_llama_cpp_logits_are_the_originals_on_the_kept_ids(saved, toks, domain):
    import edgelm

    _, gguf, orig = saved
    old, new, old_of_new = toks
    old_ids = [0] + old.encode(domain, add_special_tokens=False).ids[:120]  # BOS + in-domain text
    new_of_old = {o: j for j, o in enumerate(old_of_new)}
    ref = llama_logits(orig, old_ids)[:, old_of_new]
    got = llama_logits(gguf, [new_of_old[i] for i in old_ids])
    assert np.abs(got - ref).max() <= 1e-3 * (ref.max() - ref.min())
    with edgelm.load(gguf, n_ctx=256, n_threads=2) as m:  # llama.cpp's tokenizer agrees with the new one
        for text in (domain[:3000], OUT_OF_DOMAIN):
            want = new.encode(text, add_special_tokens=False).ids
            assert m.tokenize(text, add_special=False, parse_special=True) == want


def test_transformers_loads_the_checkpoint_and_tokenizer(saved, trimmed, toks, domain):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ckpt, _, _ = saved
    _, new, _ = toks
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    assert hf.get_input_embeddings().weight.shape[0] == trimmed[0].config["vocab_size"]
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    ids = tok(domain[:1000])["input_ids"]
    assert ids == new.encode(domain[:1000]).ids and ids[0] == tok.bos_token_id == hf.config.bos_token_id
    with torch.no_grad():
        assert hf(torch.tensor([ids[:32]])).logits.shape == (1, 32, trimmed[0].config["vocab_size"])


# ---------------------------------------------------------------- bad input: one clear error
def _edit_tokenizer(tj: dict, case: str) -> None:
    if case == "wordlevel":
        tj["model"] = {"type": "WordLevel", "vocab": tj["model"]["vocab"], "unk_token": "<|pad|>"}
    elif case == "not-byte-level":
        tj["pre_tokenizer"], tj["decoder"] = {"type": "Whitespace"}, None


@pytest.mark.parametrize("case,phrase", [
    ("wordlevel", "supports byte-level BPE tokenizers, not a 'WordLevel' model"),
    ("not-byte-level", "no ByteLevel pre-tokenizer or decoder"),
    ("empty-text", "non-empty domain text"),
    ("bad-eos", "config.json eos_token_id: token id 99999 is not in"),
])
def test_bad_input_is_a_clear_error(tiny, tiny_dir, domain, tmp_path, case, phrase):
    tj = json.loads((tiny_dir / "tokenizer.json").read_text())
    _edit_tokenizer(tj, case)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    shutil.copy(tiny_dir / "generation_config.json", tmp_path)
    w = replace(tiny, source=tmp_path)
    if case == "bad-eos":
        w = replace(w, config=dict(w.config, eos_token_id=99999))
    with pytest.raises(ConversionError, match=phrase.replace("(", r"\(").replace(")", r"\)")):
        trim_vocab(w, "" if case == "empty-text" else domain)
