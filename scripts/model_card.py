"""Write models/README.md, the reference models' card, from each model's training.json."""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def card() -> str:
    rows, recipes = [], []
    for size in ("tiny", "small"):
        path = ROOT / "models" / size / "training.json"
        if not path.is_file():
            continue
        s = json.loads(path.read_text())
        r = s["recipe"]
        rows.append(
            f"| `{size}` | {s['parameters'] / 1e6:.2f}M | {r['num_hidden_layers']} | {r['hidden_size']} | "
            f"{r['num_attention_heads']} / {r['num_key_value_heads']} | {r['intermediate_size']} | "
            f"{s['heldout_perplexity']:.2f} | {s['unigram_perplexity']:.1f} | "
            f"{s['unigram_perplexity'] / s['heldout_perplexity']:.1f}× |"
        )
        recipes.append(
            f"| `{size}` | {r['steps']} | {r['batch_size']} × {r['seq_len']} | {s['tokens_seen']:,} | "
            f"{s['tokens_seen'] / s['train_tokens']:.2f} | {r['lr']} | {s['train_seconds'] / 60:.1f} min "
            f"({s['torch_threads']} threads) | `{s['command']}` |"
        )
    s = json.loads((ROOT / "models" / "small" / "training.json").read_text())
    return f"""# edgelm reference models

Small but real Llama-architecture language models, trained from scratch by this project because no machine
here can download weights. Licence: MIT, like the code.

## Data
- Corpus: the Python {s['python']} standard library source (`Lib/**/*.py`, without `test/`, `tests/`,
  `idle_test/`, `lib2to3/` and `site-packages/`) plus the pydoc topics (`pydoc_data.topics`).
  See `edgelm/corpus.py`.
- Split: a document is held out when sha1(name) mod 50 == 0: {s['train_tokens']:,} training tokens,
  {s['heldout_tokens']:,} held-out tokens. Corpus fingerprint (sha256): `{s['corpus_fingerprint']}`; another
  Python version gives another corpus and therefore other weights.
- Tokenizer: byte-level BPE, 8,192 tokens, trained with HF `tokenizers` on the training split; Llama-3's
  pre-tokenizer split (llama.cpp: `llama-bpe`, merges ignored for whole-word tokens); special tokens
  `<|begin_of_text|>` (BOS, added), `<|end_of_text|>` (EOS), `<|pad|>`, `<|im_start|>`, `<|im_end|>`;
  a ChatML chat template in `tokenizer_config.json`. The models never saw chat data: the template is there for
  the runtime's chat path, not because they can chat.

## Models

| model | parameters | layers | hidden | heads / KV heads | FFN | held-out perplexity | unigram perplexity | ratio |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}

Perplexity: exp of the mean negative log-likelihood over the held-out stream in non-overlapping 512-token
windows (first token of each window not scored), the committed fp16 weights evaluated in fp32 with transformers.
The unigram baseline is the add-one-smoothed token frequency of the training split, on the same tokens.

## Training

AdamW (β 0.9/0.95, weight decay 0.1 on matrices), linear warm-up then cosine decay to 10%, gradient clipping
1.0, bf16 autocast on CPU, random windows from the training stream drawn by a seeded generator (seed 0).
Untied output head, RoPE θ 10,000, RMSNorm ε 1e-5, context 2,048 (trained on shorter windows).

| model | steps | batch | tokens seen | epochs | peak LR | time | command |
| --- | --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(recipes)}

Reproduce everything (tokenizer, both models, the bundled GGUF): `make models`. The tokenizer alone:
`python scripts/train_reference.py tokenizer`.

## Files
- `tokenizer.json`: the shared tokenizer.
- `tiny/`, `small/`: transformers checkpoints (config.json, model.safetensors in fp16, tokenizer.json,
  tokenizer_config.json with the chat template, generation_config.json, training.json with the figures above).
- `edgelm/models/edgelm-small-q8_0.gguf`: the bundled default model, `small` converted to Q8_0 by
  `edgelm convert` (edgelm's own converter): `make default-model`.
"""


if __name__ == "__main__":
    (ROOT / "models" / "README.md").write_text(card())
    print(ROOT / "models" / "README.md")
