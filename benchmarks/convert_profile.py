"""Where `edgelm convert` spends time and memory: `profile()` runs one conversion in a child per mode.

    python benchmarks/convert_profile.py time   CKPT OUT.gguf f16 PSTATS   # cProfile
    python benchmarks/convert_profile.py memory CKPT OUT.gguf f16 JSON     # per-tensor memory

`memory` records, through the converter's progress hook, after each tensor is written: the most
bytes numpy held at once while it was loaded, encoded and written (tracemalloc; numpy reports
its buffers to it), the process's resident high-water mark after it (VmHWM), and its
resident anonymous and file-backed pages then (RssAnon, RssFile: the memory-mapped checkpoint).
"""
from __future__ import annotations

import json
import os
import pstats
import sys
import time
import tracemalloc
from pathlib import Path


def _status(key: str) -> int:
    """A /proc/self/status memory field in bytes (VmHWM, RssAnon, RssFile)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _vm_hwm() -> int:
    return _status("VmHWM")


def profile_time(ckpt: str, out: str, outtype: str, pstats_path: str) -> None:
    import cProfile

    from edgelm.converters import convert

    prof = cProfile.Profile()
    prof.enable()
    convert(ckpt, out, outtype=outtype, progress=False)
    prof.disable()
    prof.dump_stats(pstats_path)


def profile_memory(ckpt: str, out: str, outtype: str, json_path: str) -> None:
    """Per-tensor memory through the converter's progress hook, whatever the writer does inside a tensor."""
    from edgelm.converters.convert import convert

    convert_mod = sys.modules["edgelm.converters.convert"]  # the package re-exports the function under that name
    records: list[dict] = []
    planned: list = []
    plan = convert_mod.plan_tensors

    def traced_plan(*args, **kwargs):
        planned[:] = plan(*args, **kwargs)
        return planned

    class Recorder:  # stands in for the tqdm bar: update(1) after each tensor is written
        t0 = time.perf_counter()

        def update(self, _n: int) -> None:
            t = planned[len(records)]
            _, peak = tracemalloc.get_traced_memory()
            now = time.perf_counter()
            records.append({"name": t.name, "shape": list(t.shape), "qtype": t.qtype.name, "seconds": now - self.t0,
                            "numpy_peak": peak, "vm_hwm": _vm_hwm(), "rss_anon": _status("RssAnon"),
                            "rss_file": _status("RssFile")})
            self.t0 = now
            tracemalloc.reset_peak()

        def close(self) -> None:
            pass

    convert_mod.plan_tensors = traced_plan
    convert_mod._progress_bar = lambda total, enabled: Recorder()
    hwm_before = _vm_hwm()
    tracemalloc.start()
    t0 = time.perf_counter()
    convert(ckpt, out, outtype=outtype, progress=True)
    Path(json_path).write_text(json.dumps({"hwm_before_convert": hwm_before, "seconds": time.perf_counter() - t0,
                                           "tensors": records}))


# functions whose cumulative time explains edgelm's: label -> (file suffix, function name)
WATCH = {
    "Checkpoint.fingerprint (sha256 of the weights)": ("checkpoint.py", "fingerprint"),
    "Checkpoint.array (mmap -> float32)": ("checkpoint.py", "array"),
    "permute_rope": ("arch.py", "permute_rope"),
    "encode (float32 -> outtype)": ("export.py", "encode"),
    "gguf.quants.quantize": ("quants.py", "quantize"),
    "GGUFWriter.write_tensor_data": ("gguf_writer.py", "write_tensor_data"),
    "ndarray.tofile (writing)": ("~", "<method 'tofile' of 'numpy.ndarray' objects>"),
    "Checkpoint.release (madvise)": ("checkpoint.py", "release"),
    "os.fsync (atomic write)": ("~", "<built-in method posix.fsync>"),
    "load_vocab": ("vocab.py", "load_vocab"),
}


