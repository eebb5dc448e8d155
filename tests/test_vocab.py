"""Tokenizer export: real vocabularies rebuilt as Hugging Face files, converted, tokenized by llama.cpp.

llama.cpp ships vocab-only GGUFs with test vectors (models/ggml-vocab-*.gguf, .inp, .out). Each fixture
rebuilds the Hugging Face tokenizer files such a GGUF came from (tokenizer.json through `tokenizers`,
tokenizer.model through sentencepiece's ModelProto), converts a one-layer checkpoint carrying them with
`edgelm convert`, and checks llama.cpp's tokenization of the result against the test vectors and against
the Hugging Face tokenizer itself on tests/data/tokenizer_corpus.txt.
"""
from __future__ import annotations

import json
import re
import shutil
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from edgelm.converters import convert
from edgelm.converters import vocab as V
from edgelm.converters.checkpoint import Checkpoint
from edgelm.errors import ConversionError
from edgelm.gguf_reader import read_gguf
from edgelm.runtime.model import LlamaModel, LoadOptions

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).parent / "data" / "tokenizer_corpus.txt"
# Whitespace the corpus file cannot hold reliably (editors and git rewrite it).
WHITESPACE = [
    " ", "  ", "\t", "\n", "\r\n", "\r", "\n\n\n", " \n \n", "\t\t\tx", "x\t\ty", "a" + " " * 17 + "b",
    "trailing   ", "   leading", "line one  \r\nline two\t\r\n\r\n", "tabs\tand  spaces \t mixed\t",
    "x" + "\n" * 5 + "y", " \t \n \r\n  \t\t ", "\u00a0nbsp\u00a0 \u2003em\u3000ideographic\u200bzero-width",
    "\x0bvt\x0cff\u2028ls\u2029ps", "    indented\n        more\n\tback", "end with newline\n",
]


def llama_cpp_dir() -> Path:
    """The llama.cpp sources scripts/setup_llama_cpp.sh unpacks on every machine."""
    found = sorted(ROOT.glob(".cache/llama_cpp_python-*/vendor/llama.cpp/models"))
    if not found:
        pytest.fail(f"llama.cpp sources missing under {ROOT}/.cache: run scripts/setup_llama_cpp.sh (make setup)")
    return found[-1].parent


def corpus_chunks() -> list[str]:
    text = CORPUS.read_text(encoding="utf-8")
    paragraphs = [p for p in text.split("\n\n") if p]
    lines = text.splitlines(keepends=True)
    return [text, *paragraphs, *(p.replace("\n", "\r\n") for p in paragraphs), *lines, *WHITESPACE]


