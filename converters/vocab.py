"""Tokenizer export: tokenizer.json / tokenizer_config.json -> tokenizer.ggml.* keys.

llama.cpp re-implements each tokenizer family and picks the pre-tokenizer
(the regex split before BPE) from `tokenizer.ggml.pre`. A wrong name gives a
model that loads and silently tokenizes differently, so an unrecognised
pre-tokenizer is an error here, never a guess.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from edgelm.errors import ConversionError

from .checkpoint import Checkpoint

# llama.cpp token types (llama_token_type / gguf TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# End-of-turn markers of common chat formats; llama.cpp stops on them too.
_EOT_TEXTS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str | None
    tokens: list[str]
    types: list[int]
    merges: list[str] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, pad, unk, eot
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


def _signature(pre: dict | None) -> str:
    """A readable one-line description of a pre-tokenizer, for error messages."""
    if pre is None:
        return "none"
    kind = pre.get("type")
    if kind == "Sequence":
        return "Sequence[" + ", ".join(_signature(p) for p in pre.get("pretokenizers", [])) + "]"
    if kind == "Split":
        pattern = pre.get("pattern", {})
        return f"Split({pattern.get('Regex') or pattern.get('String')!r})"
    if kind == "ByteLevel":
        return f"ByteLevel(use_regex={pre.get('use_regex', True)})"
    return str(kind)


def detect_pre(tokenizer_json: dict) -> str:
    """The llama.cpp pre-tokenizer name equivalent to this tokenizer.json's pre_tokenizer."""
    pre = tokenizer_json.get("pre_tokenizer")
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        if (
            len(parts) == 2
            and parts[0].get("type") == "Split"
            and parts[0].get("pattern", {}).get("Regex") == LLAMA3_REGEX
            and parts[1].get("type") == "ByteLevel"
            and not parts[1].get("use_regex", True)
        ):
            return "llama-bpe"
    raise ConversionError(
        f"unrecognised pre-tokenizer {_signature(pre)}; edgelm knows: gpt-2, llama-bpe"
    )


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def load_vocab(ckpt: Checkpoint, n_vocab: int) -> Vocab:
    """Read the checkpoint's tokenizer; pad to the model's `n_vocab` rows."""
    tj = ckpt.json_file("tokenizer.json")
    if tj is None:
        raise ConversionError(f"{ckpt.path}: missing tokenizer.json (tokenizer.model is not supported yet)")
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise ConversionError(f"{ckpt.path}: tokenizer model {model.get('type')!r} is not supported yet (BPE only)")
    pre = detect_pre(tj)

    vocab: dict[str, int] = dict(model["vocab"])
    special_texts = set()
    added_types = {}
    for tok in tj.get("added_tokens", []):
        vocab[tok["content"]] = tok["id"]
        added_types[tok["id"]] = CONTROL if tok.get("special") else USER_DEFINED
        if tok.get("special"):
            special_texts.add(tok["content"])
    size = max(n_vocab, max(vocab.values()) + 1)
    if size > n_vocab:
        raise ConversionError(f"{ckpt.path}: tokenizer has {size} tokens but the model only {n_vocab} embedding rows")
    tokens: list[str | None] = [None] * size
    for text, i in vocab.items():
        tokens[i] = text
    types = [added_types.get(i, NORMAL) for i in range(size)]
    for i, text in enumerate(tokens):
        if text is None:  # rows the tokenizer never produces
            tokens[i], types[i] = f"[PAD{i}]", UNUSED

    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    cfg = ckpt.json_file("tokenizer_config.json") or {}
    special_ids = {}
    for key in ("bos", "eos", "pad", "unk"):
        text = _token_text(cfg.get(f"{key}_token"))
        if text is not None:
            if text not in vocab:
                raise ConversionError(f"{ckpt.path}: {key}_token {text!r} is not in the vocabulary")
            special_ids[key] = vocab[text]
    for text in _EOT_TEXTS:
        if text in vocab:
            special_ids["eot"] = vocab[text]
            break

    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: llama.cpp takes the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja = ckpt.path / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")

    return Vocab(
        model="gpt2",
        pre=pre,
        tokens=tokens,  # type: ignore[arg-type]
        types=types,
        merges=merges,
        special_ids=special_ids,
        add_bos=bool(cfg.get("add_bos_token", False)),
        add_eos=bool(cfg.get("add_eos_token", False)),
        chat_template=template,
    )
