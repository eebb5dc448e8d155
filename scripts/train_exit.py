"""Early-exit heads for self-speculative decoding.

The draft is layers 0..k-1, an exit RMSNorm and the model's own output head; the full
model verifies. A draft token is accepted when its argmax equals the full model's.

    # frozen model, train only one exit norm per layer (self-distillation)
    python scripts/train_exit.py exit-norm --model models/small --layers 2 4 6 8
    # frozen model, train an exit block (a residual FFN and an exit norm) at one layer
    python scripts/train_exit.py exit-block --model models/small-ee --layer 4
    # continued training of the whole model with exit losses (LayerSkip-style)
    python scripts/train_exit.py layerskip --model models/small --out models/small-ee --exit-layers 4 6 8

The defaults are the recipes behind models/small/exit_heads.* and models/small-ee
(models/README.md): about 6 and 25 minutes on one thread.

Both write exit_heads.safetensors (fp32 `exit_norm.{k}.weight`) and exit_heads.json
(recipe and held-out top-1 agreement per layer, final norm reused vs trained exit norm)
into the model directory. Deterministic for a given machine, thread count and seed.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Mapping

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_reference import (  # noqa: E402
    ROOT, Recipe, encode_split, heldout_perplexity, lr_at, save_checkpoint,
)
from edgelm import corpus  # noqa: E402  (train_reference put ROOT on sys.path)
from edgelm.converters.early_exit import EXIT_BLOCKS, EXIT_HEADS  # noqa: E402

EXIT_JSON = "exit_heads.json"


# ---------------------------------------------------------------- model and exits

def load(model_dir: Path):
    """The checkpoint in fp32 and its tokenizer."""
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model, Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def recipe_for(config, **training) -> Recipe:
    """train_reference's Recipe for an existing model: its architecture, new training settings."""
    return Recipe(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        **training,
    )