def llama_cpp_vectors(name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's (input, expected ids) pairs, split as tests/test-tokenizer-0.cpp splits them."""
    base = llama_cpp_dir() / "models" / f"ggml-vocab-{name}.gguf"
    raw = base.with_name(base.name + ".inp").read_text(encoding="utf-8")
    outs = base.with_name(base.name + ".out").read_text(encoding="utf-8").splitlines()
    inputs = raw.split("\n__ggml_vocab_test__\n")
    if inputs[-1] == "":
        inputs.pop()
    assert len(inputs) == len(outs), name
    return [(text, [int(t) for t in out.split()]) for text, out in zip(inputs, outs)]




@dataclass
class SourceVocab:
    """A llama.cpp test vocabulary, read back from its GGUF."""

    tokens: list[str]
    types: list[int]
    scores: list[float]
    merges: list[str]
    meta: dict

    @classmethod
    def read(cls, name: str) -> "SourceVocab":
        g = read_gguf(llama_cpp_dir() / "models" / f"ggml-vocab-{name}.gguf")
        meta = {k: v for k, v in g.metadata.items() if k.startswith("tokenizer.")}
        return cls(meta.pop("tokenizer.ggml.tokens"), meta.pop("tokenizer.ggml.token_type"),
                   meta.pop("tokenizer.ggml.scores", []), meta.pop("tokenizer.ggml.merges", []), meta)

    def token(self, key: str) -> str | None:
        i = self.meta.get(f"tokenizer.ggml.{key}_token_id")
        return self.tokens[i] if i is not None else None


def write_checkpoint(d: Path, n_vocab: int) -> Path:
    """A one-layer Llama with random weights: the smallest thing `convert` turns into a GGUF."""
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": n_vocab, "hidden_size": 16,
           "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
           "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
    (d / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (n_vocab, 16), "model.norm.weight": (16,)}
    layer = {"input_layernorm": (16,), "post_attention_layernorm": (16,), "self_attn.q_proj": (16, 16),
             "self_attn.k_proj": (16, 16), "self_attn.v_proj": (16, 16), "self_attn.o_proj": (16, 16),
             "mlp.gate_proj": (32, 16), "mlp.up_proj": (32, 16), "mlp.down_proj": (16, 32)}
    shapes |= {f"model.layers.0.{k}.weight": s for k, s in layer.items()}
    save_file({k: rng.standard_normal(s).astype(np.float16) for k, s in shapes.items()}, d / "model.safetensors")
    return d


# ---------------------------------------------------------------- rebuilding Hugging Face tokenizer files

def _split(*regexes: str) -> list:
    return [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]


_BYTES = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
_GPT2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
_DIGITS = pre_tokenizers.Digits(individual_digits=True)

# name -> (pre-tokenizer as the model's tokenizer.json has it, ignore_merges, NFC normalizer, edgelm's name)
BPE_CASES = {
    "gpt-2": (lambda: _GPT2, False, False, "gpt-2"),
    "llama-bpe": (lambda: pre_tokenizers.Sequence([*_split(V.LLAMA3_REGEX), _BYTES]), True, False, "llama-bpe"),
    "qwen2": (lambda: pre_tokenizers.Sequence([*_split(V.QWEN2_REGEX), _BYTES]), False, True, "qwen2"),
    "deepseek-llm": (lambda: pre_tokenizers.Sequence([*_split(*V.DEEPSEEK_LLM_SPLITS), _BYTES]), False, False,
                     "deepseek-llm"),
    "deepseek-coder": (lambda: pre_tokenizers.Sequence([*_split(*V.DEEPSEEK_CODER_SPLITS[:-1]), _DIGITS, _BYTES]),
                       False, False, "deepseek-coder"),
    "starcoder": (lambda: pre_tokenizers.Sequence([_DIGITS, _GPT2]), False, False, "starcoder"),
    "refact": (lambda: pre_tokenizers.Sequence([_DIGITS, _GPT2]), False, False, "starcoder"),  # same split
    "mpt": (lambda: _GPT2, False, True, "gpt-2"),  # llama.cpp's "mpt" splits like gpt-2
}
# The other pre-tokenizers edgelm names: checked on gpt-2's vocabulary (its multi-digit and mixed-case
# tokens let a wrong split show; deepseek-coder's single-digit vocabulary hid qwen2 vs llama-bpe).
TABLE_ONLY = {name: key for key, name in V.PRE_TOKENIZERS.items() if name not in {c[3] for c in BPE_CASES.values()}}
SPM_CASES = ("llama-spm", "phi-3")


def write_bpe_tokenizer(d: Path, src: SourceVocab, pre, ignore_merges: bool, nfc: bool) -> Tokenizer:
    real = [(i, t, k) for i, (t, k) in enumerate(zip(src.tokens, src.types)) if not re.fullmatch(r"\[PAD\d+\]", t)]
    # added tokens sit in the model's vocab too, so `tokenizers` keeps their ids
    tok = Tokenizer(models.BPE({t: i for i, t, _ in real}, [tuple(m.split(" ", 1)) for m in src.merges],
                               ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for _, t, k in real if k == V.CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=True) for _, t, k in real if k == V.USER_DEFINED])
    assert all(tok.token_to_id(t) == i for i, t, _ in real)
    tok.save(str(d / "tokenizer.json"))
    cfg = {"bos_token": src.token("bos"), "eos_token": src.token("eos"), "add_bos_token": False}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tok


