"""Time to first token with a 1,000-token prefix shared with an earlier request: cold vs cached.

    .venv/bin/python benchmarks/cache_bench.py            # small model and the 0.5B-shape Q4_K_M
    .venv/bin/python benchmarks/cache_bench.py --quick    # the small model only

Request A and request B share a 1,000-token prefix (held-out text) and differ in a short question.
TTFT is wall time from the call to the first streamed chunk, for every row alike.

- cold: B on an empty KV cache.
- live KV: B right after A (the context still holds A's tokens).
- RAM entry: B after A and an unrelated request, so A's KV comes back from the in-memory prompt cache.
- disk, new process: A in one process with --prompt-cache DIR, B in a fresh process with the same DIR;
  its cold row is B in a fresh process without a cache.
- llama-cpp-python: its high-level `Llama` with `LlamaRAMCache`, cold and after A, side by side.

Greedy output of B with each kind of hit is compared with B's cold output.
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
from common import BENCH, DOCS, ROOT, machine, markdown_table, median, today, write_doc  # noqa: E402

THREADS = 2
N_PREFIX = 1000
N_CTX = 2048
QUESTIONS = (" Question: what happened after that?", " Question: who was there at the time?",
             " Describe the weather on the coast in one sentence.")
GREEDY = dict(temperature=0)
TAGS = {None: "", False: ", no flash attention"}  # flash_attn setting -> row label (None: llama.cpp's choice, on)


def models(quick: bool) -> dict[str, Path]:
    from edgelm.runtime.model import default_model_path

    out = {"small Q8_0": default_model_path()}
    if not quick:
        from runtime_bench import models as runtime_models  # builds the 0.5B-shape files once into .bench/

        out["0.5B-shape Q4_K_M"] = runtime_models(quick=False)["0.5B-shape Q4_K_M"]
    return out


def prefix_text(path: Path) -> str:
    import edgelm
    from edgelm import corpus

    with edgelm.load(path, n_ctx=N_CTX, n_threads=THREADS, prefix_cache_bytes=0) as m:
        ids = m.tokenize(corpus.text("heldout", max_chars=12_000), add_special=False)[:N_PREFIX]
        return m.detokenize(ids)


def ttft(stream_factory) -> float:
    t0 = time.perf_counter()
    it = stream_factory()
    next(iter(it))
    dt = time.perf_counter() - t0
    if hasattr(it, "close"):
        it.close()
    return dt


def edgelm_rows(path: Path, doc: str, rounds: int, flash_attn: bool | None = None,
                ) -> tuple[dict[str, list[float]], dict[str, bool]]:
    import edgelm

    a, b, c = (doc + QUESTIONS[0], doc + QUESTIONS[1], QUESTIONS[2] * 3)
    tag = TAGS[flash_attn]
    options = dict(n_ctx=N_CTX, n_threads=THREADS, flash_attn=flash_attn)
    times: dict[str, list[float]] = {f"cold{tag}": []}
    same = {}
    with edgelm.load(path, prefix_cache_bytes=0, **options) as cold:
        cold.generate("warm-up", max_tokens=2, **GREEDY)
        reference = cold.generate(b, max_tokens=32, **GREEDY).text
        for _ in range(rounds):
            cold.reset()
            times[f"cold{tag}"].append(ttft(lambda: cold.stream(b, max_tokens=2, **GREEDY)))
    # without flash attention, exact reuse is as short as fast reuse (see Context.canonical_rows)
    for reuse, suffix in (("exact", ""), ("fast", ", fast"))[:1 if flash_attn is False else 2]:
        live, ram = f"live KV{tag}{suffix}", f"RAM entry{tag}{suffix}"
        times[live], times[ram] = [], []
        with edgelm.load(path, kv_reuse=reuse, **options) as warm:
            warm.generate("warm-up", max_tokens=2, **GREEDY)
            for _ in range(rounds):
                warm.reset()
                warm.generate(a, max_tokens=8, **GREEDY)
                times[live].append(ttft(lambda: warm.stream(b, max_tokens=2, **GREEDY)))
                warm.reset()
                warm.generate(a, max_tokens=8, **GREEDY)
                warm.generate(c, max_tokens=8, **GREEDY)
                times[ram].append(ttft(lambda: warm.stream(b, max_tokens=2, **GREEDY)))
            warm.reset()
            warm.generate(a, max_tokens=8, **GREEDY)
            same[live] = warm.generate(b, max_tokens=32, **GREEDY).text == reference
            warm.generate(c, max_tokens=8, **GREEDY)
            same[ram] = warm.generate(b, max_tokens=32, **GREEDY).text == reference
    same["reference"] = reference
    return times, same


CHILD = """
import json, sys, time
import edgelm
path, prompt, cache = sys.argv[1], sys.argv[2], sys.argv[3] or None
flash_attn = {"auto": None, "off": False}[sys.argv[6]]
with edgelm.load(path, n_ctx=int(sys.argv[4]), n_threads=int(sys.argv[5]), prompt_cache=cache,
                 prefix_cache_bytes=0, flash_attn=flash_attn) as m:
    m.generate("warm-up", max_tokens=2, temperature=0)
    m.reset()
    t0 = time.perf_counter()
    it = m.stream(prompt, max_tokens=32, temperature=0)
    parts = [next(it).text]
    dt = time.perf_counter() - t0
    parts += [c.text for c in it]
