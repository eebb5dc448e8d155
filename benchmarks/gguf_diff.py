"""Tensor-by-tensor comparison of two GGUF files: names, shapes, types, then the stored bytes.

Where bytes differ, both sides are dequantized (gguf-py) and the largest absolute difference is
reported, so "not byte-identical" always comes with how far apart the numbers are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

# Keys that name the writer or the input file rather than describe the model.
PROVENANCE_PREFIXES = ("edgelm.", "quantize.imatrix.", "GGUF.")


@dataclass
class TensorDiff:
    name: str
    n_elements: int
    n_differ: int  # elements whose dequantized values differ
    max_abs: float
    max_rel: float  # max |a-b| / max |a|


@dataclass
class GGUFDiff:
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    shape_or_type: list[str] = field(default_factory=list)  # "name: shape/type a vs b"
    identical: list[str] = field(default_factory=list)
    differing: list[TensorDiff] = field(default_factory=list)
    metadata_only_a: list[str] = field(default_factory=list)
    metadata_only_b: list[str] = field(default_factory=list)
    metadata_differ: list[str] = field(default_factory=list)

    @property
    def tensors_equal(self) -> bool:
        return not (self.only_a or self.only_b or self.shape_or_type or self.differing)

    @property
    def layout_equal(self) -> bool:
        """Same tensor names, shapes and types (data may differ)."""
        return not (self.only_a or self.only_b or self.shape_or_type)

    def summary(self) -> str:
        n = len(self.identical) + len(self.differing)
        parts = [f"{len(self.identical)}/{n} tensors byte-identical"]
        if self.differing:
            worst = max(self.differing, key=lambda d: d.max_abs)
            parts.append(f"{len(self.differing)} differ (largest |diff| {worst.max_abs:.3g} in {worst.name}, "
                         f"{worst.n_differ:,}/{worst.n_elements:,} elements)")
        for label, items in (("only in first", self.only_a), ("only in second", self.only_b),
                             ("shape/type mismatch", self.shape_or_type)):
            if items:
                parts.append(f"{label}: {', '.join(items[:4])}{' …' if len(items) > 4 else ''}")
        return "; ".join(parts)


def _fields(reader: gguf.GGUFReader) -> dict[str, object]:
    out = {}
    for key, f in reader.fields.items():
        try:
            value = f.contents()
        except Exception:  # noqa: BLE001 - exotic field types: compare their raw parts instead
            value = [bytes(p) for p in f.parts]
        out[key] = value
    return out


def compare(a: str | Path, b: str | Path, ignore: tuple[str, ...] = PROVENANCE_PREFIXES) -> GGUFDiff:
    """`ignore`: metadata key prefixes left out of the key comparison."""
    ra, rb = gguf.GGUFReader(str(a)), gguf.GGUFReader(str(b))
    ta, tb = {t.name: t for t in ra.tensors}, {t.name: t for t in rb.tensors}
    d = GGUFDiff(only_a=sorted(set(ta) - set(tb)), only_b=sorted(set(tb) - set(ta)))
    for name in sorted(set(ta) & set(tb)):
        x, y = ta[name], tb[name]
        if list(x.shape) != list(y.shape) or x.tensor_type != y.tensor_type:
            d.shape_or_type.append(f"{name}: {list(x.shape)} {x.tensor_type.name} vs {list(y.shape)} {y.tensor_type.name}")
            continue
        raw_x, raw_y = np.asarray(x.data).view(np.uint8), np.asarray(y.data).view(np.uint8)
        if np.array_equal(raw_x, raw_y):
            d.identical.append(name)
            continue
        fx = gguf.quants.dequantize(np.asarray(x.data), x.tensor_type).astype(np.float64).ravel()
        fy = gguf.quants.dequantize(np.asarray(y.data), y.tensor_type).astype(np.float64).ravel()
        diff = np.abs(fx - fy)
        scale = float(np.abs(fx).max()) or 1.0
        d.differing.append(TensorDiff(name, fx.size, int((diff > 0).sum()), float(diff.max()), float(diff.max()) / scale))
    fa, fb = _fields(ra), _fields(rb)
    keep = lambda k: not k.startswith(ignore)  # noqa: E731
    d.metadata_only_a = sorted(k for k in fa if k not in fb and keep(k))
    d.metadata_only_b = sorted(k for k in fb if k not in fa and keep(k))
    d.metadata_differ = sorted(k for k in fa.keys() & fb.keys() if keep(k) and _differs(fa[k], fb[k]))
    return d


def _differs(x: object, y: object) -> bool:
    try:
        return bool(x != y)
    except ValueError:  # numpy arrays
        return not np.array_equal(np.asarray(x), np.asarray(y))