def spm_proto(pieces: list[tuple[str, float, int]], *, add_dummy_prefix: bool = True, model_type: int = 2) -> bytes:
    """A tokenizer.model with Llama's trainer and normalizer settings."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    for text, score, kind in pieces:
        m.pieces.add(piece=text, score=score, type=kind)
    m.trainer_spec.model_type = model_type
    m.trainer_spec.vocab_size = len(pieces)
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = 0, 1, 2, -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = add_dummy_prefix
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    return m.SerializeToString()


def spm_pieces(src: SourceVocab, n: int = 32000) -> list[tuple[str, float, int]]:
    """Llama's 32000 pieces; the types are SentencePiece's own (phi-3's GGUF rewrote a few)."""
    def kind(i: int, text: str) -> int:
        if i == 0:
            return V.UNKNOWN
        if i in (1, 2):
            return V.CONTROL
        return V.BYTE if text.startswith("<0x") and len(text) == 6 else V.NORMAL

    return [(t, 0.0 if i < 3 else s, kind(i, t)) for i, (t, s) in enumerate(zip(src.tokens[:n], src.scores[:n]))]


def write_spm_tokenizer(d: Path, name: str, src: SourceVocab) -> None:
    (d / "tokenizer.model").write_bytes(spm_proto(spm_pieces(src)))
    cfg: dict = {"bos_token": "<s>", "eos_token": src.token("eos"), "unk_token": "<unk>", "add_bos_token": True}
    if name == "phi-3":  # Phi-3's added tokens: </s> is not special there, the chat markers are
        decoder = {0: ("<unk>", True), 1: ("<s>", True), 2: ("</s>", False)}
        decoder |= {i: (src.tokens[i], True) for i in range(32000, len(src.tokens)) if src.types[i] == V.CONTROL}
        cfg["added_tokens_decoder"] = {str(i): {"content": t, "special": s} for i, (t, s) in decoder.items()}
        cfg["pad_token"] = "<|endoftext|>"
        cfg["chat_template"] = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))


# ---------------------------------------------------------------- converted fixtures

@dataclass
class Built:
    src: SourceVocab
    model: LlamaModel
    encode: object  # text -> Hugging Face ids
    expected_pre: str

    def llama(self, text: str) -> list[int]:
        return self.model.tokenize(text, add_special=False, parse_special=False)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    cache: dict[str, Built] = {}

    def get(name: str, table_entry: str | None = None) -> Built:
        key = table_entry or name
        if key in cache:
            return cache[key]
        d = tmp_path_factory.mktemp(key)
        src = SourceVocab.read(name)
        ckpt = write_checkpoint(d / "hf", len(src.tokens))
        if name in SPM_CASES:
            write_spm_tokenizer(ckpt, name, src)
            import sentencepiece

            sp = sentencepiece.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
            encode, expected = sp.encode, "default"
        else:
            if table_entry is None:
                make_pre, ignore_merges, nfc, expected = BPE_CASES[name]
                pre = make_pre()
            else:
                (splits, ignore_merges), nfc, expected = TABLE_ONLY[table_entry], False, table_entry
                pre = pre_tokenizers.Sequence([*_split(*splits), _BYTES])
            hf = write_bpe_tokenizer(ckpt, src, pre, ignore_merges, nfc)
            encode = lambda text, hf=hf: hf.encode(text, add_special_tokens=False).ids  # noqa: E731
        out = convert(ckpt, d / "vocab.gguf", outtype="f16").path
        cache[key] = Built(src, LlamaModel(out, LoadOptions(vocab_only=True)), encode, expected)
        return cache[key]

    yield get
    for b in cache.values():
        b.model.close()


ALL_CASES = [*BPE_CASES, *SPM_CASES]


@pytest.mark.parametrize("name", ALL_CASES)
def test_llama_cpp_test_vectors(build, name):
    """Our GGUF tokenizes llama.cpp's own test inputs to the ids its .out file expects."""
    b = build(name)
    got = [(text, b.llama(text), ids) for text, ids in llama_cpp_vectors(name)]
    assert not [g for g in got if g[1] != g[2]], [g for g in got if g[1] != g[2]][:3]


@pytest.mark.parametrize("name", ALL_CASES)
def test_matches_hugging_face(build, name):
    b = build(name)
    for text in corpus_chunks() + [t for t, _ in llama_cpp_vectors(name)]:
        assert b.llama(text) == b.encode(text), repr(text[:80])


