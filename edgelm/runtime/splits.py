"""Finding and checking the early-exit split of a model (see edgelm.converters.early_exit, which writes it).

The runtime side only: file names, and the checks that tie the three files to each other and to the source
model before llama.cpp loads them. It imports nothing of the conversion pipeline, so loading a split costs
no more memory than loading the model.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from edgelm.errors import ModelLoadError
from edgelm.gguf_reader import read_gguf

KEY = "edgelm.early_exit."
# 2: files are named by GGUFFile.fingerprint (header, tensor table and sampled weights), not a header hash
# 3: a llama draft may end in a passthrough layer (edgelm.converters.early_exit); format 2 splits still load
FORMAT = 3
READS = (2, 3)


@dataclass(frozen=True)
class SplitPaths:
    shared: Path
    draft: Path
    tail: Path

    def exists(self) -> bool:
        return self.shared.is_file() and self.draft.is_file() and self.tail.is_file()


def split_paths(model: str | Path, k: int) -> SplitPaths:
    model = Path(model)
    base = model.with_suffix("") if model.suffix == ".gguf" else model
    return SplitPaths(
        shared=base.with_name(f"{base.name}.ee-shared.gguf"),
        draft=base.with_name(f"{base.name}.ee{k}-draft.gguf"),
        tail=base.with_name(f"{base.name}.ee{k}-tail.gguf"),
    )


def available_splits(model: str | Path) -> list[int]:
    """The exit layers k for which a complete split lies beside `model`, ascending."""
    model = Path(model)
    base = model.with_suffix("") if model.suffix == ".gguf" else model
    found = []
    for p in base.parent.glob(f"{glob_escape(base.name)}.ee*-draft.gguf"):
        m = re.fullmatch(re.escape(base.name) + r"\.ee(\d+)-draft\.gguf", p.name)
        if m and split_paths(model, int(m.group(1))).exists():
            found.append(int(m.group(1)))
    return sorted(found)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def fingerprint(path: Path) -> str:
    """What the split's keys name a file by: GGUFFile.fingerprint (header, tensor table, sampled weights)."""
    return read_gguf(path, keep_arrays=False).fingerprint()


@dataclass(frozen=True)
class SplitInfo:
    k: int
    n_layer: int
    exit_norm: str
    paths: SplitPaths
    passthrough: bool = False  # the draft's layer k keeps every row of l_out-{k-1}: prefill needs one logits row


def check_split(model: str | Path | None, paths: SplitPaths, model_fingerprint: str | None = None) -> SplitInfo:
    """Check that the three files are one split (and of `model`, if given) before llama.cpp loads them.
    Each file's metadata is parsed once and dropped (tokenizer arrays included) before the next.
    `model_fingerprint`: the model's, when the caller has it already (it reads samples of every tensor)."""
    files = {"shared": paths.shared, "draft": paths.draft, "tail": paths.tail}
    meta = {}
    for role, path in files.items():
        if not path.is_file():
            raise ModelLoadError(f"{path}: missing part of the early-exit split (write it with "
                                 "`edgelm convert ... --early-exit K` or `edgelm exits MODEL --write K`)")
        info = read_gguf(path, keep_arrays=False)
        arch = info.get("general.architecture")
        meta[role] = {k: info.get(KEY + k) for k in ("role", "source", "shared", "layer", "n_layer", "exit_norm",
                                                      "passthrough")}
        if info.get(KEY + "format", 1) not in READS:
            raise ModelLoadError(f"{path}: early-exit split of format {info.get(KEY + 'format', 1)}, this edgelm reads "
                                 f"formats {' and '.join(map(str, READS))}; write the split again "
                                 "(`edgelm exits MODEL --write K`)")
        meta[role]["block_count"] = info.get(f"{arch}.block_count")
        if role == "shared":
            shared_sha = info.fingerprint()
        del info
        if meta[role]["role"] != role:
            raise ModelLoadError(f"{path}: not an early-exit {role} split (role {meta[role]['role']!r})")
    d, t = meta["draft"], meta["tail"]
    source = meta["shared"]["source"]
    for role in ("draft", "tail"):
        if meta[role]["source"] != source:
            raise ModelLoadError(f"{files[role]}: belongs to another model than {paths.shared}")
        if meta[role]["shared"] != shared_sha:
            raise ModelLoadError(f"{paths.shared}: was rewritten after {files[role]}; write the split again")
    k, n_layer = d["layer"], d["n_layer"]
    if (k, n_layer) != (t["layer"], t["n_layer"]):
        raise ModelLoadError(f"{paths.draft} (exit layer {k}) and {paths.tail} (exit layer {t['layer']}) "
                             "are parts of different splits")
    passthrough = d["passthrough"] or 0
    if passthrough not in (0, 1) or d["block_count"] != k + passthrough or t["block_count"] != n_layer - k:
        raise ModelLoadError(f"{paths.draft}: block counts do not add up to the {n_layer}-layer model")
    if model is not None and (model_fingerprint or fingerprint(Path(model))) != source:
        raise ModelLoadError(f"{paths.draft}: split of another model than {model}, or of an earlier version of it "
                             "(its weights changed since); write the split again")
    return SplitInfo(int(k), int(n_layer), str(d["exit_norm"] or "final"), paths, bool(passthrough))


def choose_split(model_path, early_exit: bool | int):
    """The early-exit split to load for `model_path`: the one at layer `early_exit`, or (True) the one
    with a trained exit norm, else the deepest exit (the most accepting) of those present."""
    found = available_splits(model_path)
    if early_exit is True:
        if not found:
            raise ModelLoadError(f"{model_path}: no early-exit split beside it; write one with "
                                 "`edgelm exits MODEL --write K` or `edgelm convert ... --early-exit K`")
        source = fingerprint(Path(model_path))  # once for every split beside it
        infos = [check_split(model_path, split_paths(model_path, k), source) for k in found]
        trained = [i for i in infos if i.exit_norm != "final"]
        return (trained or infos)[-1]
    if early_exit not in found:
        raise ModelLoadError(f"{model_path}: no early-exit split at layer {early_exit} beside it"
                             + (f" (there are: {', '.join(map(str, found))})" if found else ""))
    return check_split(model_path, split_paths(model_path, early_exit))
