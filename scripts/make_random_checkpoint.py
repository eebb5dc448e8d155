"""Random-weight checkpoints of realistic shapes, for speed and memory benchmarks (never committed).

    python scripts/make_random_checkpoint.py qwen2.5-0.5b /tmp/q05
    python scripts/make_random_checkpoint.py llama-3.2-1b /tmp/l1b

Weights are random (std 0.02), so outputs are noise; shapes, vocabulary size and
cost per token are those of the real models. The tokenizer is the reference
tokenizer padded with unused tokens up to the shape's vocabulary size.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Public architecture shapes (from the models' config.json files).
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-0.4b": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                       num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
}


def make(shape: str, out: Path, seed: int = 0, dtype: str = "bfloat16") -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    # Llama layout for every shape: the benchmark measures cost, and the converter supports Llama first.
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=10000.0,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    src = ROOT / "models" / "small"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, out / name)
    (out / "edgelm-random.json").write_text(json.dumps({"shape": shape, "seed": seed, "dtype": dtype}) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    args = p.parse_args(argv)
    print(make(args.shape, args.out, args.seed, args.dtype), file=sys.stderr)


if __name__ == "__main__":
    main()