@pytest.mark.parametrize("name", ALL_CASES)
def test_metadata_round_trip(build, name):
    """The tokens, merges and special ids edgelm writes are the ones llama.cpp's converter wrote."""
    b = build(name)
    g = b.model.gguf
    assert g.get("tokenizer.ggml.pre") == b.expected_pre
    tokens, types = g.get("tokenizer.ggml.tokens"), g.get("tokenizer.ggml.token_type")
    assert len(tokens) == len(b.src.tokens)
    pad = {i for i, t in enumerate(b.src.tokens) if re.fullmatch(r"\[PAD\d+\]", t)}
    assert [t for i, t in enumerate(tokens) if i not in pad] == [t for i, t in enumerate(b.src.tokens) if i not in pad]
    assert all(types[i] == V.UNUSED for i in pad)
    assert g.get("tokenizer.ggml.merges", []) == b.src.merges
    checked = ("bos", "eos", "unknown", "padding") if name in SPM_CASES else ("bos", "eos")
    for key in checked:
        assert g.get(f"tokenizer.ggml.{key}_token_id") == b.src.meta.get(f"tokenizer.ggml.{key}_token_id"), key
    if name in SPM_CASES:
        assert g.get("tokenizer.ggml.model") == "llama"
        assert g.get("tokenizer.ggml.scores")[3:32000] == pytest.approx(b.src.scores[3:32000])
        assert g.get("tokenizer.ggml.add_bos_token") is True


def test_nfc_is_left_to_the_caller(build):
    """Qwen2's tokenizer.json normalizes to NFC; llama.cpp (and its own converter) does not normalize,
    so decomposed text tokenizes differently there unless the caller normalizes it first."""
    b = build("qwen2")
    text = unicodedata.normalize("NFD", "résumé, café, Cửa Việt")
    assert b.llama(unicodedata.normalize("NFC", text)) == b.encode(text)
    assert b.llama(text) != b.encode(text)


@pytest.mark.parametrize("entry", sorted(TABLE_ONLY))
def test_pre_tokenizer_table_matches_llama_cpp(build, entry):
    """Every pre-tokenizer edgelm names splits in llama.cpp exactly as its regexes split in tokenizers."""
    b = build("gpt-2", table_entry=entry)
    assert b.model.gguf.get("tokenizer.ggml.pre") == entry
    for text in corpus_chunks() + [t for t, _ in llama_cpp_vectors("llama-bpe")]:
        assert b.llama(text) == b.encode(text), repr(text[:80])


def test_spm_added_tokens_and_padding(build):
    """Phi-3: added tokens take their types from tokenizer_config.json; unused rows pad to vocab_size."""
    g = build("phi-3").model.gguf
    types, tokens = g.get("tokenizer.ggml.token_type"), g.get("tokenizer.ggml.tokens")
    assert types[:3] == [V.UNKNOWN, V.CONTROL, V.USER_DEFINED]  # </s> is not special in Phi-3
    assert types[32000:32011] == [V.CONTROL] * 11 and types[32011:] == [V.UNUSED] * 53
    assert tokens[32063] == "[PAD32063]" and g.get("tokenizer.ggml.scores")[32063] == -10000.0
    assert g.get("tokenizer.ggml.eot_token_id") == tokens.index("<|end|>")
    assert "<|end|>" in g.get("tokenizer.chat_template")


# ---------------------------------------------------------------- SentencePiece variants

@pytest.fixture(scope="module")
def llama_pieces():
    return spm_pieces(SourceVocab.read("llama-spm"))


def spm_checkpoint(d: Path, proto: bytes, n_vocab: int) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"vocab_size": n_vocab}))
    (d / "tokenizer.model").write_bytes(proto)
    return d


def tokenize_both(tmp_path: Path, proto: bytes, n_vocab: int, texts: list[str]):
    """(llama.cpp ids, sentencepiece ids) per text, for a fully converted tokenizer.model."""
    import sentencepiece

    ckpt = write_checkpoint(tmp_path / "hf", n_vocab)
    (ckpt / "tokenizer.model").write_bytes(proto)
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    out = convert(ckpt, tmp_path / "v.gguf", outtype="f16").path
    with LlamaModel(out, LoadOptions(vocab_only=True)) as m:
        return m.gguf, [(m.tokenize(t, add_special=False), sp.encode(t), t) for t in texts]


def test_spm_without_dummy_prefix(tmp_path, llama_pieces):
    """add_dummy_prefix=false (Gemma-style) travels as tokenizer.ggml.add_space_prefix."""
    g, pairs = tokenize_both(tmp_path, spm_proto(llama_pieces, add_dummy_prefix=False), 32000, corpus_chunks())
    assert g.get("tokenizer.ggml.add_space_prefix") is False
    assert [t for a, b, t in pairs if a != b] == []


