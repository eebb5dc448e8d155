"""Tokenizer export: a checkpoint's tokenizer -> tokenizer.ggml.* keys.

Two sources, as llama.cpp knows them: byte-level BPE from tokenizer.json
(model "gpt2") and SentencePiece BPE from tokenizer.model (model "llama").
llama.cpp re-implements each family, and for BPE picks the pre-tokenizer (the
regex split before BPE) from `tokenizer.ggml.pre`. A wrong choice gives a model
that loads and silently tokenizes differently, so whatever llama.cpp cannot
reproduce is an error here, never a guess.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgelm.errors import ConversionError

from .checkpoint import Checkpoint

# llama.cpp token types (gguf TokenType); SentencePiece numbers its piece types the same way
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes as tokenizer.json spells them (llama.cpp's src/llama-vocab.cpp keeps
# the same originals beside its adapted copies); GPT2_REGEX is the split ByteLevel(use_regex) makes.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN35_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT4O_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEKKEN_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
DEEPSEEK_LLM_SPLITS = (
    r"[\r\n]",
    # six letters spelled as escapes: Unicode normalization (NFC, as some editors apply) would fold them
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚ"
    "Ḁ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    r"[一-龥ࠀ-一가-퟿]+",
    r"\p{N}+",
)
DEEPSEEK_CODER_SPLITS = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}")
DEEPSEEK_V3_SPLITS = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r'[!"#$%&' r"'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)

# (regex splits in order, model.ignore_merges) -> llama.cpp pre-tokenizer name. Names that share
# one split (refact, command-r and smollm split like starcoder) differ in llama.cpp only in
# detokenizer cleanup, so the split decides. ignore_merges must match llama.cpp's own flag.
PRE_TOKENIZERS: dict[tuple[tuple[str, ...], bool], str] = {
    ((GPT2_REGEX,), False): "gpt-2",
    ((r"\p{N}", GPT2_REGEX), False): "starcoder",
    ((LLAMA3_REGEX,), True): "llama-bpe",
    ((LLAMA3_REGEX,), False): "smaug-bpe",  # the Llama 3 split without ignore_merges
    ((QWEN2_REGEX,), False): "qwen2",
    ((QWEN35_REGEX,), False): "qwen35",
    ((GPT4O_REGEX,), False): "gpt-4o",
    ((TEKKEN_REGEX,), True): "tekken",
    (DEEPSEEK_LLM_SPLITS, False): "deepseek-llm",
    (DEEPSEEK_CODER_SPLITS, False): "deepseek-coder",
    (DEEPSEEK_V3_SPLITS, False): "deepseek-v3",
}
# End-of-turn markers of common chat formats; llama.cpp stops on them too.
_EOT_TEXTS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
_PAD_SCORE, _ADDED_SCORE = -10000.0, -1000.0  # llama.cpp's scores for padding and added SentencePiece rows


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] = field(default_factory=list)  # SentencePiece only: merge priority
    merges: list[str] = field(default_factory=list)  # BPE only
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, pad, unk, eot
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None  # SentencePiece only: the model's add_dummy_prefix
    chat_template: str | None = None


def load_vocab(ckpt: Checkpoint, n_vocab: int) -> Vocab:
    """Read the checkpoint's tokenizer; pad to the model's `n_vocab` rows."""
    tj = ckpt.json_file("tokenizer.json")
    spm_file = ckpt.path / "tokenizer.model"
    if tj is not None and not is_spm_derived(tj):
        vocab = _bpe_vocab(ckpt, tj)
    elif spm_file.is_file():
        # an SPM-derived tokenizer.json is a lossy copy: the scores live in tokenizer.model
        vocab = _spm_vocab(spm_file)
    elif tj is None:
        raise ConversionError(f"{ckpt.path}: no tokenizer: missing tokenizer.json (and tokenizer.model)")
    else:
        raise ConversionError(
            f"{ckpt.path}: tokenizer.json is a SentencePiece-style BPE (byte_fallback, no byte-level "
            "pre-tokenizer) whose scores llama.cpp needs from tokenizer.model, which is missing"
        )
    cfg = ckpt.json_file("tokenizer_config.json") or {}
    _add_tokens(vocab, _added_tokens(ckpt, tj, cfg))
    _pad(vocab, n_vocab, ckpt.path)
    vocab.special_ids = _special_ids(ckpt, cfg, vocab)
    spm = vocab.model == "llama"
    vocab.add_bos = _add_flag(cfg, tj, "bos", vocab, default=spm)  # LlamaTokenizer adds BOS by default
    vocab.add_eos = _add_flag(cfg, tj, "eos", vocab, default=False)
    vocab.chat_template = _chat_template(ckpt, cfg)
    return vocab


def is_spm_derived(tj: dict) -> bool:
    """A fast tokenizer converted from SentencePiece: BPE with byte fallback, Metaspace or no pre-tokenizer."""
    model = tj.get("model") or {}
    pre = tj.get("pre_tokenizer")
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and (
        pre is None or pre.get("type") == "Metaspace"
    )


# ---------------------------------------------------------------- byte-level BPE (tokenizer.json)

def _signature(pre: dict | None) -> str:
    """A readable one-line description of a pre-tokenizer, for error messages."""
    if pre is None:
        return "none"
    kind = pre.get("type")
    if kind == "Sequence":
        return "Sequence[" + ", ".join(_signature(p) for p in pre.get("pretokenizers", [])) + "]"
    if kind == "Split":
        pattern = pre.get("pattern", {})
        return f"Split({pattern.get('Regex') or pattern.get('String')!r}, {pre.get('behavior')})"
    if kind == "ByteLevel":
        return f"ByteLevel(use_regex={pre.get('use_regex', True)}, add_prefix_space={pre.get('add_prefix_space')})"
    if kind == "Digits":
        return f"Digits(individual_digits={pre.get('individual_digits', False)})"
    return str(kind)


def _splits(pre: dict | None) -> tuple[str, ...] | None:
    """The regex splits a byte-level pre-tokenizer applies, or None if it has no llama.cpp form."""
    steps = [pre] if pre else []
    while any(s.get("type") == "Sequence" for s in steps):
        steps = [p for s in steps for p in (s.get("pretokenizers", []) if s.get("type") == "Sequence" else [s])]
    regexes: list[str] = []
    for i, step in enumerate(steps):
        kind = step.get("type")
        pattern = step.get("pattern") or {}
        if kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert") and "Regex" in pattern:
            regexes.append(pattern["Regex"])
        elif kind == "Digits":  # Rust's char::is_numeric is \p{N}
            regexes.append(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
        elif kind == "ByteLevel" and not step.get("add_prefix_space") and i == len(steps) - 1:
            if step.get("use_regex", True):
                regexes.append(GPT2_REGEX)
            # llama.cpp spells control characters as escapes; tokenizer.json may hold them raw
            return tuple(r.replace("\r", r"\r").replace("\n", r"\n") for r in regexes)
        else:
            return None  # e.g. a ByteLevel before other splits would match byte-mapped text
    return None  # no byte-level mapping at all


def detect_pre(tokenizer_json: dict) -> str:
    """The llama.cpp pre-tokenizer name equivalent to this tokenizer.json's pre_tokenizer."""
    pre = tokenizer_json.get("pre_tokenizer")
    ignore_merges = bool((tokenizer_json.get("model") or {}).get("ignore_merges", False))
    splits = _splits(pre)
    name = PRE_TOKENIZERS.get((splits, ignore_merges)) if splits is not None else None
    if name is None:
        known = ", ".join(sorted(set(PRE_TOKENIZERS.values())))
        raise ConversionError(
            f"unrecognised pre-tokenizer {_signature(pre)} (ignore_merges={ignore_merges}); edgelm knows: {known}"
        )
    return name