def make_exit_norms(model, layers: list[int]):
    """One RMSNorm per exit layer, a copy of the final norm (same weight, same eps)."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    n = model.config.num_hidden_layers
    if any(not 0 < k < n for k in layers):
        raise SystemExit(f"exit layers must lie in 1..{n - 1}, got {layers}")
    norms = torch.nn.ModuleDict()
    for k in sorted(set(layers)):
        norm = LlamaRMSNorm(model.config.hidden_size, eps=model.config.rms_norm_eps)
        norm.weight.data.copy_(model.model.norm.weight.data.float())
        norms[str(k)] = norm
    return norms


def kl_to(target_logp, logits):
    """KL(target || softmax(logits)), mean over positions; target_logp carries no gradient."""
    import torch

    from edgelm.converters.distill import kl

    return kl(target_logp, torch.log_softmax(logits.float(), dim=-1))


def sample_batch(rng: np.random.Generator, stream: np.ndarray, batch: int, seq_len: int):
    """Random windows of seq_len + 1 tokens, as train_reference draws them."""
    import torch

    starts = rng.integers(0, len(stream) - seq_len - 1, batch)
    return torch.from_numpy(np.stack([stream[s:s + seq_len + 1] for s in starts]))


def agreement(model, norms: Mapping[str, object], stream: np.ndarray, window: int = 512) -> dict[int, float]:
    """Share of held-out positions where the exit's argmax equals the full model's (non-overlapping windows, fp32)."""
    from edgelm.converters.distill import exit_agreement

    return exit_agreement(model, norms, stream, "cpu", window)


def save_exit_heads(out: Path, norms, stats: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"exit_norm.{k}.weight": norm.weight.detach().float().contiguous() for k, norm in norms.items()}
    save_file(tensors, str(out / EXIT_HEADS), metadata={"format": "pt"})
    (out / EXIT_JSON).write_text(json.dumps(stats, indent=2) + "\n")


def agreement_table(before: dict[int, float], after: dict[int, float]) -> dict[str, dict[str, float]]:
    """{"4": {"final_norm": .., "exit_norm": ..}}: final norm reused on the source model vs trained exit norm."""
    return {str(k): {"final_norm": before[k], "exit_norm": after[k]} for k in sorted(after)}


def _setup(model_dir: Path, threads: int, seed: int):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model, tok = load(model_dir)
    train, heldout = encode_split(tok, "train"), encode_split(tok, "heldout")
    print(f"corpus: {len(train):,} train tokens, {len(heldout):,} held-out tokens")
    return model, tok, train, heldout


def _log(step: int, steps: int, losses: Mapping[object, float], lr: float, t0: float, tokens: int) -> None:
    if step % 25 == 0 or step == steps - 1:
        parts = "  ".join(f"{k}:{v:.3f}" for k, v in losses.items())
        print(f"step {step:4d}  {parts}  lr {lr:.2e}  {tokens / (time.time() - t0):,.0f} tok/s", flush=True)


# ---------------------------------------------------------------- exit-norm

def train_exit_norm(model_dir: Path, layers: list[int], *, steps: int = 150, batch: int = 4, seq_len: int = 512,
                    lr: float = 2e-2, warmup: int = 10, seed: int = 0, threads: int = 1,
                    command: str = "") -> dict:
    """Freeze the model; fit one exit norm per layer to the model's own final distribution (KL)."""
    import torch

    from edgelm.converters.distill import exit_logits

    model, _, train, heldout = _setup(model_dir, threads, seed)
    model.requires_grad_(False)
    norms = make_exit_norms(model, layers)
    before = agreement(model, {k: model.model.norm for k in norms}, heldout)
    print(f"agreement, final norm reused: {before}")

    recipe = recipe_for(model.config, steps=steps, batch_size=batch, seq_len=seq_len, lr=lr, warmup=warmup,
                        weight_decay=0.0, seed=seed)
    opt = torch.optim.AdamW(norms.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    for step in range(steps):
        ids = sample_batch(rng, train, batch, seq_len)[:, :-1]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, output_hidden_states=True)
        target = torch.log_softmax(out.logits.float(), dim=-1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = {k: kl_to(target, z) for k, z in exit_logits(model, out.hidden_states, norms).items()}
        sum(losses.values()).backward()  # the norms are independent: one backward trains them all
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses = {k: v.item() for k, v in losses.items()}
        _log(step, steps, losses, lr_at(step, recipe), t0, (step + 1) * batch * seq_len)
    seconds = time.time() - t0

    after = agreement(model, norms, heldout)
    stats = {
        "kind": "exit-norm",
        "model": _rel(model_dir),
        "layers": sorted(int(k) for k in norms),
        "steps": steps, "batch": batch, "seq_len": seq_len, "lr": lr, "warmup": warmup, "seed": seed,
        "seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "agreement": agreement_table(before, after),
        "command": command,
    }
    save_exit_heads(model_dir, norms, stats)
    print(json.dumps(stats, indent=2))
    return stats


# ---------------------------------------------------------------- exit-block

EXIT_BLOCKS_JSON = "exit_blocks.json"  # beside EXIT_BLOCKS (edgelm.converters.early_exit), which holds the tensors


def _hidden_features(model, stream: np.ndarray, k: int, windows: list[int], seq_len: int):
    """(h_k, the final layer's normed hidden state) at every position of the windows starting at `windows`."""
    import torch

    hk, final = [], []
    for start in windows:
        ids = torch.from_numpy(stream[start:start + seq_len])[None]
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        hk.append(out.hidden_states[k][0])
        final.append(out.hidden_states[-1][0])  # after the final norm: lm_head of it gives the logits
        if len(hk) == 1:
            assert torch.allclose(model.lm_head(final[0]), out.logits[0], atol=1e-4), "hidden_states[-1] is not normed"
    return torch.cat(hk), torch.cat(final)


def train_exit_block(model_dir: Path, k: int, *, width: int = 768, steps: int = 1500, batch: int = 1024,
                     windows: int = 800, seq_len: int = 256, lr: float = 3e-3, seed: int = 0, threads: int = 2,
                     command: str = "") -> dict:
    """Freeze the model; fit an exit block at layer k to the model's own final distribution (KL): one residual
    SwiGLU FFN of `width` (RMSNorm first, as a Llama block's FFN) and an exit norm before the shared head. The
    early-exit split writes it as the draft's last layer (converters/early_exit.py), so that the draft computes
    head(exit_norm(h + FFN(h))) while the tail still receives h, layer k-1's output."""
    import torch
    from safetensors.torch import save_file
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    model, _, train, heldout = _setup(model_dir, threads, seed)
    model.requires_grad_(False)
    n = model.config.num_hidden_layers
    if not 0 < k < n:
        raise SystemExit(f"the exit layer must lie in 1..{n - 1}, got {k}")
    rng = np.random.default_rng(seed)
    t0 = time.time()
    h_train, f_train = _hidden_features(model, train, k, list(rng.integers(0, len(train) - seq_len, windows)),
                                        seq_len)
    h_held, f_held = _hidden_features(model, heldout, k, list(range(0, len(heldout) - seq_len, seq_len)), seq_len)
    print(f"features: {len(h_train):,} train and {len(h_held):,} held-out positions, {time.time() - t0:.0f} s")

    hidden, eps = model.config.hidden_size, model.config.rms_norm_eps
    block = torch.nn.ModuleDict({
        "ffn_norm": LlamaRMSNorm(hidden, eps=eps), "ffn_gate": torch.nn.Linear(hidden, width, bias=False),
        "ffn_up": torch.nn.Linear(hidden, width, bias=False), "ffn_down": torch.nn.Linear(width, hidden, bias=False),
        "output_norm": LlamaRMSNorm(hidden, eps=eps)})
    torch.nn.init.zeros_(block["ffn_down"].weight)  # starts as the final norm reused on h_k
    block["output_norm"].weight.data.copy_(model.model.norm.weight.data.float())

    def exit_logits(h):
        x = block["ffn_norm"](h)
        h = h + block["ffn_down"](torch.nn.functional.silu(block["ffn_gate"](x)) * block["ffn_up"](x))
        return model.lm_head(block["output_norm"](h))

    def held_agreement() -> float:
        with torch.no_grad():
            return (exit_logits(h_held).argmax(-1) == model.lm_head(f_held).argmax(-1)).float().mean().item()

    before = held_agreement()
    print(f"held-out agreement, final norm reused: {before:.4f}")
    opt = torch.optim.AdamW(block.parameters(), lr=lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * (1 - step / steps)
        idx = torch.from_numpy(rng.integers(0, len(h_train), batch))
        with torch.no_grad():
            target = torch.log_softmax(model.lm_head(f_train[idx]), dim=-1)
        loss = kl_to(target, exit_logits(h_train[idx]))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _log(step, steps, {"kl": loss.item()}, lr * (1 - step / steps), t0, (step + 1) * batch)
    seconds = time.time() - t0
    after = held_agreement()
    stats = {
        "kind": "exit-block", "model": _rel(model_dir), "layer": k, "width": width, "steps": steps, "batch": batch,
        "windows": windows, "seq_len": seq_len, "lr": lr, "seed": seed, "seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "agreement": {"final_norm": round(before, 4), "exit_block": round(after, 4)},
        "command": command,
    }
    tensors = {f"exit_block.{k}.{name}.weight": m.weight.detach().float().contiguous() for name, m in block.items()}
    save_file(tensors, str(model_dir / EXIT_BLOCKS), metadata={"format": "pt"})
    (model_dir / EXIT_BLOCKS_JSON).write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats, indent=2))
    return stats