def test_spm_user_defined_pieces(tmp_path, llama_pieces):
    """USER_DEFINED pieces (invisible to sentencepiece's Python API) reach llama.cpp as user-defined tokens.

    llama.cpp then emits them whole, as sentencepiece does; text right after one gets llama.cpp's dummy
    prefix again (HF's legacy Llama behaviour), so ids around them can differ from sentencepiece's.
    """
    pieces = llama_pieces + [("<tool_call>", 0.0, V.USER_DEFINED), ("🦙🦙", 0.0, V.USER_DEFINED)]
    plain = [t for t in corpus_chunks() if "🦙🦙" not in t]
    g, pairs = tokenize_both(tmp_path, spm_proto(pieces), 32002, ["x<tool_call>{}", "🦙🦙🦙", *plain])
    assert g.get("tokenizer.ggml.token_type")[32000:] == [V.USER_DEFINED] * 2
    (call, call_sp, _), (llama, llama_sp, _) = pairs[:2]
    assert call[:2] == call_sp[:2] == [921, 32000] and llama[0] == 32001 and 32001 in llama_sp
    assert [t for a, b, t in pairs[2:] if a != b] == []


def test_spm_added_token_sources(tmp_path, llama_pieces):
    """added_tokens.json and tokenizer_config.json add rows; tokenizer_config.json's say decides the type."""
    d = spm_checkpoint(tmp_path, spm_proto(llama_pieces), 32004)
    (d / "added_tokens.json").write_text(json.dumps({"<extra>": 32000, "\u2581spaced": 32001, "<|tool|>": 32002}))
    decoder = {"32000": {"content": "<extra>", "special": True}}
    (d / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    v = vocab_of(d, 32004)
    assert v.tokens[32000:] == ["<extra>", " spaced", "<|tool|>", "[PAD32003]"]
    assert v.types[32000:] == [V.CONTROL, V.USER_DEFINED, V.CONTROL, V.UNUSED]  # <|tool|> looks special
    assert v.scores[32000:] == [-1000.0] * 3 + [-10000.0]
    assert v.special_ids == {"bos": 1, "eos": 2, "unk": 0} and v.add_bos and v.add_space_prefix


# ---------------------------------------------------------------- which file, and bad input

def tiny_tokenizer(d: Path, **changes) -> Path:
    """models/tiny's tokenizer files (byte-level BPE) with tokenizer.json keys replaced."""
    d.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "models" / "tiny" / name, d / name)
    tj = json.loads((ROOT / "models" / "tiny" / "tokenizer.json").read_text())
    (d / "tokenizer.json").write_text(json.dumps({**tj, **changes}))
    return d


def vocab_of(d: Path, n_vocab: int = 8192) -> V.Vocab:
    return V.load_vocab(Checkpoint(d, json.loads((d / "config.json").read_text()), {}), n_vocab)


SPM_DERIVED = {"model": {"type": "BPE", "byte_fallback": True, "vocab": {}, "merges": []},
               "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first"},
               "added_tokens": [{"id": 1, "content": "<s>", "special": True}]}


@pytest.mark.parametrize("tokenizer_json,model", [
    ("tiny", "gpt2"),  # byte-level tokenizer.json wins over a stray tokenizer.model
    (SPM_DERIVED, "llama"),  # a fast tokenizer converted from tokenizer.model: use the original
    ({**SPM_DERIVED, "pre_tokenizer": None}, "llama"),  # newer conversions normalize instead
])
def test_tokenizer_json_or_model(tmp_path, llama_pieces, tokenizer_json, model):
    d = tiny_tokenizer(tmp_path)
    if tokenizer_json != "tiny":
        (d / "tokenizer.json").write_text(json.dumps(tokenizer_json))
        (d / "tokenizer_config.json").write_text("{}")
    (d / "tokenizer.model").write_bytes(spm_proto(llama_pieces))
    v = vocab_of(d, 32000)
    want = ("llama-bpe", False, True) if model == "gpt2" else ("default", True, False)
    assert (v.model, v.pre, bool(v.scores), bool(v.merges)) == (model, *want)


def test_add_bos_and_special_ids_fall_back(tmp_path):
    """Without tokenizer_config.json flags and names: the post-processor and config.json decide."""
    d = tiny_tokenizer(tmp_path)
    (d / "tokenizer_config.json").write_text("{}")
    v = vocab_of(d)
    assert v.add_bos and not v.add_eos  # TemplateProcessing puts <|begin_of_text|> first
    assert v.special_ids == {"bos": 0, "eos": 1, "pad": 2, "eot": 4}  # from config.json
    d = tiny_tokenizer(tmp_path / "b", post_processor={"type": "ByteLevel"})
    (d / "tokenizer_config.json").write_text("{}")
    assert not vocab_of(d).add_bos