def _bpe_vocab(ckpt: Checkpoint, tj: dict) -> Vocab:
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ConversionError(f"{ckpt.path}: tokenizer model {model.get('type')!r} is not supported (BPE only)")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise ConversionError(f"{ckpt.path}: BPE {key}={model[key]!r} has no llama.cpp equivalent")
    normalizer = tj.get("normalizer")
    # llama.cpp does not normalize; NFC (Qwen2, MPT) changes only non-NFC input, as in llama.cpp's own converter
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise ConversionError(
            f"{ckpt.path}: tokenizer.json normalizer {normalizer.get('type')} has no llama.cpp equivalent"
        )
    pre = detect_pre(tj)
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    size = max(vocab.values(), default=-1) + 1
    tokens: list[str | None] = [None] * size
    for text, i in vocab.items():
        tokens[i] = text
    # merges are "a b" strings or, since tokenizers 0.20, [a, b] pairs; llama.cpp writes a space as U+0120
    merges = [
        m if isinstance(m, str) else " ".join(part.replace(" ", "\u0120") for part in m)
        for m in model.get("merges", [])
    ]
    return Vocab(model="gpt2", pre=pre, tokens=tokens, types=[NORMAL] * size, merges=merges)  # type: ignore[arg-type]


# ---------------------------------------------------------------- SentencePiece (tokenizer.model)

