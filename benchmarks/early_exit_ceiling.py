"""Early exit where it is meant to pay: a memory-bound model whose exit agrees with the full model.

The models the project trains are too small for this machine's memory bandwidth to matter: the small model's
decoding is bound by compute and per-call overhead, and its exits agree with the full model on 42% of tokens at
best (docs/early-exit.md). This benchmark measures the other regime, by construction. It takes the random
0.5B-shape checkpoint of runtime_bench.py (Llama layout, 24 layers, tied 151,936-token vocabulary) and scales the
residual writes of layers k..L-1 (attention output and FFN down projections) by EPS, so that an exit at layer k
agrees with the full model almost always. It is not a trained model and says nothing about what acceptance
training reaches; it measures what early exit gains per accepted draft on a memory-bound model on this machine:
plain decoding vs early exit at k with every draft proposed (threshold 0), greedy, Q4_K_M, outputs compared
token for token, each configuration in a fresh process, rounds alternating.

    .venv/bin/python benchmarks/early_exit_ceiling.py [--rounds 3] [--tokens 64] [--out docs/early-exit-ceiling.md]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, DOCS, ROOT, log, machine, markdown_table, median, python, today  # noqa: E402

K = 6  # exit layer, of 24
EPS = 1e-3  # scale of the residual writes of layers K..23
DRAFT_MAX = (4, 8)
N_PROMPTS = 4
WORK = BENCH / "early-exit-ceiling"


def build() -> Path:
    """The scaled checkpoint, converted to Q4_K_M, with its split at K beside it (built once)."""
    sys.path.insert(0, str(ROOT))
    from runtime_bench import models  # makes the random 0.5B-shape checkpoint once into .bench/

    from edgelm.converters import convert
    from edgelm.converters.early_exit import split_model, split_paths
    from edgelm.converters.quantize import quantize

    out = WORK / f"q05-exit{K}-q4_k_m.gguf"
    if out.is_file() and split_paths(out, K).exists():
        return out
    models(quick=False)
    source = BENCH / "ckpt-qwen2.5-0.5b"
    ckpt = WORK / "ckpt"
    if not (ckpt / "model.safetensors").is_file():
        from safetensors.torch import load_file, save_file  # torch: the checkpoint is bf16

        ckpt.mkdir(parents=True, exist_ok=True)
        for f in source.iterdir():
            if f.name != "model.safetensors":
                shutil.copy(f, ckpt / f.name)
        weights = load_file(source / "model.safetensors")
        n_layer = json.loads((source / "config.json").read_text())["num_hidden_layers"]
        for i in range(K, n_layer):
            for name in (f"model.layers.{i}.self_attn.o_proj.weight", f"model.layers.{i}.mlp.down_proj.weight"):
                weights[name] = (weights[name].float() * EPS).to(weights[name].dtype)
        save_file({k: v.contiguous() for k, v in weights.items()}, ckpt / "model.safetensors",
                  metadata={"format": "pt"})
        del weights
    f16 = WORK / "f16.gguf"
    convert(ckpt, f16, outtype="f16")
    quantize(f16, out, "q4_k_m")
    f16.unlink()
    split_model(out, K)
    return out


def prompts(n: int) -> list[str]:
    sys.path.insert(0, str(ROOT))
    from edgelm import corpus

    docs = [d.text for d in corpus.documents("heldout") if len(d.text) > 1000]
    return [d[:200] for d in docs[:n]]


def worker(model: str, draft_max: int, tokens: int) -> dict:
    import edgelm

    options = {"early_exit": K, "draft_threshold": 0.0, "draft_max": draft_max} if draft_max else {}
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


def measure(model: Path, draft_max: int, tokens: int) -> dict:
    r = subprocess.run([python(), __file__, "--worker", str(model), str(draft_max), str(tokens)],
                       capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(r.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--out", type=Path, default=DOCS / "early-exit-ceiling.md")
    p.add_argument("--worker", nargs=3, metavar=("MODEL", "DRAFT_MAX", "TOKENS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), int(args.worker[2]))))
        return 0
    WORK.mkdir(parents=True, exist_ok=True)
    model = build()
    configs = (0, *DRAFT_MAX)  # 0: plain decoding
    runs: dict[int, list[dict]] = {c: [] for c in configs}
    for r in range(args.rounds):
        order = configs[r % len(configs):] + configs[:r % len(configs)]  # rotate who goes first
        for c in order:
            runs[c].append(measure(model, c, args.tokens))
            log(f"round {r + 1}, {'plain' if not c else f'early exit, <= {c} drafts'}: {runs[c][-1]['tps']:.1f} tok/s")
    plain = runs[0]
    rows = []
    for c in configs:
        rs = runs[c]
        speedup = median([x["tps"] / b["tps"] for x, b in zip(rs, plain)])
        same = sum(a == b for a, b in zip(rs[0]["tokens"], plain[0]["tokens"]))
        drafted, accepted, rounds = (sum(x[key] for x in rs) for key in ("drafted", "accepted", "rounds"))
        rows.append(["plain" if not c else f"early exit k={K}, at most {c} drafts", f"{median([x['tps'] for x in rs]):.1f}",
                     f"{speedup:.2f}x", f"{accepted / drafted:.1%}" if drafted else "-",
                     f"{(accepted + rounds) / rounds:.2f}" if rounds else "-", f"{same}/{len(plain[0]['tokens'])}"])
    table = markdown_table(["decoding", "tok/s", "speedup", "acceptance", "tokens/round", "identical outputs"], rows)
    doc = __doc__.split("\n\n")
    args.out.write_text(
        f"# Early exit on a memory-bound model whose exit agrees (a ceiling, not a trained model)\n\n"
        f"Measured {today()} by `benchmarks/early_exit_ceiling.py --rounds {args.rounds} --tokens {args.tokens}` on "
        f"{machine()}.\n\n" + doc[1].strip() + "\n\n"
        f"Model: the random 0.5B shape, layers {K}..23's attention output and FFN down projections scaled by {EPS:g}, "
        f"Q4_K_M ({model.stat().st_size / 2**20:.0f} MiB), its split at k = {K} (exit norm: the final norm). "
        f"{N_PROMPTS} held-out prompts, {args.tokens} greedy tokens each, 2 threads; tok/s over every prompt's "
        f"generation; speedup is the median of each round's ratio to plain decoding in the same round.\n\n{table}\n")
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
