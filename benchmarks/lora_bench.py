"""LoRA adapters end to end: a PEFT fine-tune, read alike by edgelm and llama.cpp's own tool, and what it costs.

    .venv/bin/python benchmarks/lora_bench.py [--steps 150] [--rank 16] [--rounds 5] [--threads 2]

1. Fine-tune models/small with PEFT (rank R on every linear layer, torch) on this repository's Markdown docs,
   prose the model (trained on Python's standard library) has seen little of. Every 10th paragraph is held out.
2. `edgelm convert ADAPTER --base models/small` (f16), and `edgelm convert models/small --lora ADAPTER --quant
   q8_0` (the merge); the base is the bundled q8_0 model, converted from the same checkpoint.
3. Perplexity on the held-out paragraphs (llama-perplexity's chunk scheme, window 256): the base and the base with
   the adapter, each in llama-perplexity (`--lora`) and in edgelm's runtime; the merged model in edgelm.
4. Speed, edgelm's `bench` (pp512, tg128) of the base, the base with the adapter and the merged model, in
   alternating rounds; llama-bench on the base for reference (it has no LoRA option).
5. Generation with the adapter side by side with llama.cpp: `llama-server --lora` answering one 128-token
   completion (its own timings) against `edgelm.load(lora=...).generate`, base and adapter, alternating rounds.
Writes docs/lora.md. Needs torch, transformers and peft (pip install -e '.[test]') and llama.cpp's tools
(scripts/build_llama_tools.sh).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, log, machine, markdown_table, median, run_measured, today, tool, write_doc  # noqa: E402
from ppl_crosscheck import llama_chunks_ppl, run_llama_perplexity  # noqa: E402

SMALL = ROOT / "models" / "small"
BASE = ROOT / "edgelm" / "models" / "edgelm-small-q8_0.gguf"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WINDOW = 256


def docs_text() -> tuple[str, str]:
    """(train, held out): the repository's Markdown, split by paragraph, every 10th held out."""
    paragraphs = [p.strip() for f in sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
                  for p in f.read_text(encoding="utf-8").split("\n\n") if len(p.strip()) > 80]
    train = [p for i, p in enumerate(paragraphs) if i % 10]
    held = [p for i, p in enumerate(paragraphs) if not i % 10]
    return "\n\n".join(train), "\n\n".join(held)


def fine_tune(out: Path, text: str, *, steps: int, rank: int, threads: int) -> dict:
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(SMALL / "tokenizer.json"))
    ids = torch.tensor(tok(text)["input_ids"])
    model = transformers.AutoModelForCausalLM.from_pretrained(SMALL, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    seq, batch = 256, 8
    t0, losses = time.perf_counter(), []
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,))
        x = torch.stack([ids[s:s + seq] for s in starts])
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 25 == 0:
            log(f"step {step}: loss {loss.item():.3f}")
    model.save_pretrained(out)
    return {"trainable": trainable, "seconds": time.perf_counter() - t0, "first_loss": losses[0],
            "last_loss": median(losses[-10:]), "tokens": len(ids)}


def llama_server_tps(lora: Path | None, prompt: str, threads: int, rounds: int) -> list[float]:
    """llama-server's own generation t/s for a 128-token completion (prompt not cached), one per round."""
    import httpx
    from serve_bench import free_port

    port = free_port()
    cmd = [tool("llama-server"), "-m", BASE, "--host", "127.0.0.1", "--port", port, "-np", 1, "-c", 1024,
           "-t", threads, "-tb", threads] + (["--lora", lora] if lora else [])
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("llama-server did not come up")
            time.sleep(0.2)
        out = []
        for _ in range(rounds + 1):  # the first one warms up
            r = httpx.post(base + "/completion", json={"prompt": prompt, "n_predict": 128, "ignore_eos": True,
                                                      "temperature": 0, "cache_prompt": False}, timeout=300)
            out.append(r.json()["timings"]["predicted_per_second"])
        return out[1:]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def edgelm_tps(lora: Path | None, prompt: str, threads: int, rounds: int) -> list[float]:
    import edgelm

    with edgelm.load(BASE, n_ctx=1024, n_threads=threads, lora=lora, prefix_cache_bytes=0) as m:
        runs = [m.generate(prompt, max_tokens=128, temperature=0, ignore_eos=True).timings.gen_tps
                for _ in range(rounds + 1)]
    return runs[1:]