@dataclass
class _SpmSpec:
    """The ModelProto fields llama.cpp's SentencePiece tokenizer depends on (proto2 defaults)."""

    model_type: int = 1  # 1 unigram, 2 BPE, 3 word, 4 char
    byte_fallback: bool = False
    whitespace_as_suffix: bool = False
    normalizer: str = ""
    charsmap: bool = False  # a precompiled normalization map (nmt_nfkc and friends)
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True
    user_defined: set[int] = field(default_factory=set)  # piece ids of type USER_DEFINED


def _proto_fields(buf: bytes):
    """(field number, value) pairs of one protobuf message: ints for varints, bytes for the rest."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire in (1, 5):  # fixed64 / fixed32 (scores): not needed here
            size = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > end:
            raise ValueError("truncated protobuf message")
        yield number, value


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated protobuf varint")
        b = buf[pos]
        value |= (b & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not b & 0x80:
            return value, pos


_NORMALIZER_FLAGS = {3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}


def _spm_spec(data: bytes) -> _SpmSpec:
    # sentencepiece's Python API hides the normalizer and trainer specs; the wire format is simple
    spec, n_pieces = _SpmSpec(), 0
    for number, value in _proto_fields(data):
        if number == 1:  # SentencePiece {1: piece, 2: score, 3: type}
            if any(f == 3 and v == USER_DEFINED for f, v in _proto_fields(value)):
                spec.user_defined.add(n_pieces)
            n_pieces += 1
        elif number == 2:  # TrainerSpec
            for f, v in _proto_fields(value):
                if f == 3:
                    spec.model_type = v
                elif f == 24:
                    spec.whitespace_as_suffix = bool(v)
                elif f == 35:
                    spec.byte_fallback = bool(v)
        elif number == 3:  # NormalizerSpec
            for f, v in _proto_fields(value):
                if f == 1:
                    spec.normalizer = v.decode("utf-8", "replace")
                elif f == 2:
                    spec.charsmap = len(v) > 0
                elif f in _NORMALIZER_FLAGS:
                    setattr(spec, _NORMALIZER_FLAGS[f], bool(v))
    return spec


def _check_spm_spec(spec: _SpmSpec, path: Path) -> None:
    """Refuse what llama.cpp's "llama" tokenizer (score-ordered BPE merges, no normalizer) cannot mirror."""
    problems = []
    if spec.model_type != 2:
        kind = {1: "unigram", 3: "word", 4: "char"}.get(spec.model_type, str(spec.model_type))
        problems.append(f"model type {kind} (llama.cpp's SentencePiece tokenizer is BPE)")
    if spec.charsmap:
        problems.append(f"normalizer {spec.normalizer or 'custom'!r} (llama.cpp applies none)")
    if spec.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces (llama.cpp keeps every space)")
    if not spec.escape_whitespaces or spec.whitespace_as_suffix:
        problems.append("unescaped or suffix whitespace (llama.cpp prefixes \u2581)")
    if not spec.byte_fallback:
        problems.append("no byte_fallback (llama.cpp spells unknown characters as <0xXX> pieces)")
    if problems:
        raise ConversionError(f"{path}: unsupported SentencePiece model: {'; '.join(problems)}")


def _spm_vocab(path: Path) -> Vocab:
    import sentencepiece

    data = path.read_bytes()
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(data)
        spec = _spm_spec(data)
    except (RuntimeError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"{path}: not a valid SentencePiece model ({reason})") from None
    _check_spm_spec(spec, path)
    tokens, scores, types = [], [], []
    for i in range(sp.GetPieceSize()):
        text = sp.IdToPiece(i)
        if sp.IsUnknown(i):
            kind = UNKNOWN
        elif sp.IsControl(i):
            kind = CONTROL
        elif sp.IsUnused(i):
            kind = UNUSED
        elif sp.IsByte(i):
            kind = BYTE
        elif i in spec.user_defined:
            kind, text = USER_DEFINED, text.replace("\u2581", " ")  # matched in raw text by llama.cpp
        else:
            kind = NORMAL
        tokens.append(text)
        scores.append(sp.GetScore(i))
        types.append(kind)
    defaults = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
    return Vocab(
        model="llama",
        pre="default",
        tokens=tokens,
        types=types,
        scores=scores,
        special_ids={k: v for k, v in defaults.items() if v >= 0},
        add_space_prefix=spec.add_dummy_prefix,
    )


# ---------------------------------------------------------------- shared: added tokens, padding, specials

