"""MoE for several tokens with MXFP4 experts: a grouped GEMM (spec: spec/ops/moe.md, spec/backends.md).

The (token, slot) pairs are grouped by expert, and each half (gate_up, then down, with the
activation between them) multiplies every group by its expert; then the weighted sum. On AVX-512
hosts one parallel region does a whole half (``_moe_region.grouped_half``: groups of 1-3 rows
stream each weight row once for all of them, larger groups decode four weight rows at a time into
a buffer and multiply them in register tiles). Elsewhere, an expert chosen by at least
``TILE_MIN_ROWS`` pairs goes through :func:`expert_rows_gemm` (scalar decode, each weight row
decoded once, one input row per pass: 62-74 GFLOP/s on 2 cores for 16-64 rows of a 5760 x 2880
expert; decoding tiles for BLAS measured about half that) and smaller groups through the streaming
decode GEMV (one weight pass per pair). Every kernel here is cacheable (no function arguments), so a
second process compiles nothing.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from gptevo.backends.numba import _moe_region, _simd
from gptevo.backends.numba._gemv import fast_jit, fast_pjit

TILE_MIN_ROWS = _moe_region.TILE_MIN_ROWS   # pairs per expert from which decoding each weight row once pays


@fast_jit
def _decode_row(row_b, row_s, values, powers, dst):
    """dst [32G] = the decoded MXFP4 row (values[code] * powers[scale byte], exact float32)."""
    for g in range(row_s.shape[0]):
        p = powers[row_s[g]]
        for j in range(16):
            b = row_b[g, j]
            dst[32 * g + 2 * j] = values[b & 15] * p
            dst[32 * g + 2 * j + 1] = values[b >> 4] * p


@fast_pjit
def expert_rows_gemm(blocks, scales, e, xg, values, powers, out, chunk):
    """out[r, n] = decode(W[e, n]) . xg[r] for every row r of xg [g,K] and weight row n.

    Four weight rows are decoded at a time (exact, into a per-thread [4,K] buffer) and each input
    row, read once from cache, is multiplied by all four (four vector sums). Parallel over chunks
    of weight rows, with no BLAS call in between, so no second thread pool competes for the cores.
    chunk must be a multiple of 4.
    """
    n_out = scales.shape[1]
    k = scales.shape[2] * 32
    n_rows_x = xg.shape[0]
    for c in prange((n_out + chunk - 1) // chunk):
        buf = np.zeros((4, k), np.float32)                                   # [4,K] decoded rows
        for n0 in range(c * chunk, min(n_out, (c + 1) * chunk), 4):
            m = min(4, n_out - n0)
            for i in range(m):
                _decode_row(blocks[e, n0 + i], scales[e, n0 + i], values, powers, buf[i])
            w0, w1, w2, w3 = buf[0], buf[1], buf[2], buf[3]
            for r in range(n_rows_x):
                xr = xg[r]
                a0 = a1 = a2 = a3 = np.float32(0)
                for j in range(k):
                    xj = xr[j]
                    a0 += w0[j] * xj
                    a1 += w1[j] * xj
                    a2 += w2[j] * xj
                    a3 += w3[j] * xj
                out[r, n0] = a0
                if m > 1:
                    out[r, n0 + 1] = a1
                if m > 2:
                    out[r, n0 + 2] = a2
                if m > 3:
                    out[r, n0 + 3] = a3


def _project(weight, experts, starts, rows_x, xs, bias, out, gemv, mode):
    """out[p] = W[e] . xs[rows_x[p]] (+ bias[e]) for the pairs p of each expert group.

    experts [U] (sorted), starts [U+1] offsets into the pair order; rows_x [P] the row of xs used by
    pair p; out [P,N]. AVX-512 hosts: one parallel region for every group (``_moe_region``). Else
    large groups: :func:`expert_rows_gemm`; small groups: one streaming GEMV call.
    """
    from gptevo.ops.mxfp4 import FP4_VALUES

    blocks, scales = weight.blocks, weight.scales
    if _simd.has_avx512() and blocks.flags.c_contiguous and scales.flags.c_contiguous:
        _moe_region.grouped_half(weight, experts, starts, np.ascontiguousarray(xs[rows_x]), bias, out, mode)
        return
    n_out = scales.shape[1]
    values = FP4_VALUES.astype(np.float32)                                   # [16]
    powers = _powers()                                                       # [256]
    chunk = 4 * max(2, -(-n_out // (32 * max(1, numba.get_num_threads()))))   # a multiple of 4
    small_pairs, small_experts = [], []
    for u, e in enumerate(experts):
        lo, hi = int(starts[u]), int(starts[u + 1])
        if hi - lo < TILE_MIN_ROWS:
            small_pairs.extend(range(lo, hi))
            small_experts.extend([int(e)] * (hi - lo))
            continue
        part = np.empty((hi - lo, n_out), np.float32)                        # [g,N]
        expert_rows_gemm(blocks, scales, int(e), np.ascontiguousarray(xs[rows_x[lo:hi]]), values, powers, part,
                         chunk)
        out[lo:hi] = part
        if bias is not None:
            out[lo:hi] += bias[int(e)]
    if small_pairs:
        idx = np.asarray(small_pairs, np.int64)
        ids = np.asarray(small_experts, np.int64)
        out[idx] = gemv(blocks, scales, ids, np.ascontiguousarray(xs[rows_x[idx]]), bias)   # [s,N]


_POWERS = []


def _powers() -> np.ndarray:
    """2**(s - 127) for every E8M0 byte as float32 (inf where it overflows, NaN for 255)."""
    if not _POWERS:
        from gptevo.backends.numba._weights import SCALE_TABLE

        _POWERS.append(SCALE_TABLE[np.dtype(np.float32)])
    return _POWERS[0]


def moe_grouped_mxfp4(x, weights, ids, w_gate_up, w_down, b_gu, b_dn, activate, combine, gemv,
                      mode="exact"):
    """moe_experts for T >= 2 tokens with MXFP4 experts, float32.

    x [T,D]; weights, ids [T,k]; b_gu [E,2I] | None; b_dn [E,D] | None; ``activate(h, a)`` writes
    the expert activation of h [P,2I] into a [P,I]; ``combine(y, pair_of, weights, out)`` the
    weighted sum; ``gemv(blocks, scales, experts, x, bias)`` the streaming decode GEMV (portable
    hosts); ``mode`` the MXFP4 mode ("exact" | "int8", ``_moe_region.grouped_half``).
    """
    n_t, k = ids.shape
    flat = ids.reshape(-1).astype(np.int64)                                  # [P] expert of pair
    order = np.argsort(flat, kind="stable")                                  # pairs grouped by expert
    experts, counts = np.unique(flat[order], return_counts=True)             # [U], [U]
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)       # [U+1]
    tokens = (order // k).astype(np.int64)                                   # [P] token of sorted pair
    two_i = w_gate_up.scales.shape[1]
    h = np.empty((flat.size, two_i), np.float32)                             # [P,2I]
    _project(w_gate_up, experts, starts, tokens, x, b_gu, h, gemv, mode)
    a = np.empty((flat.size, two_i // 2), np.float32)                        # [P,I]
    activate(h, a)
    y = np.empty((flat.size, w_down.scales.shape[1]), np.float32)            # [P,D]
    _project(w_down, experts, starts, np.arange(flat.size, dtype=np.int64), a, b_dn, y, gemv, mode)
    pair_of = np.empty(flat.size, np.int64)
    pair_of[order] = np.arange(flat.size)                                    # sorted index of (t, j)
    out = np.zeros((n_t, y.shape[1]), np.float32)                            # [T,D]
    combine(y, pair_of.reshape(n_t, k), weights, out)
    return out
