"""Shared pieces of the numba backend: the jit decorators, a dot product, operand conversion.

The ops here receive canonical arguments: the registry ran the op's check from ``gptevo/ops/``
before the call (spec/backends.md), so nothing in this backend validates arguments; conversions
assert the invariants they rely on.

The general kernels here are compiled with ``cache=True`` (cached on disk; numba falls back to its
user cache directory where the package directory is read-only) and ``fastmath=False`` (IEEE
semantics), so results differ from the NumPy reference only by summation order. The decode
kernels (_gemv, _mxfp4_gemv, attention) reassociate reductions, as spec/backends.md allows.
The dot product keeps eight independent accumulators, which gives the CPU independent chains to
overlap without needing fastmath.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange  # noqa: F401  (re-exported for the kernel modules)

jit = numba.njit(cache=True, fastmath=False, error_model="numpy")
pjit = numba.njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
# Kernels that take other jitted functions as arguments (the row loaders of grouped_gemm) cannot be
# cached: numba keys them by the function objects, and saving them can fail with "underlying object
# has vanished". They are compiled per process; the hot decode and prefill paths do not use them.
jit_uncached = numba.njit(cache=False, fastmath=False, error_model="numpy")
pjit_uncached = numba.njit(cache=False, fastmath=False, error_model="numpy", parallel=True)


@jit
def dot(a, b, n, zero):
    """sum_j a[j] * b[j] for j < n, in the promoted dtype of a and b; ``zero`` fixes the start type.

    Eight interleaved partial sums (j mod 8), combined pairwise at the end.
    """
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = zero
    n8 = n - n % 8
    for j in range(0, n8, 8):
        a0 += a[j] * b[j]
        a1 += a[j + 1] * b[j + 1]
        a2 += a[j + 2] * b[j + 2]
        a3 += a[j + 3] * b[j + 3]
        a4 += a[j + 4] * b[j + 4]
        a5 += a[j + 5] * b[j + 5]
        a6 += a[j + 6] * b[j + 6]
        a7 += a[j + 7] * b[j + 7]
    for j in range(n8, n):
        a0 += a[j] * b[j]
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


def compute_dtype(*arrays) -> np.dtype:
    """float64 when any input is float64, else float32 (the reference's rule)."""
    for a in arrays:
        if getattr(a, "dtype", None) == np.float64:
            return np.dtype(np.float64)
    return np.dtype(np.float32)


def as_compute(x, dtype, what: str) -> np.ndarray:
    """``x`` (a checked real array; ``what`` names it) as a C-contiguous array of ``dtype``
    (f16/bf16/int inputs widen exactly)."""
    arr = np.asarray(x)
    assert arr.dtype.kind in "iuf" or arr.dtype.name == "bfloat16", f"{what}: unchecked dtype {arr.dtype}"
    return np.ascontiguousarray(arr.astype(dtype, copy=False))


def small_vector(v, dtype) -> np.ndarray:
    """A small parameter (norm weight, bias, sinks) widened to ``dtype``, C-contiguous.

    Small vectors are widened here, outside the kernels: they are read once per call and are a
    tiny fraction of the bytes (the big weights stay packed; see _weights.py).
    """
    return np.ascontiguousarray(np.asarray(v).astype(dtype, copy=False))


# Multiply-adds per thread below which a parallel region costs more than it saves (thread wake-up
# and join are microseconds; on an oversubscribed machine a descheduled worker stalls the others).
MIN_WORK_PER_THREAD = 1 << 22


def run_parallel(kernel, work: int, *args):
    """Call a ``prange`` kernel with at most ``work // MIN_WORK_PER_THREAD`` threads (at least one)."""
    total = numba.get_num_threads()
    n = max(1, min(total, int(work) // MIN_WORK_PER_THREAD))
    if n == total:
        return kernel(*args)
    numba.set_num_threads(n)
    try:
        return kernel(*args)
    finally:
        numba.set_num_threads(total)


def chunk_rows(n_rows: int, n_groups: int = 1) -> int:
    """Rows per parallel work item: about 16 items per thread, a multiple of 8 rows (one tile)."""
    threads = max(1, numba.get_num_threads())
    rows = max(1, -(-n_rows * n_groups // (16 * threads)))
    return -(-rows // 8) * 8