def _looks_special(text: str) -> bool:
    """Added tokens some models forget to mark special; llama.cpp's converter makes them control tokens."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<｜") and text.endswith("｜>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def _added_tokens(ckpt: Checkpoint, tj: dict | None, cfg: dict) -> dict[int, tuple[str, bool]]:
    """id -> (text, special) from tokenizer.json, added_tokens.json and tokenizer_config.json (later wins)."""
    added: dict[int, tuple[str, bool]] = {}
    for tok in (tj or {}).get("added_tokens", []):
        added[tok["id"]] = (tok["content"], bool(tok.get("special")))
    for text, i in (ckpt.json_file("added_tokens.json") or {}).items():
        added[int(i)] = (text, False)
    for i, tok in (cfg.get("added_tokens_decoder") or {}).items():
        added[int(i)] = (tok["content"], bool(tok.get("special")))
    return added


def _add_tokens(vocab: Vocab, added: dict[int, tuple[str, bool]]) -> None:
    grow = max(added, default=-1) + 1 - len(vocab.tokens)
    if grow > 0:
        vocab.tokens += [None] * grow  # type: ignore[list-item]
        vocab.types += [UNUSED] * grow
        if vocab.scores:
            vocab.scores += [_PAD_SCORE] * grow
    for i, (text, special) in added.items():
        if vocab.types[i] == UNKNOWN and special:
            continue  # SentencePiece's own <unk> stays the unknown token
        if special or _looks_special(text):
            vocab.types[i] = CONTROL
        else:
            vocab.types[i] = USER_DEFINED
            if vocab.model == "llama":  # llama.cpp matches user-defined tokens in raw text, spaces unescaped
                text = text.replace("\u2581", " ")
        vocab.tokens[i] = text
        if vocab.scores:
            vocab.scores[i] = _ADDED_SCORE


def _pad(vocab: Vocab, n_vocab: int, where: Path) -> None:
    if len(vocab.tokens) > n_vocab:
        raise ConversionError(
            f"{where}: tokenizer has {len(vocab.tokens)} tokens but the model only {n_vocab} embedding rows"
        )
    grow = n_vocab - len(vocab.tokens)
    vocab.tokens += [None] * grow  # type: ignore[list-item]
    vocab.types += [UNUSED] * grow
    if vocab.scores:
        vocab.scores += [_PAD_SCORE] * grow
    for i, text in enumerate(vocab.tokens):
        if text is None:  # rows the tokenizer never produces
            vocab.tokens[i], vocab.types[i] = f"[PAD{i}]", UNUSED


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _special_ids(ckpt: Checkpoint, cfg: dict, vocab: Vocab) -> dict[str, int]:
    """bos/eos/pad/unk from tokenizer_config.json texts, else config.json ids, else the model's defaults."""
    lookup = {text: i for i, text in reversed(list(enumerate(vocab.tokens)))}
    found: dict[str, int] = {}
    for key in ("bos", "eos", "pad", "unk"):
        text = _token_text(cfg.get(f"{key}_token"))
        if text is not None:
            if text not in lookup:
                raise ConversionError(f"{ckpt.path}: {key}_token {text!r} is not in the vocabulary")
            found[key] = lookup[text]
            continue
        value = ckpt.config.get(f"{key}_token_id")
        if isinstance(value, int) and 0 <= value < len(vocab.tokens):
            found[key] = value
        elif key in vocab.special_ids:  # SentencePiece's trainer ids
            found[key] = vocab.special_ids[key]
    for text in _EOT_TEXTS:
        if text in lookup:
            found["eot"] = lookup[text]
            break
    return found


def _add_flag(cfg: dict, tj: dict | None, key: str, vocab: Vocab, default: bool) -> bool:
    """add_bos/add_eos: tokenizer_config.json's flag, else what tokenizer.json's post-processor adds."""
    flag = cfg.get(f"add_{key}_token")
    if isinstance(flag, bool):
        return flag
    post = (tj or {}).get("post_processor")
    if not post:
        return default
    special = vocab.special_ids.get(key)
    for proc in post.get("processors", [post]):
        if proc.get("type") == "TemplateProcessing":
            single = proc.get("single") or [{}]
            end = single[0] if key == "bos" else single[-1]
            text = (end.get("SpecialToken") or {}).get("id")
            return special is not None and text == vocab.tokens[special]
    return False  # ByteLevel and the like add nothing


def _chat_template(ckpt: Checkpoint, cfg: dict) -> str | None:
    template = cfg.get("chat_template")
    if template is None:
        template = (ckpt.json_file("chat_template.json") or {}).get("chat_template")
    if isinstance(template, list):  # named templates: llama.cpp takes the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja = ckpt.path / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    return template