BAD_TOKENIZERS = [
    # (tokenizer.json changes, phrase expected in the error)
    ({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\s+|\\w+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}}, "Split('\\\\s+|\\\\w+', Isolated)"),
    ({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [  # Falcon's: the byte mapping comes mid-way
        {"type": "Punctuation", "behavior": "contiguous"}, {"type": "ByteLevel", "add_prefix_space": False},
        {"type": "Digits", "individual_digits": False}]}}, "Punctuation"),
    ({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}}, "add_prefix_space=True"),
    ({"pre_tokenizer": {"type": "Metaspace"}}, "unrecognised pre-tokenizer Metaspace"),
    ({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": V.QWEN2_REGEX}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}}, "ignore_merges=True"),
    ({"normalizer": {"type": "Lowercase"}}, "normalizer Lowercase"),
    ({"model": {"type": "Unigram", "vocab": []}}, "'Unigram' is not supported"),
]


@pytest.mark.parametrize("changes,phrase", BAD_TOKENIZERS)
def test_bad_tokenizer_json_names_the_problem(tmp_path, changes, phrase):
    d = tiny_tokenizer(tmp_path, **changes)
    with pytest.raises(ConversionError, match=re.escape(phrase)):
        vocab_of(d)


def test_unrecognised_pre_tokenizer_fails_conversion(tmp_path):
    d = write_checkpoint(tiny_tokenizer(tmp_path / "hf", pre_tokenizer={"type": "WhitespaceSplit"}), 8192)
    with pytest.raises(ConversionError, match="unrecognised pre-tokenizer WhitespaceSplit"):
        convert(d, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_missing_tokenizer(tmp_path):
    d = tiny_tokenizer(tmp_path)
    (d / "tokenizer.json").unlink()
    with pytest.raises(ConversionError, match="no tokenizer: missing tokenizer.json"):
        vocab_of(d)
    (d / "tokenizer.json").write_text(json.dumps(SPM_DERIVED))
    with pytest.raises(ConversionError, match="tokenizer.model, which is missing"):
        vocab_of(d)


@pytest.mark.parametrize("corrupt,phrase", [
    (lambda proto: b"\x00garbage, not a protobuf\xff" * 3, "not a valid SentencePiece model"),
    (lambda proto: proto[: len(proto) // 2], "not a valid SentencePiece model"),
    (lambda proto: b"", "not a valid SentencePiece model"),
])
def test_corrupt_tokenizer_model(tmp_path, llama_pieces, corrupt, phrase):
    d = spm_checkpoint(tmp_path, corrupt(spm_proto(llama_pieces)), 32000)
    with pytest.raises(ConversionError, match=phrase):
        vocab_of(d, 32000)


def test_unsupported_sentencepiece_models(tmp_path, llama_pieces):
    d = spm_checkpoint(tmp_path, spm_proto(llama_pieces, model_type=1), 32000)
    with pytest.raises(ConversionError, match="model type unigram"):
        vocab_of(d, 32000)
    d = spm_checkpoint(tmp_path / "small", spm_proto(llama_pieces), 100)
    with pytest.raises(ConversionError, match="32000 tokens but the model only 100 embedding rows"):
        vocab_of(d, 100)


# ---------------------------------------------------------------- edgelm's own reference tokenizer

def test_reference_tokenizer_matches_hugging_face(tiny_gguf):
    """models/tokenizer.json (models/tiny and models/small share it) through llama.cpp and transformers."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(ROOT / "models" / "tokenizer.json"))
    with LlamaModel(tiny_gguf["f32"], LoadOptions(vocab_only=True)) as m:
        for text in corpus_chunks():
            assert m.tokenize(text, add_special=False) == hf.encode(text, add_special_tokens=False), repr(text[:80])
        assert m.tokenize("hi")[0] == m.bos  # add_bos_token
    small = V.load_vocab(Checkpoint.open(ROOT / "models" / "small"), 8192)
    tiny = V.load_vocab(Checkpoint.open(ROOT / "models" / "tiny"), 8192)
    assert small == tiny and tiny.pre == "llama-bpe"
