"""Vocabulary trimming: keep only the tokens a domain corpus uses, with the tokenizer rewritten to match.

A byte-level BPE vocabulary is a set of merges over a 256-character alphabet. Keeping the alphabet,
the special tokens, the tokens the domain uses and every token their merges pass through leaves a
tokenizer that encodes in-domain text to exactly the same token strings as before (BPE applies the
lowest-ranked applicable merge, and every merge it applies there produces a kept token) and still
encodes anything else, into shorter tokens. Embedding and output rows follow the kept ids in order.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from edgelm.errors import ConversionError

from .surgery import Weights

_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")  # config.json / generation_config.json
_VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")  # (vocab, hidden) matrices


def trim_vocab(w: Weights, text: str, *, min_count: int = 1) -> tuple[Weights, dict[str, str]]:
    """Keep the tokens `text` uses at least `min_count` times (plus specials, the byte alphabet and their
    merge ancestors). Returns the new weights and the rewritten side files, for `Weights.save(extra_files=)`."""
    if not text:
        raise ConversionError("vocabulary trimming needs a non-empty domain text")
    if min_count < 1:
        raise ConversionError(f"min_count must be at least 1, not {min_count}")
    tj = _json(w, "tokenizer.json", required=True)
    _check_byte_level(tj, w.source / "tokenizer.json")
    tokens = id_to_token(tj)
    gen = _json(w, "generation_config.json")
    cfg = _json(w, "tokenizer_config.json")
    pinned = _pinned_ids(w.config, gen, cfg, tj, tokens)

    counts = _count(tj, text)
    seeds = {tokens[i] for i, n in counts.items() if n >= min_count} | {tokens[i] for i in pinned}
    seeds |= {t["content"] for t in tj.get("added_tokens", [])}
    seeds |= {t for t in tokens.values() if len(t) == 1}  # the byte alphabet: any text still encodes
    if (unk := tj["model"].get("unk_token")) is not None:
        seeds.add(unk)
    kept_text = _merge_closure(seeds, _merges(tj["model"]), set(tj["model"]["vocab"]))
    old_ids = sorted(i for i, t in tokens.items() if t in kept_text)
    new_id = {old: new for new, old in enumerate(old_ids)}  # old relative order

    rows = w.tensors["model.embed_tokens.weight"].shape[0]
    if old_ids[-1] >= rows:
        raise ConversionError(f"{w.source}: token id {old_ids[-1]} has no embedding row (the model has {rows})")
    tensors = dict(w.tensors)
    for name in _VOCAB_ROWS:
        if name in tensors:
            tensors[name] = tensors[name][old_ids]
    config = _remap_ids(dict(w.config, vocab_size=len(old_ids)), new_id)

    files = {"tokenizer.json": _dump(_rewrite_tokenizer(tj, new_id, kept_text))}
    if cfg is not None:
        files["tokenizer_config.json"] = _dump(_rewrite_tokenizer_config(cfg, new_id))
    if gen is not None:
        files["generation_config.json"] = _dump(_remap_ids(gen, new_id))
    if (special := _json(w, "special_tokens_map.json")) is not None:  # names tokens by text: unchanged
        files["special_tokens_map.json"] = _dump(special)
    return w.with_(config, tensors), files


# ---------------------------------------------------------------- reading the tokenizer
def _json(w: Weights, name: str, required: bool = False) -> dict | None:
    """A side file as the checkpoint would save it: an earlier edit's rewrite (`w.files`), else the source's."""
    path = w.source / name
    if name in (files := getattr(w, "files", None) or {}):
        text = files[name]
    elif path.is_file():
        text = path.read_text(encoding="utf-8")
    elif required:
        raise ConversionError(f"{path}: missing; vocabulary trimming needs a tokenizer.json")
    else:
        return None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def _has_type(node, kind: str) -> bool:
    """Whether a (possibly Sequence-nested) pre_tokenizer/decoder contains a step of type `kind`."""
    if isinstance(node, dict):
        return node.get("type") == kind or any(_has_type(v, kind) for v in node.values())
    if isinstance(node, list):
        return any(_has_type(v, kind) for v in node)
    return False


def _check_byte_level(tj: dict, path: Path) -> None:
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ConversionError(f"{path}: vocabulary trimming supports byte-level BPE tokenizers, "
                              f"not a {model.get('type')!r} model")
    if not (_has_type(tj.get("pre_tokenizer"), "ByteLevel") or _has_type(tj.get("decoder"), "ByteLevel")):
        raise ConversionError(f"{path}: vocabulary trimming supports byte-level BPE tokenizers; this BPE has no "
                              "ByteLevel pre-tokenizer or decoder (its alphabet is not the 256 bytes)")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):  # merges would no longer concatenate: a + b != result
            raise ConversionError(f"{path}: vocabulary trimming does not support BPE {key}={model[key]!r}")


def id_to_token(tj: dict) -> dict[int, str]:
    """Every id the tokenizer knows: model.vocab and added tokens (which may lie past it)."""
    tokens = {i: t for t, i in tj["model"]["vocab"].items()}
    tokens |= {t["id"]: t["content"] for t in tj.get("added_tokens", [])}
    return tokens


def _merges(model: dict) -> list[tuple[str, str]]:
    # "a b" strings or, since tokenizers 0.20, [a, b] pairs; byte-level tokens hold no spaces
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]


def _pinned_ids(config: dict, gen: dict | None, cfg: dict | None, tj: dict, tokens: dict[int, str]) -> set[int]:
    """Ids the side files name, kept whatever the domain uses; each must exist in the tokenizer."""
    named = [(f"config.json {k}", config.get(k)) for k in _ID_KEYS]
    named += [(f"generation_config.json {k}", (gen or {}).get(k)) for k in _ID_KEYS]
    decoder = (cfg or {}).get("added_tokens_decoder") or {}
    named += [("tokenizer_config.json added_tokens_decoder", int(k)) for k in decoder]
    named += [("tokenizer.json post_processor", i) for i in _ids_in(tj)]
    ids = set()
    for where, value in named:
        for i in value if isinstance(value, list) else [] if value is None else [value]:
            if not isinstance(i, int) or i not in tokens:
                raise ConversionError(f"{where}: token id {i!r} is not in the tokenizer's vocabulary")
            ids.add(i)
    return ids


# ---------------------------------------------------------------- choosing what to keep
def _count(tj: dict, text: str) -> Counter:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(json.dumps(tj))
    except Exception as e:  # the Rust side raises a bare Exception
        raise ConversionError(f"tokenizer.json does not load in tokenizers ({e})") from None
    return Counter(tok.encode(text, add_special_tokens=False).ids)


def _merge_closure(seeds: set[str], merges: list[tuple[str, str]], vocab: set[str]) -> set[str]:
    """`seeds` plus both parts of every merge that produces a kept token, recursively."""
    parts: dict[str, list[tuple[str, str]]] = {}
    for a, b in merges:
        parts.setdefault(a + b, []).append((a, b))
    kept, todo = set(seeds), list(seeds)
    while todo:
        for pair in parts.get(todo.pop(), ()):
            for p in pair:
                if p not in kept:
                    if p not in vocab:
                        raise ConversionError(f"tokenizer.json: merge {' '.join(pair)!r} uses {p!r}, "
                                              "which is not in the vocabulary")
                    kept.add(p)
                    todo.append(p)
    return kept


# ---------------------------------------------------------------- rewriting ids
def _remap_ids(config: dict, new_id: dict[int, int]) -> dict:
    out = dict(config)
    for key in _ID_KEYS:
        value = out.get(key)
        if isinstance(value, list):
            out[key] = [new_id[i] for i in value]
        elif value is not None:
            out[key] = new_id[value]
    return out


def _map_post_processor(node, f):
    """TemplateProcessing special_tokens ids and Bert/Roberta (text, id) pairs, inside Sequences too, through f."""
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if node.get("type") == "Sequence":
        node["processors"] = [_map_post_processor(p, f) for p in node.get("processors", [])]
    if node.get("type") == "TemplateProcessing":
        node["special_tokens"] = {k: dict(v, ids=[f(i) for i in v["ids"]])
                                  for k, v in node.get("special_tokens", {}).items()}
    for key in ("sep", "cls"):
        if isinstance(node.get(key), list) and len(node[key]) == 2:
            node[key] = [node[key][0], f(node[key][1])]
    return node


def _ids_in(tj: dict) -> list[int]:
    """Token ids tokenizer.json names outside the vocabulary: post-processor and padding."""
    ids: list[int] = []
    _map_post_processor(tj.get("post_processor"), lambda i: ids.append(i) or i)
    if isinstance(tj.get("padding"), dict) and "pad_id" in tj["padding"]:
        ids.append(tj["padding"]["pad_id"])
    return ids


def _rewrite_tokenizer(tj: dict, new_id: dict[int, int], kept: set[str]) -> dict:
    model = dict(tj["model"])
    model["vocab"] = {t: new_id[i] for t, i in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if i in new_id}
    # a merge whose result is kept has kept parts (the closure), so filtering by result suffices
    model["merges"] = [m for m, (a, b) in zip(model.get("merges", []), _merges(model)) if a + b in kept]
    out = dict(tj, model=model)
    out["added_tokens"] = [dict(t, id=new_id[t["id"]]) for t in tj.get("added_tokens", [])]
    out["post_processor"] = _map_post_processor(tj.get("post_processor"), new_id.__getitem__)
    if isinstance(tj.get("padding"), dict) and "pad_id" in tj["padding"]:
        out["padding"] = dict(tj["padding"], pad_id=new_id[tj["padding"]["pad_id"]])
    return out


def _rewrite_tokenizer_config(cfg: dict, new_id: dict[int, int]) -> dict:
    out = dict(cfg)
    if isinstance(cfg.get("added_tokens_decoder"), dict):
        decoder = {int(k): v for k, v in cfg["added_tokens_decoder"].items()}
        out["added_tokens_decoder"] = {str(new_id[i]): v for i, v in sorted(decoder.items())}
    return out


def _dump(obj: dict) -> str:
    # ASCII escapes: Weights.save writes with the locale's encoding
    return json.dumps(obj, indent=2) + "\n"