print(json.dumps({"ttft": dt, "text": "".join(parts)}))
"""


def child(path: Path, prompt: str, cache: Path | None, flash_attn: bool | None) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(path), prompt, str(cache or ""), str(N_CTX), str(THREADS),
                        "auto" if flash_attn is None else "off"], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(r.stdout.splitlines()[-1])


def disk_rows(path: Path, doc: str, rounds: int, reference: str, flash_attn: bool | None = None,
              ) -> tuple[dict[str, list[float]], bool]:
    a, b = doc + QUESTIONS[0], doc + QUESTIONS[1]
    tag = TAGS[flash_attn]
    cold, disk = f"cold, new process{tag}", f"disk, new process{tag}"
    times = {cold: [], disk: []}
    same = True
    for _ in range(rounds):
        times[cold].append(child(path, b, None, flash_attn)["ttft"])
        with tempfile.TemporaryDirectory(dir=BENCH) as d:
            child(path, a, Path(d), flash_attn)
            hit = child(path, b, Path(d), flash_attn)
        times[disk].append(hit["ttft"])
        same &= hit["text"] == reference
    return times, same


def llama_cpp_python_rows(path: Path, doc: str, rounds: int) -> dict[str, list[float]]:
    from llama_cpp import Llama, LlamaRAMCache

    a, b = doc + QUESTIONS[0], doc + QUESTIONS[1]
    times = {"llama-cpp-python cold": [], "llama-cpp-python cached": []}
    llm = Llama(str(path), n_ctx=N_CTX, n_threads=THREADS, n_threads_batch=THREADS, n_batch=512, verbose=False)
    llm.set_cache(LlamaRAMCache())
    for _ in range(rounds):
        llm.reset()
        llm.set_cache(None)
        times["llama-cpp-python cold"].append(ttft(lambda: llm.create_completion(b, max_tokens=2, temperature=0,
                                                                                 stream=True)))
        llm.reset()
        llm.set_cache(LlamaRAMCache())
        list(llm.create_completion(a, max_tokens=8, temperature=0, stream=True))
        times["llama-cpp-python cached"].append(ttft(lambda: llm.create_completion(b, max_tokens=2, temperature=0,
                                                                                   stream=True)))
    llm.close()
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the small model only")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=DOCS / "caching.md")
    args = p.parse_args(argv)
    BENCH.mkdir(exist_ok=True)
    results = {}
    for name, path in models(args.quick).items():
        doc = prefix_text(path)
        times, same = {}, {}
        for flash_attn, tag in TAGS.items():
            t, ok = edgelm_rows(path, doc, args.rounds, flash_attn)
            disk, ok[f"disk, new process{tag}"] = disk_rows(path, doc, args.rounds, ok.pop("reference"), flash_attn)
            times.update(t)
            times.update(disk)
            same.update(ok)
        times.update(llama_cpp_python_rows(path, doc, args.rounds))
        results[name] = (times, same)
        print(name, {k: round(median(v) * 1000, 1) for k, v in times.items()}, same, file=sys.stderr)
    write_report(results, args.out)
    return 0


def write_report(results: dict, out: Path) -> None:
    rows, plot = [], {}
    pairs = (("live KV", "cold"), ("RAM entry", "cold"), ("disk, new process", "cold, new process"),
             ("live KV, fast", "cold"), ("RAM entry, fast", "cold"))
    tag = TAGS[False]
    pairs += tuple((f"{hit}{tag}", f"{cold}{tag}") for hit, cold in pairs[:3])
    pairs += (("llama-cpp-python cached", "llama-cpp-python cold"),)
    for name, (times, same) in results.items():
        for hit, cold in pairs:
            t_hit, t_cold = median(times[hit]), median(times[cold])
            # against the faster of the two settings' cold runs, so turning flash attention off flatters nothing
            fastest = min(median(times[c]) for c in (cold, cold.removesuffix(tag)) if c in times)
            ok = same.get(hit)
            rows.append([name, hit, f"{t_cold * 1000:.1f}", f"{t_hit * 1000:.1f}", f"{t_hit / t_cold:.3f}",
                         f"{t_hit / fastest:.3f}", "—" if ok is None else ("yes" if ok else "NO")])
            plot.setdefault(name, {})[hit] = t_hit / t_cold
    table = markdown_table(["model", "cached by", "cold TTFT ms", "cached TTFT ms", "cached / cold",
                            "cached / fastest cold", "greedy output = cold"], rows)
    img = out.parent / "img" / "cache-ttft.png"
    _plot(plot, img)
    write_doc(out, (
        "# Caching: time to first token with a shared 1,000-token prefix\n\n"
        f"Generated by `benchmarks/cache_bench.py` on {today()}, {machine()}, {THREADS} threads, n_ctx {N_CTX}, "
        f"medians of rounds. TTFT is wall time from the call to the first streamed token.\n\n"
        f"{table}\n\n![cached / cold]({img.relative_to(out.parent)})\n\n"
        "Goal: cached at most 0.10 × cold. Rows without *fast* use the default `kv_reuse=\"exact\"`: the reused "
        "prefix stops early enough that the rest is evaluated in a batch of at least 64 tokens, as in a cold run, "
        "so the output is bit for bit a cold run's (llama.cpp's CPU flash attention switches kernels at 64 queries "
        "per batch, and the two round differently); *fast* (`kv_reuse=\"fast\"`) reuses every shared token, "
        "as llama-server does, and the output may drift in the last bits. *no flash attention* rows load the model "
        "with `flash_attn=False` (`-fa off`), cold rows included: without the tiled kernel, exact reuse "
        "re-evaluates only 8 positions (`Context.canonical_rows`; repacked K-quant kernels round differently below "
        "8 rows), so it costs what fast reuse costs and its output is still bit for bit a cold run's; *cached / "
        "fastest cold* divides by the faster cold run of the two settings (flash attention on prefills faster). "
        "*live KV*: the context still holds the earlier request; "
        "*RAM entry*: an unrelated request came in between, and the earlier KV was restored from the in-memory "
        "prompt cache (`llama_state_seq_set_data`); *disk, new process*: the earlier request ran in another "
        "process with `--prompt-cache DIR`, and this one is a fresh process reading DIR (its cold row is a fresh "
        "process without a cache). llama-cpp-python rows: its high-level `Llama` with `LlamaRAMCache`, after the "
        "same earlier request.\n"
    ))
    print(out.read_text())


def _plot(plot: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(plot)
    kinds = list(next(iter(plot.values())))
    fig, ax = plt.subplots(figsize=(9, 3.5))
    width = 0.8 / len(kinds)
    for j, kind in enumerate(kinds):
        ax.bar([i + j * width for i in range(len(names))], [plot[n][kind] for n in names], width, label=kind)
    ax.axhline(0.10, color="r", lw=0.8, ls="--", label="goal 0.10")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
    ax.set_ylabel("cached TTFT / cold TTFT")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