def profile(ckpt: Path, out_dir: Path, outtype: str) -> dict:
    """Both modes in fresh children, summarized: cumulative times, top self times, memory per tensor."""
    from common import python, run_measured

    out = out_dir / f"profile-{outtype}.gguf"
    stats_path, mem_path = out_dir / f"profile-{outtype}.pstats", out_dir / f"memory-{outtype}.json"
    for mode, dest in (("time", stats_path), ("memory", mem_path)):
        os.sync()
        run_measured([python(), Path(__file__).resolve(), mode, ckpt, out, outtype, dest]).check()
    out.unlink(missing_ok=True)
    st = pstats.Stats(str(stats_path))
    watched = {}
    for label, (file_suffix, func) in WATCH.items():
        cum = [v[3] for (f, _, fn), v in st.stats.items() if f.endswith(file_suffix) and fn == func]
        if cum:
            watched[label] = max(cum)
    top = sorted(((v[2], f"{Path(f).name}:{line} {fn}") for (f, line, fn), v in st.stats.items()), reverse=True)[:5]
    mem = json.loads(mem_path.read_text())
    tensors = mem["tensors"]
    worst = max(tensors, key=lambda t: t["numpy_peak"])
    at_peak = max(tensors, key=lambda t: t["rss_anon"] + t["rss_file"])
    return {"outtype": outtype, "total_s": st.total_tt, "watched": watched, "top_self": top,
            "hwm_before_convert": mem["hwm_before_convert"], "worst_tensor": worst, "final_hwm": tensors[-1]["vm_hwm"],
            "first": tensors[0], "last": tensors[-1], "at_peak": at_peak, "tensors": tensors}


def findings(p: dict, ckpt_bytes: int, budget: int, bf16: bool) -> list[str]:
    """Plain statements backed by the profile's numbers; each names the converter line it comes from."""
    MB = 1_000_000
    w, last = p["worst_tensor"], p["last"]
    per_el = w["numpy_peak"] / _n(w["shape"])
    out = []
    if bf16 and per_el >= 7 and w["numpy_peak"] > 100 * MB:
        out.append(
            f"`{w['name']}` briefly holds {w['numpy_peak'] / MB:,.0f} MB of numpy arrays, {per_el:.1f} bytes per element "
            "of a tensor stored with 2: converters/checkpoint.py `Checkpoint.array` widens bf16 with "
            "`(raw.astype(np.uint32) << 16)`, which allocates a 4-byte copy and then a second 4-byte result, and "
            "export.py `encode` then adds the output array next to the float32 one. An in-place shift (`w <<= 16`) "
            "would halve the first step; converting in row blocks would bound it by the block.")
    if last["rss_file"] >= 0.8 * ckpt_bytes:
        out.append(
            f"Resident file-backed pages grow from {p['first']['rss_file'] / MB:,.0f} MB after the first tensor to "
            f"{last['rss_file'] / MB:,.0f} MB after the last ({ckpt_bytes / MB:,.0f} MB of safetensors): "
            "converters/checkpoint.py maps each weight file once and keeps the map until `close()`, so every page "
            "read stays in the process's RSS. They are clean and reclaimable, but they count against an RSS budget, "
            "and the total grows with the model, not with its largest tensor. `mmap.madvise(MADV_DONTNEED)` on a "
            "tensor's range once it is encoded (or reading with `os.preadv` instead of a map) drops them.")
    tensors = p["tensors"]
    for prev, cur in zip(tensors, tensors[1:]):
        held = cur["numpy_peak"] - 8 * _n(cur["shape"])  # beyond what its own load and encode need
        if 4 * _n(prev["shape"]) > 50 * MB and held >= 0.9 * 4 * _n(prev["shape"]):
            out.append(
                f"While `{cur['name']}` ({_n(cur['shape']):,} elements) loads, {cur['numpy_peak'] / MB:,.0f} MB of numpy "
                f"arrays are alive: the float32 copy of the previous tensor `{prev['name']}`. converters/export.py "
                "`write_gguf` keeps it in `data` until the next `t.load()` returns; `del data` after "
                "`write_tensor_data` would free it first. It adds to the peak when two large tensors are adjacent.")
            break
    if p["final_hwm"] > budget:
        out.append(f"Peak RSS {p['final_hwm'] / MB:,.0f} MB against a budget of {budget / MB:,.0f} MB "
                   f"(at `{p['at_peak']['name']}`: {p['at_peak']['rss_anon'] / MB:,.0f} MB anonymous + "
                   f"{p['at_peak']['rss_file'] / MB:,.0f} MB file-backed after it was written).")
    return out


def _n(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    mode, ckpt, out, outtype, dest = sys.argv[1:6]
    {"time": profile_time, "memory": profile_memory}[mode](ckpt, out, outtype, dest)
