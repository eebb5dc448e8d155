"""Generation speed on a worker thread after a call on the main thread (a desktop app's pattern), against the
main thread itself, in one process (edgelm/runtime/backend.py: one pool of OpenMP workers at a time).

    .venv/bin/python benchmarks/thread_switch.py [MODEL.gguf] [--rounds 5] [--tokens 128]

Each round generates greedily on the main thread, then on a new worker thread, then on the same worker again;
prints generation t/s of each and the median ratio worker / main. Under a pool kept by the main thread, libgomp
throttles the worker's barrier spin and the ratio falls to about half or less.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import edgelm

    m = edgelm.load(args.model, n_ctx=512, n_threads=args.threads, prefix_cache_bytes=0)

    def tps() -> float:
        return m.generate("def parse(line):", max_tokens=args.tokens, temperature=0, ignore_eos=True).timings.gen_tps

    tps()  # warm
    rows = []
    for _ in range(args.rounds):
        main_tps, worker = tps(), []
        t = threading.Thread(target=lambda: worker.extend([tps(), tps()]))
        t.start()
        t.join()
        rows.append((main_tps, *worker))
    print(f"{m.path.name}, {args.threads} threads, {args.tokens} tokens, {args.rounds} rounds (t/s)")
    for main_tps, first, second in rows:
        print(f"  main {main_tps:7.1f}   worker, first call {first:7.1f}   second call {second:7.1f}")
    ratio = statistics.median(min(first, second) / main_tps for main_tps, first, second in rows)
    print(f"median of (slower worker call / main call): {ratio:.3f}")
    m.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