# ---------------------------------------------------------------- layerskip

def train_layerskip(model_dir: Path, out: Path, exit_layers: list[int], *, steps: int = 360, batch: int = 4,
                    seq_len: int = 512, lr: float = 2e-5, warmup: int = 40, exit_weight: float = 0.2,
                    exit_norm_lr: float = 1e-2, head_grad: bool = False, eval_every: int = 0, seed: int = 0,
                    threads: int = 1, command: str = "") -> dict:
    """Continue training the whole model with, per exit k, exit_weight * (CE + KL(stop-grad final || exit))."""
    import torch

    from edgelm.converters.distill import exit_logits

    model, tok, train, heldout = _setup(model_dir, threads, seed)
    vocab = model.config.vocab_size
    norms = make_exit_norms(model, exit_layers)
    before = agreement(model, {k: model.model.norm for k in norms}, heldout)
    print(f"agreement of {_rel(model_dir)}, final norm reused: {before}")

    recipe = recipe_for(model.config, steps=steps, batch_size=batch, seq_len=seq_len, lr=lr, warmup=warmup, seed=seed)
    params = [*model.parameters(), *norms.parameters()]
    # the exit norms start as copies of the final norm and only feed the exits: they can move faster
    opt = torch.optim.AdamW(
        [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": recipe.weight_decay},
         {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0},
         {"params": list(norms.parameters()), "weight_decay": 0.0, "lr_scale": exit_norm_lr / lr}],
        lr=lr, betas=(0.9, 0.95),
    )
    rng = np.random.default_rng(seed)
    model.train()
    trajectory, eval_seconds = {}, 0.0
    t0 = time.time()
    for step in range(steps):
        ids = sample_batch(rng, train, batch, seq_len)
        labels = ids[:, 1:].reshape(-1)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe) * group.get("lr_scale", 1.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            res = model(input_ids=ids[:, :-1], output_hidden_states=True)
            exits = exit_logits(model, res.hidden_states, norms, head_grad)
        final = res.logits.float().reshape(-1, vocab)
        target = torch.log_softmax(final.detach(), dim=-1)
        ce = torch.nn.functional.cross_entropy(final, labels)
        loss, losses = ce, {"final": ce.item()}
        for k, z in exits.items():
            z = z.float().reshape(-1, vocab)
            exit_loss = torch.nn.functional.cross_entropy(z, labels) + kl_to(target, z)
            loss = loss + exit_weight * exit_loss
            losses[k] = exit_loss.item()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _log(step, steps, losses, lr_at(step, recipe), t0 + eval_seconds, (step + 1) * batch * seq_len)
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            t1 = time.time()
            trajectory[step + 1] = round(heldout_perplexity(model, heldout), 3)  # fp32 weights, not rounded
            eval_seconds += time.time() - t1
            print(f"step {step + 1}: held-out perplexity {trajectory[step + 1]}", flush=True)
    seconds = time.time() - t0 - eval_seconds

    save_checkpoint(model.half(), tok, out)
    model.float()  # evaluate the fp16 weights that were saved, in fp32
    ppl = heldout_perplexity(model, heldout)
    after = agreement(model, norms, heldout)
    exit_stats = {
        "kind": "layerskip",
        "model": _rel(out), "source": _rel(model_dir),
        "layers": sorted(int(k) for k in norms),
        "steps": steps, "batch": batch, "seq_len": seq_len, "lr": lr, "warmup": warmup, "seed": seed,
        "exit_weight": exit_weight, "exit_norm_lr": exit_norm_lr, "head_grad": head_grad,
        "seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "agreement": agreement_table(before, after),
        "command": command,
    }
    save_exit_heads(out, norms, exit_stats)
    source = json.loads((model_dir / "training.json").read_text()) if (model_dir / "training.json").exists() else {}
    stats = {
        "size": out.name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "source": _rel(model_dir),
        "recipe": {**asdict(recipe), "exit_layers": exit_stats["layers"], "exit_weight": exit_weight,
                   "exit_norm_lr": exit_norm_lr, "head_grad": head_grad,
                   "loss": "CE(final) + exit_weight * sum_k [CE(exit_k) + KL(stop-grad final || exit_k)]"},
        "tokens_seen": steps * batch * seq_len,
        "heldout_perplexity": round(ppl, 3),
        "heldout_perplexity_during_training": trajectory,
        "source_heldout_perplexity": source.get("heldout_perplexity"),
        "train_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "corpus_fingerprint": corpus.fingerprint(),
        "command": command,
    }
    (out / "training.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps({**stats, "agreement": exit_stats["agreement"]}, indent=2))
    return stats


def _rel(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# ---------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    e = sub.add_parser("exit-norm", help="train exit norms on a frozen model")
    e.add_argument("--layers", type=int, nargs="+", required=True)
    s = sub.add_parser("layerskip", help="continue training the whole model with exit losses")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--exit-layers", type=int, nargs="+", required=True)
    s.add_argument("--exit-weight", type=float, default=0.2, help="w_k, the same for every exit")
    s.add_argument("--exit-norm-lr", type=float, default=1e-2, help="peak LR of the exit norms")
    s.add_argument("--head-grad", action="store_true", help="let the exit losses train the shared lm_head too")
    s.add_argument("--eval-every", type=int, default=0, help="print held-out perplexity every N steps")
    b = sub.add_parser("exit-block", help="train an exit block (FFN + exit norm) at one layer of a frozen model")
    b.add_argument("--model", type=Path, required=True)
    b.add_argument("--layer", type=int, required=True)
    b.add_argument("--width", type=int, default=768, help="the block's FFN width")
    b.add_argument("--steps", type=int, default=1500)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it)")
    for p, steps, lr, warmup in ((e, 150, 2e-2, 10), (s, 360, 2e-5, 40)):
        p.add_argument("--model", type=Path, required=True)
        p.add_argument("--steps", type=int, default=steps)
        p.add_argument("--batch", type=int, default=4)
        p.add_argument("--seq-len", type=int, default=512)
        p.add_argument("--lr", type=float, default=lr)
        p.add_argument("--warmup", type=int, default=warmup)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it)")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "scripts/train_exit.py", *argv])
    if args.what == "exit-block":
        train_exit_block(args.model, args.layer, width=args.width, steps=args.steps, seed=args.seed,
                         threads=args.threads, command=command)
        return
    common = dict(steps=args.steps, batch=args.batch, seq_len=args.seq_len, lr=args.lr, warmup=args.warmup,
                  seed=args.seed, threads=args.threads, command=command)
    if args.what == "exit-norm":
        train_exit_norm(args.model, args.layers, **common)
    else:
        train_layerskip(args.model, args.out, args.exit_layers, exit_weight=args.exit_weight,
                        exit_norm_lr=args.exit_norm_lr, head_grad=args.head_grad,
                        eval_every=args.eval_every, **common)


if __name__ == "__main__":
    main()
