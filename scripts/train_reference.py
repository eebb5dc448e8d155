"""Train edgelm's reference models (tiny, small) from scratch on the reference corpus.

    python scripts/train_reference.py tokenizer            # models/tokenizer.json
    python scripts/train_reference.py model --size tiny    # models/tiny/
    python scripts/train_reference.py model --size small   # models/small/

Deterministic for a given machine, thread count and corpus fingerprint: every
random draw comes from the seed. Needs the `train` extra (torch, transformers).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from edgelm import corpus  # noqa: E402

MODELS = ROOT / "models"
TOKENIZER = MODELS / "tokenizer.json"

# Special tokens take the first ids; the chat template is ChatML.
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
BOS, EOS, PAD, IM_START, IM_END = SPECIAL
# Llama-3's pre-tokenizer split: llama.cpp knows it as pre-tokenizer "llama-bpe".
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Recipe:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup: int
    max_position_embeddings: int = 2048
    weight_decay: float = 0.1
    seed: int = 0


RECIPES = {
    "tiny": Recipe(128, 384, 4, 4, 2, steps=800, batch_size=8, seq_len=256, lr=3e-3, warmup=50),
    # hidden and FFN sizes are multiples of 256 so every k-quant applies without fallbacks
    "small": Recipe(256, 768, 16, 4, 2, steps=800, batch_size=8, seq_len=512, lr=2e-3, warmup=100),
}


# ---------------------------------------------------------------- tokenizer

def train_tokenizer(vocab_size: int = 8192) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))  # llama.cpp's llama-bpe ignores merges too
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d.text for d in corpus.documents("train")), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    MODELS.mkdir(exist_ok=True)
    tok.save(str(TOKENIZER))
    print(f"tokenizer: {tok.get_vocab_size()} tokens -> {TOKENIZER}")


def encode_split(tok, split: str) -> np.ndarray:
    """One stream: each document as BOS text EOS."""
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch([d.text for d in corpus.documents(split)]):
        ids.extend(enc.ids)  # BOS comes from the post-processor
        ids.append(eos)
    return np.asarray(ids, dtype=np.int64)


def unigram_perplexity(train: np.ndarray, heldout: np.ndarray, vocab: int) -> float:
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0  # add-one smoothing
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[heldout[1:]].mean()))


# ---------------------------------------------------------------- model

def build_model(recipe: Recipe, vocab: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(recipe.seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config)


def heldout_perplexity(model, stream: np.ndarray, window: int = 512) -> float:
    """Non-overlapping windows; every token but each window's first is scored (distillation's own measure)."""
    from edgelm.converters.distill import heldout_perplexity as measure

    return measure(model, stream, "cpu", window)


def lr_at(step: int, recipe: Recipe) -> float:
    from edgelm.converters.distill import cosine_lr

    return cosine_lr(step, recipe.lr, recipe.warmup, recipe.steps)


def train_model(size: str, steps: int | None) -> None:
    import torch
    from tokenizers import Tokenizer

    recipe = RECIPES[size]
    if steps is not None:
        recipe = Recipe(**{**asdict(recipe), "steps": steps})
    tok = Tokenizer.from_file(str(TOKENIZER))
    vocab = tok.get_vocab_size()
    train, heldout = encode_split(tok, "train"), encode_split(tok, "heldout")
    print(f"corpus: {len(train):,} train tokens, {len(heldout):,} held-out tokens")

    model = build_model(recipe, vocab)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{size}: {n_params / 1e6:.2f}M parameters")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=(0.9, 0.95),
    )
    rng = np.random.default_rng(recipe.seed)
    t0 = time.time()
    for step in range(recipe.steps):
        starts = rng.integers(0, len(train) - recipe.seq_len - 1, recipe.batch_size)
        batch = torch.from_numpy(np.stack([train[s:s + recipe.seq_len + 1] for s in starts]))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == recipe.steps - 1:
            rate = (step + 1) * recipe.batch_size * recipe.seq_len / (time.time() - t0)
            print(f"step {step:5d}  loss {loss.item():.3f}  lr {lr_at(step, recipe):.2e}  {rate:,.0f} tok/s", flush=True)
    train_seconds = time.time() - t0

    out = MODELS / size
    save_checkpoint(model.half(), tok, out)
    ppl = heldout_perplexity(model.float(), heldout)
    stats = {
        "size": size,
        "parameters": n_params,
        "recipe": asdict(recipe),
        "tokens_seen": recipe.steps * recipe.batch_size * recipe.seq_len,
        "train_tokens": int(len(train)),
        "heldout_tokens": int(len(heldout)),
        "heldout_perplexity": round(ppl, 3),
        "unigram_perplexity": round(unigram_perplexity(train, heldout, vocab), 3),
        "train_seconds": round(train_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "corpus_fingerprint": corpus.fingerprint(),
        "command": f"python scripts/train_reference.py model --size {size}",
    }
    (out / "training.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats, indent=2))


def save_checkpoint(model, tok, out: Path) -> None:
    """A transformers-loadable checkpoint: weights, config, tokenizer with chat template."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    model.generation_config.to_json_file(out / "generation_config.json")
    tok.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": model.config.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("tokenizer")
    m = sub.add_parser("model")
    m.add_argument("--size", choices=sorted(RECIPES), required=True)
    m.add_argument("--steps", type=int, help="override the recipe's step count (for quick trials)")
    args = parser.parse_args(argv)
    if args.what == "tokenizer":
        train_tokenizer()
    else:
        train_model(args.size, args.steps)


if __name__ == "__main__":
    main()
