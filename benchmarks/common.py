"""Shared helpers for the benchmarks: paths, llama.cpp tools, measured subprocesses, markdown, machine.

Every benchmark compares edgelm with llama.cpp's own tools built from the sources vendored in the
pinned llama-cpp-python sdist, so the two sides always come from the same llama.cpp commit.
"""
from __future__ import annotations

import contextlib
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / ".bench"  # git-ignored: checkpoints, GGUF files, logs
DOCS = ROOT / "docs"
TOOLS_BIN = ROOT / ".cache" / "llama.cpp-build" / "bin"
MB = 1_000_000  # decimal megabytes, as `edgelm convert` prints them


class MissingTool(RuntimeError):
    pass


def llama_cpp_version() -> str:
    """The pinned llama-cpp-python version, read from pyproject.toml as scripts/build_llama_tools.sh does."""
    m = re.search(r'"llama-cpp-python==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    if not m:
        raise MissingTool("pyproject.toml pins no llama-cpp-python version")
    return m.group(1)


def llama_cpp_source() -> Path:
    """llama.cpp's source tree (convert_hf_to_gguf.py, gguf-py) unpacked by scripts/setup_llama_cpp.sh."""
    src = ROOT / ".cache" / f"llama_cpp_python-{llama_cpp_version()}" / "vendor" / "llama.cpp"
    if not (src / "convert_hf_to_gguf.py").is_file():
        raise MissingTool(f"no llama.cpp sources at {src}: run `make setup` (scripts/setup_llama_cpp.sh) first")
    return src


def tool(name: str) -> Path:
    """A built llama.cpp tool (llama-quantize, llama-perplexity, llama-imatrix, ...)."""
    path = TOOLS_BIN / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise MissingTool(f"{name} is not built at {path}: run scripts/build_llama_tools.sh first")
    return path


def have_tool(name: str) -> bool:
    try:
        tool(name)
        return True
    except MissingTool:
        return False


@dataclass(frozen=True)
class Run:
    cmd: list[str]
    seconds: float  # wall clock, process start to exit
    peak_rss: int  # bytes: ru_maxrss of the command (see _SPAWNER), file-backed pages included
    cpu_seconds: float  # user + system time of the child: less sensitive than wall time to other load
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> "Run":
        if self.returncode != 0:
            tail = "\n".join(self.stderr.splitlines()[-20:])
            raise RuntimeError(f"command failed ({self.returncode}): {shlex.join(self.cmd)}\n{tail}")
        return self


# Runs one command and reports its rusage. It exists because a child's ru_maxrss starts from the
# high-water RSS of the process that forked it (Linux carries the old mm's peak across exec), so a
# benchmark process that has grown would leak its own peak into every measurement. This spawner is
# a fresh, small interpreter: what it forks inherits only its ~10 MB.
_SPAWNER = """
import json, os, sys, time
report, cmd = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
with open(report, "w") as f:
    json.dump({"seconds": time.perf_counter() - t0, "maxrss_kb": ru.ru_maxrss, "cpu": ru.ru_utime + ru.ru_stime,
               "returncode": os.waitstatus_to_exitcode(status)}, f)
"""


def run_measured(cmd: list[str | Path], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> Run:
    """Run `cmd` in a fresh child; its wall time, CPU time and own peak RSS (wait4 in a small spawner)."""
    import json

    cmd = [str(c) for c in cmd]
    full_env = {**os.environ, **(env or {})}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile(suffix=".json") as report:
        subprocess.run([sys.executable, "-I", "-S", "-c", _SPAWNER, report.name, *cmd],
                       stdout=out, stderr=err, env=full_env, cwd=cwd, check=False)
        r = json.loads(Path(report.name).read_text() or "null") or {}
        out.seek(0)
        err.seek(0)
        return Run(cmd, r.get("seconds", float("nan")), r.get("maxrss_kb", 0) * 1024, r.get("cpu", float("nan")),
                   r.get("returncode", -1), out.read().decode(errors="replace"), err.read().decode(errors="replace"))


def median(values: list[float]) -> float:
    return statistics.median(values)


def alternate(a, b, rounds: int) -> list[tuple[float, float]]:
    """(a(), b()) for each of `rounds` rounds after one warm-up call of each, the order alternating between rounds so
    that a shared machine's drift falls on both sides alike."""
    a(), b()
    pairs = []
    for r in range(rounds):
        if r % 2:
            y = b()
            pairs.append((a(), y))
        else:
            x = a()
            pairs.append((x, b()))
    return pairs


@contextlib.contextmanager
def decode_seconds(replacement=None):
    """Time spent in llama_decode while the block runs (a one-element list, read it after the block), every caller
    of llama_cpp.llama_decode included; with `replacement`, that function runs instead of llama.cpp's."""
    import llama_cpp as lib

    real, spent = lib.llama_decode, [0.0]
    call = replacement or real

    def timed(ctx, batch):
        t = time.perf_counter()
        rc = call(ctx, batch)
        spent[0] += time.perf_counter() - t
        return rc

    lib.llama_decode = timed
    try:
        yield spent
    finally:
        lib.llama_decode = real


def spread(values: list[float]) -> str:
    """'median (min-max)' for a table cell."""
    return f"{median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


NOTES = "<!-- written by hand below this line; the benchmark keeps it -->"


def write_doc(path: Path, text: str) -> None:
    """Write a generated report, keeping what was written by hand below the NOTES marker of the one it replaces."""
    kept = path.read_text().partition(NOTES)[2] if path.is_file() else ""
    path.write_text(text.rstrip("\n") + "\n\n" + NOTES + kept if kept else text)


def markdown_table(headers: list[str], rows: list[list[object]], align: str | None = None) -> str:
    """align: one of 'l'/'r' per column (default: first column left, the rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line describing where the numbers come from."""
    import psutil

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ram = psutil.virtual_memory().total / 2**30
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{cpu_model()}, {cores} cores usable ({os.cpu_count()} logical), {ram:.1f} GiB RAM, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}; "
            f"load average at start {load} (shared machine)")


def source_digest(*folders: str) -> str:
    """sha256 (first 12 hex digits) over the .py files of `folders`: which code a report measured."""
    import hashlib

    h = hashlib.sha256()
    for folder in folders:
        for f in sorted((ROOT / folder).glob("*.py")):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def today() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


def python() -> str:
    """The interpreter running the benchmark (the project's .venv when run as documented)."""
    return sys.executable


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_worker(script: str | Path, *args: object):
    """Run `script --worker ARGS` in a fresh process (from the repository root); the JSON of its last stdout line."""
    import json

    r = subprocess.run([python(), str(script), "--worker", *map(str, args)], capture_output=True, text=True,
                       check=True, cwd=ROOT)
    return json.loads(r.stdout.splitlines()[-1])


def split_is_current(model: Path, k: int, passthrough: bool = True, exit_norm: str | None = None) -> bool:
    """Whether the early-exit split of `model` at k exists, in this edgelm's format, with (or without) the draft's
    passthrough layer (and, given `exit_norm`, that kind of exit): a benchmark writes it again otherwise, since an
    older split measures an older design."""
    sys.path.insert(0, str(ROOT))
    from edgelm.converters.early_exit import FORMAT, KEY, split_paths
    from edgelm.gguf_reader import read_gguf

    paths = split_paths(model, k)
    if not paths.exists():
        return False
    draft = read_gguf(paths.draft, keep_arrays=False)
    return (draft.get(KEY + "format") == FORMAT and bool(draft.get(KEY + "passthrough")) == passthrough
            and exit_norm in (None, draft.get(KEY + "exit_norm")))
