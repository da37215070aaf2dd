"""Comparing a backend's output with the reference, in the order ggml's test-backend-ops uses:
structure, shape, dtype, NaN positions, inf signs, then the normalized error against a tolerance."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Mismatch:
    """Why an output differs from the reference (``what`` is one of shape, dtype, nan, inf, error)."""

    what: str
    detail: str

    def __str__(self) -> str:
        return f"{self.what}: {self.detail}"


def normalized_error(out: np.ndarray, ref: np.ndarray) -> float:
    """max|out - ref| / max(max|ref|, 1) over the finite entries (0.0 for empty arrays)."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    finite = np.isfinite(ref) & np.isfinite(out)
    if not finite.any():
        return 0.0
    diff = np.abs(out[finite] - ref[finite]).max()
    return float(diff / max(np.abs(ref[finite]).max(), 1.0))


def _flatten(value, path="out"):
    """Yield (path, array-or-scalar) leaves of nested tuples/lists of arrays."""
    if isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from _flatten(v, f"{path}[{i}]")
    else:
        yield path, value


def compare(out, ref, tolerance: float, exact: bool = False) -> Mismatch | None:
    """None when ``out`` matches ``ref`` within ``tolerance``; else the first Mismatch found."""
    out_leaves, ref_leaves = list(_flatten(out)), list(_flatten(ref))
    if len(out_leaves) != len(ref_leaves):
        return Mismatch("structure", f"{len(out_leaves)} outputs, expected {len(ref_leaves)}")
    for (path, o), (_, r) in zip(out_leaves, ref_leaves):
        o_arr, r_arr = np.asarray(o), np.asarray(r)
        if o_arr.shape != r_arr.shape:
            return Mismatch("shape", f"{path} has shape {o_arr.shape}, expected {r_arr.shape}")
        if o_arr.dtype != r_arr.dtype:
            return Mismatch("dtype", f"{path} has dtype {o_arr.dtype}, expected {r_arr.dtype}")
        if o_arr.dtype.kind not in "fc":
            if not np.array_equal(o_arr, r_arr):
                n = int(np.sum(o_arr != r_arr))
                return Mismatch("error", f"{path}: {n} of {r_arr.size} entries differ (exact op)")
            continue
        o64, r64 = o_arr.astype(np.float64), r_arr.astype(np.float64)
        if not np.array_equal(np.isnan(o64), np.isnan(r64)):
            return Mismatch("nan", f"{path}: NaN at different positions")
        if not np.array_equal(np.isposinf(o64), np.isposinf(r64)) or not np.array_equal(
                np.isneginf(o64), np.isneginf(r64)):
            return Mismatch("inf", f"{path}: infinities differ in position or sign")
        if exact:
            finite = np.isfinite(r64)
            if not np.array_equal(o64[finite], r64[finite]):
                return Mismatch("error", f"{path}: not bit-exact (max |diff| "
                                         f"{np.abs(o64[finite] - r64[finite]).max():.3g})")
            continue
        err = normalized_error(o64, r64)
        if not err <= tolerance:
            return Mismatch("error", f"{path}: normalized error {err:.3g} > tolerance {tolerance:.3g}")
    return None
