"""A few input rows times a weight read once: ``out[m, n] = W[n] . x[m] (+ bias[n])`` for 2 <= M <= 16.

Batched decode multiplies every weight by a handful of rows (one per sequence). BLAS is slow at that
shape here: OpenBLAS's ``x @ W.T`` for 2-16 rows of GPT-2's 3072 x 768 matrix took 6-10x the time of
one row, so the weight was effectively read once per row or worse. This kernel reads each weight
row once per call: a ``prange`` over chunks of output rows, four weight rows at a time, each
multiplied by two input rows per pass over K (eight vector sums in registers; a leftover input row
takes a four-sum pass); up to four rows, :func:`few_gemm` takes one weight row per pass times four
input rows instead (2 threads, 50257 x 768 float32: 2 rows 4.4 vs 6.9 ms, 4 rows 4.7 vs 7.8 ms;
8 rows 11.2 vs 9.4 ms, hence the split). Weights are float32 (with float32 x), or bfloat16 / float16 bits widened
exactly in registers as in :mod:`_gemv`; fast-math reassociation as the decode GEMV (spec/backends.md,
"Numerical policy"): every product is of the exactly widened operands, only summation order differs.
"""
from __future__ import annotations

import numpy as np
from numba import prange, types
from numba.extending import overload

from gptevo.backends.numba._gemv import fast_jit, fast_pjit, half_to_float

MAX_ROWS = 16          # more input rows go to BLAS (or widened tiles and BLAS)
FEW_ROWS = 4           # up to this many rows: few_gemm (one weight row per pass), else small_gemm


def widen(v, is_bf16):
    """float32 of a weight element: itself for float32, the exact widening of 16-bit float bits."""


@overload(widen)
def _widen_impl(v, is_bf16):
    if isinstance(v, types.Float):
        return lambda v, is_bf16: v
    return lambda v, is_bf16: half_to_float(v, is_bf16)


@fast_jit
def _store(out, bias, has_bias, m, n, a):
    out[m, n] = a + bias[n] if has_bias else a


@fast_pjit
def small_gemm(w, x, bias, out, chunk, is_bf16):
    """w [N,K] float32 or uint16 bits (bf16 when ``is_bf16``, else f16); x [M,K] float32;
    bias [N] or [0]; out [M,N] float32."""
    n_rows, k = w.shape
    m_rows = x.shape[0]
    has_bias = bias.shape[0] == n_rows
    zero = np.float32(0)
    for c in prange((n_rows + chunk - 1) // chunk):
        lo, hi = c * chunk, min(n_rows, (c + 1) * chunk)
        n = lo
        while n + 4 <= hi:
            w0, w1, w2, w3 = w[n], w[n + 1], w[n + 2], w[n + 3]
            m = 0
            while m + 2 <= m_rows:
                xa, xb = x[m], x[m + 1]
                a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = zero
                for j in range(k):
                    v0, v1 = widen(w0[j], is_bf16), widen(w1[j], is_bf16)
                    v2, v3 = widen(w2[j], is_bf16), widen(w3[j], is_bf16)
                    p, q = xa[j], xb[j]
                    a0 += v0 * p
                    a1 += v1 * p
                    a2 += v2 * p
                    a3 += v3 * p
                    b0 += v0 * q
                    b1 += v1 * q
                    b2 += v2 * q
                    b3 += v3 * q
                for i, (a, b) in enumerate(((a0, b0), (a1, b1), (a2, b2), (a3, b3))):
                    _store(out, bias, has_bias, m, n + i, a)
                    _store(out, bias, has_bias, m + 1, n + i, b)
                m += 2
            if m < m_rows:
                xa = x[m]
                a0 = a1 = a2 = a3 = zero
                for j in range(k):
                    p = xa[j]
                    a0 += widen(w0[j], is_bf16) * p
                    a1 += widen(w1[j], is_bf16) * p
                    a2 += widen(w2[j], is_bf16) * p
                    a3 += widen(w3[j], is_bf16) * p
                for i, a in enumerate((a0, a1, a2, a3)):
                    _store(out, bias, has_bias, m, n + i, a)
            n += 4
        for r in range(n, hi):
            row = w[r]
            for m in range(m_rows):
                xa = x[m]
                a = zero
                for j in range(k):
                    a += widen(row[j], is_bf16) * xa[j]
                _store(out, bias, has_bias, m, r, a)


@fast_pjit
def few_gemm(w, x, bias, out, chunk, is_bf16):
    """As :func:`small_gemm` for M <= 4: one weight row per pass, multiplied by four input rows at
    a time (the row read from memory once, x from L1), leftover input rows one by one."""
    n_rows, k = w.shape
    m_rows = x.shape[0]
    has_bias = bias.shape[0] == n_rows
    zero = np.float32(0)
    for c in prange((n_rows + chunk - 1) // chunk):
        for n in range(c * chunk, min(n_rows, (c + 1) * chunk)):
            row = w[n]
            m = 0
            while m + 4 <= m_rows:
                x0, x1, x2, x3 = x[m], x[m + 1], x[m + 2], x[m + 3]
                a0 = a1 = a2 = a3 = zero
                for j in range(k):
                    v = widen(row[j], is_bf16)
                    a0 += v * x0[j]
                    a1 += v * x1[j]
                    a2 += v * x2[j]
                    a3 += v * x3[j]
                for i, a in enumerate((a0, a1, a2, a3)):
                    _store(out, bias, has_bias, m + i, n, a)
                m += 4
            while m < m_rows:
                xa = x[m]
                a = zero
                for j in range(k):
                    a += widen(row[j], is_bf16) * xa[j]
                _store(out, bias, has_bias, m, n, a)
                m += 1


def small_rows(x2, weight, bias, threads: int):
    """``x2 @ weight.T (+ bias)`` for 2 <= M <= MAX_ROWS float32 rows ``x2`` [M,K] (C-contiguous),
    or None when the weight is not a C-contiguous float32 / bfloat16 / float16 matrix."""
    if x2.dtype != np.float32 or not 2 <= x2.shape[0] <= MAX_ROWS:
        return None
    if not isinstance(weight, np.ndarray) or weight.ndim != 2 or not weight.flags.c_contiguous:
        return None
    wd = weight.dtype
    if wd == np.float32:
        w, is_bf16 = weight, False
    elif wd.name == "bfloat16" or wd == np.float16:
        w, is_bf16 = weight.view(np.uint16), wd.name == "bfloat16"
    else:
        return None
    n = w.shape[0]
    out = np.empty((x2.shape[0], n), np.float32)                                 # [M,N]
    b = np.zeros(0, np.float32) if bias is None else bias
    kernel = few_gemm if x2.shape[0] <= FEW_ROWS else small_gemm
    kernel(w, x2, b, out, max(16, -(-n // (8 * max(1, threads)))), is_bf16)
    return out