def speed(model: Path, lora: Path | None, threads: int) -> dict:
    from edgelm.commands.bench import bench

    return bench(str(model), n_prompt=512, n_gen=128, repetitions=3, n_threads=threads, lora=lora)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-doc", action="store_true", help="print only")
    args = p.parse_args(argv)
    from edgelm.converters import convert
    from edgelm.converters.lora import convert_lora

    train, held = docs_text()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        log(f"fine-tuning: {len(train):,} characters, {args.steps} steps, rank {args.rank}")
        tuned = fine_tune(tmp / "adapter", train, steps=args.steps, rank=args.rank, threads=args.threads)
        adapter = convert_lora(tmp / "adapter", SMALL, tmp / "adapter.gguf").path
        merged = convert(SMALL, tmp / "merged-q8_0.gguf", quant="q8_0", lora=tmp / "adapter").path
        held_file = tmp / "held.txt"
        held_file.write_text(held + "\n", encoding="utf-8")

        log("perplexity")
        ppl = {}
        for name, model, lora in (("base", BASE, None), ("base + adapter", BASE, adapter), ("merged q8_0", merged, None)):
            mine, n = llama_chunks_ppl(model, held, WINDOW, args.threads, lora=lora)
            ref = None
            if name != "merged q8_0":
                ref = run_llama_perplexity(model, held_file, ctx=WINDOW, threads=args.threads, lora=lora)["perplexity"]
            ppl[name] = {"edgelm": mine, "llama": ref, "scored": n}

        log("speed")
        runs: dict[str, list[dict]] = {"base": [], "base + adapter": [], "merged q8_0": []}
        configs = {"base": (BASE, None), "base + adapter": (BASE, adapter), "merged q8_0": (merged, None)}
        for r in range(args.rounds):
            order = list(configs) if r % 2 == 0 else list(reversed(configs))
            for name in order:
                runs[name].append(speed(*configs[name], args.threads))
        ref = run_measured([tool("llama-bench"), "-m", BASE, "-t", args.threads, "-p", 512, "-n", 128, "-r", 3,
                            "-o", "json"]).check()
        bench_ref = {("pp" if t["n_gen"] == 0 else "tg"): t["avg_ts"] for t in json.loads(ref.stdout)}
        adapter_bytes = adapter.stat().st_size

        log("generation beside llama-server")
        prompt = held[:400]
        served: dict[tuple[str, str], list[float]] = {}
        for r in range(args.rounds):
            for lora_name, lora in (("base", None), ("base + adapter", adapter)):
                tools = [("llama-server", llama_server_tps), ("edgelm", edgelm_tps)]
                for who, fn in tools if r % 2 == 0 else reversed(tools):
                    served.setdefault((who, lora_name), []).extend(fn(lora, prompt, args.threads, 2))

    rows = [[name, f"{v['edgelm']:.3f}", "-" if v["llama"] is None else f"{v['llama']:.3f}",
             "-" if v["llama"] is None else f"{abs(v['edgelm'] / v['llama'] - 1) * 100:.3f}%", v["scored"]]
            for name, v in ppl.items()]
    base_pp, base_tg = (median([r[k] for r in runs["base"]]) for k in ("pp512", "tg128"))
    speed_rows = [["llama-bench, base", f"{bench_ref['pp']:.1f}", f"{bench_ref['tg']:.1f}", "", ""]]
    for name, rs in runs.items():
        pp, tg = median([r["pp512"] for r in rs]), median([r["tg128"] for r in rs])
        speed_rows.append([f"edgelm, {name}", f"{pp:.1f}", f"{tg:.1f}", f"{pp / base_pp:.3f}", f"{tg / base_tg:.3f}"])
    gen_rows = []
    for lora_name in ("base", "base + adapter"):
        mine, ref = median(served[("edgelm", lora_name)]), median(served[("llama-server", lora_name)])
        gen_rows.append([lora_name, f"{ref:.1f}", f"{mine:.1f}", f"{mine / ref:.3f}"])
    doc = f"""# LoRA adapters: a fine-tune end to end

Generated by `benchmarks/lora_bench.py` on {today()}, {machine()}, {args.threads} threads.

**Fine-tune.** PEFT, rank {args.rank} (alpha {2 * args.rank}) on every linear layer of models/small
({tuned['trainable']:,} trainable parameters), {args.steps} steps of 8 × 256 tokens on this repository's Markdown
docs ({tuned['tokens']:,} tokens; every 10th paragraph held out), {tuned['seconds']:.0f} s on {args.threads} threads:
training loss {tuned['first_loss']:.2f} → {tuned['last_loss']:.2f}. The adapter GGUF (f16) is
{adapter_bytes / 1e6:.2f} MB; the base is the bundled q8_0 model.

**Perplexity on the held-out paragraphs** (llama-perplexity's scheme: chunks of {WINDOW} tokens, BOS first, the
second half scored; edgelm computes the same scheme from its own llama.cpp context, with `lora=`):

{markdown_table(["model", "edgelm", "llama-perplexity", "difference", "tokens scored"], rows)}

**Speed** (`edgelm bench`, as llama-bench measures: pp512 and tg128, medians of {args.rounds} alternating rounds of
three repetitions each; ratios to the base in edgelm):

{markdown_table(["model", "pp512 t/s", "tg128 t/s", "pp ratio", "tg ratio"], speed_rows)}

llama-bench has no LoRA option, so the reference row is the base alone. An adapter applied at run time adds two
small matrix products per adapted weight to every graph; merging folds them into the weights, and costs nothing
at run time but a model file per adapter.

**Generation beside llama.cpp with the adapter** (one greedy 128-token completion of a 400-character held-out
prompt; llama-server's own `predicted_per_second` with `--lora`, against edgelm's `gen_tps`; medians of
{2 * args.rounds} completions each, servers and loads alternating):

{markdown_table(["model", "llama-server t/s", "edgelm t/s", "edgelm / llama-server"], gen_rows)}
"""
    print(doc)
    if not args.no_doc:
        write_doc(ROOT / "docs" / "lora.md", doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
