"""Early exit at its ceiling: models whose exit agrees with the full model by construction.

The exits of the models the project trains agree with the full model on 42% of tokens at best
(docs/early-exit.md), too little to gain. This benchmark asks what early exit would gain on this machine if the
exit agreed. It takes a checkpoint and scales the residual writes of layers k..L-1 (attention output and FFN
down projections) by EPS, so that an exit at layer k agrees with the full model almost always. The checkpoints
are the small reference model (16 layers, 8,192-token vocabulary, Q8_0, k = 4) and the random 0.5B-shape
checkpoint of runtime_bench.py (Llama layout, 24 layers, tied 151,936-token vocabulary, Q4_K_M, k = 6). These are
not trained models and say nothing about what acceptance training reaches; they measure what early exit gains
per accepted draft on this machine: plain decoding vs early exit at k with every draft proposed (threshold 0),
greedy, outputs compared token for token, each configuration in a fresh process, rounds alternating.

    .venv/bin/python benchmarks/early_exit_ceiling.py [--rounds 3] [--tokens 64] [--out docs/early-exit-ceiling.md]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BENCH, DOCS, ROOT, log, machine, markdown_table, median, run_worker, write_doc,  # noqa: E402
                    split_is_current, today)

EPS = 1e-3  # scale of the residual writes of layers k..L-1
DRAFT_MAX = (4, 8)
N_PROMPTS = 4
WORK = BENCH / "early-exit-ceiling"
# name: (checkpoint, exit layer k, GGUF type)
MODELS = {"small": (ROOT / "models" / "small", 4, "q8_0"), "0.5B shape": (BENCH / "ckpt-qwen2.5-0.5b", 6, "q4_k_m")}


def build(name: str) -> tuple[Path, int]:
    """The scaled checkpoint, converted, with its split at k beside it (built once); returns (GGUF, k)."""
    sys.path.insert(0, str(ROOT))
    from runtime_bench import models  # makes the random 0.5B-shape checkpoint once into .bench/

    from edgelm.converters import convert
    from edgelm.converters.early_exit import split_model
    from edgelm.converters.quantize import quantize

    source, k, qtype = MODELS[name]
    tag = name.split()[0].replace(".", "")
    out = WORK / f"{tag}-exit{k}-{qtype}.gguf"
    if out.is_file():
        if not split_is_current(out, k):
            split_model(out, k)
        return out, k
    if not source.is_dir():
        models(quick=False)
    ckpt = WORK / f"ckpt-{tag}"
    if not (ckpt / "model.safetensors").is_file():
        from safetensors.torch import load_file, save_file  # torch: bf16 checkpoints stay bf16

        ckpt.mkdir(parents=True, exist_ok=True)
        for f in source.iterdir():
            if f.name != "model.safetensors":
                shutil.copy(f, ckpt / f.name)
        weights = load_file(source / "model.safetensors")
        n_layer = json.loads((source / "config.json").read_text())["num_hidden_layers"]
        for i in range(k, n_layer):
            for key in (f"model.layers.{i}.self_attn.o_proj.weight", f"model.layers.{i}.mlp.down_proj.weight"):
                weights[key] = (weights[key].float() * EPS).to(weights[key].dtype)
        save_file({key: v.contiguous() for key, v in weights.items()}, ckpt / "model.safetensors",
                  metadata={"format": "pt"})
        del weights
    if qtype in ("f16", "q8_0"):
        convert(ckpt, out, outtype=qtype)
    else:
        f16 = WORK / f"{tag}-f16.gguf"
        convert(ckpt, f16, outtype="f16")
        quantize(f16, out, qtype)
        f16.unlink()
    split_model(out, k)
    return out, k


def prompts(n: int) -> list[str]:
    sys.path.insert(0, str(ROOT))
    from edgelm import corpus

    docs = [d.text for d in corpus.documents("heldout") if len(d.text) > 1000]
    return [d[:200] for d in docs[:n]]


def worker(model: str, k: int, draft_max: int, tokens: int) -> dict:
    import edgelm

    options = {"early_exit": k, "draft_threshold": 0.0, "draft_max": draft_max} if draft_max else {}
    m = edgelm.load(model, n_threads=2, n_ctx=512, prefix_cache_bytes=0, **options)
    m.generate("warm-up", max_tokens=4, temperature=0, ignore_eos=True)
    out, gen_s, n, drafted, accepted, rounds = [], 0.0, 0, 0, 0, 0
    for p in prompts(N_PROMPTS):
        c = m.generate(p, max_tokens=tokens, temperature=0, ignore_eos=True)
        out.append(c.tokens)
        gen_s += c.timings.gen_s
        n += c.timings.completion_tokens - 1  # gen_s runs from the first token to the last
        if (s := c.timings.speculative) is not None:
            drafted, accepted, rounds = drafted + s.drafted, accepted + s.accepted, rounds + s.rounds
    return {"tokens": out, "tps": n / gen_s, "drafted": drafted, "accepted": accepted, "rounds": rounds}


def measure(model: Path, k: int, draft_max: int, tokens: int) -> dict:
    return run_worker(__file__, model, k, draft_max, tokens)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--out", type=Path, default=DOCS / "early-exit-ceiling.md")
    p.add_argument("--models", type=lambda v: v.split(","), default=list(MODELS), help=",".join(MODELS))
    p.add_argument("--worker", nargs=4, metavar=("MODEL", "K", "DRAFT_MAX", "TOKENS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        model, k, draft_max, tokens = args.worker
        print(json.dumps(worker(model, int(k), int(draft_max), int(tokens))))
        return 0
    WORK.mkdir(parents=True, exist_ok=True)
    rows, described = [], []
    for name in args.models:
        model, k = build(name)
        configs = (0, *DRAFT_MAX)  # 0: plain decoding
        runs: dict[int, list[dict]] = {c: [] for c in configs}
        for r in range(args.rounds):
            order = configs[r % len(configs):] + configs[:r % len(configs)]  # rotate who goes first
            for c in order:
                runs[c].append(measure(model, k, c, args.tokens))
                log(f"{name}, round {r + 1}, {'plain' if not c else f'early exit, <= {c} drafts'}: "
                    f"{runs[c][-1]['tps']:.1f} tok/s")
        plain = runs[0]
        for c in configs:
            rs = runs[c]
            speedup = median([x["tps"] / b["tps"] for x, b in zip(rs, plain)])
            same = sum(a == b for a, b in zip(rs[0]["tokens"], plain[0]["tokens"]))
            drafted, accepted, rounds = (sum(x[key] for x in rs) for key in ("drafted", "accepted", "rounds"))
            rows.append([name, "plain" if not c else f"early exit k={k}, at most {c} drafts",
                         f"{median([x['tps'] for x in rs]):.1f}", f"{speedup:.2f}x",
                         f"{accepted / drafted:.1%}" if drafted else "-",
                         f"{(accepted + rounds) / rounds:.2f}" if rounds else "-", f"{same}/{len(plain[0]['tokens'])}"])
        described.append(f"{name}: layers {k}.. scaled, {model.stat().st_size / 2**20:.0f} MiB, split at k = {k} "
                         "(exit norm: the final norm)")
    table = markdown_table(["model", "decoding", "tok/s", "speedup", "acceptance", "tokens/round", "identical outputs"],
                           rows)
    doc = __doc__.split("\n\n")
    write_doc(args.out, (
        f"# Early exit at its ceiling: exits that agree by construction (not trained models)\n\n"
        f"Measured {today()} by `benchmarks/early_exit_ceiling.py --rounds {args.rounds} --tokens {args.tokens}` on "
        f"{machine()}.\n\n" + doc[1].strip() + "\n\n"
        f"Models ({EPS:g} the scale): " + "; ".join(described) + f". {N_PROMPTS} held-out prompts, {args.tokens} "
        "greedy tokens each, 2 threads; tok/s over every prompt's generation; speedup is the median of each round's "
        f"ratio to plain decoding in the same round.\n\n{table}\n"))
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
