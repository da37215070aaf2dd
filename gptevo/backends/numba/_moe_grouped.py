"""MoE for several tokens with MXFP4 experts: a grouped GEMM (spec: spec/ops/moe.md, spec/backends.md).

The (token, slot) pairs are grouped by expert. An expert chosen by at least ``TILE_MIN_ROWS`` pairs
is decoded once, ``TILE_ROWS`` weight rows at a time, into a float32 tile (exact: the decoded values
are the reference's), and BLAS multiplies the tile by all of its pairs' rows at once; the pairs of
rarely chosen experts go through the streaming decode GEMV (one weight pass per pair, which beats
decoding a whole expert for one or two rows). Both halves (gate_up, then down) work this way, with
the activation between them, then the weighted sum. Every kernel here is cacheable (no function
arguments), so a second process compiles nothing.
"""
from __future__ import annotations

import numpy as np
from gptevo.backends.numba._gemv import fast_jit

TILE_ROWS = 256          # weight rows decoded per tile (256 x 2880 float32 = 2.9 MB)
TILE_MIN_ROWS = 4        # pairs per expert from which decoding the expert into tiles pays


@fast_jit
def decode_rows(blocks, scales, e, r0, values, powers, out):
    """out[i] = decoded row r0 + i of expert e: values[code] * powers[scale byte] (exact, float32).

    blocks [E,N,G,16] u8, scales [E,N,G] u8 (low nibble = even element); values [16], powers [256].
    Serial on purpose, like _gemv.widen_rows: it alternates with multi-threaded BLAS calls.
    """
    n_groups = scales.shape[2]
    for i in range(out.shape[0]):
        row_b = blocks[e, r0 + i]                      # [G,16]
        row_s = scales[e, r0 + i]                      # [G]
        dst = out[i]                                   # [32G]
        for g in range(n_groups):
            p = powers[row_s[g]]
            for j in range(16):
                b = row_b[g, j]
                dst[32 * g + 2 * j] = values[b & 15] * p
                dst[32 * g + 2 * j + 1] = values[b >> 4] * p


def _project(weight, experts, starts, rows_x, xs, bias, out, gemv):
    """out[p] = W[e] . xs[rows_x[p]] (+ bias[e]) for the pairs p of each expert group.

    experts [U] (sorted), starts [U+1] offsets into the pair order; rows_x [P] the row of xs used by
    pair p; out [P,N]. Large groups: decoded tiles x BLAS; small groups: one streaming GEMV call.
    """
    from gptevo.ops.mxfp4 import FP4_VALUES

    blocks, scales = weight.blocks, weight.scales
    n_out = scales.shape[1]
    values = FP4_VALUES.astype(np.float32)                                   # [16]
    powers = _powers()                                                       # [256]
    tile = np.empty((min(TILE_ROWS, n_out), scales.shape[2] * 32), np.float32)   # [rows,K]
    small_pairs, small_experts = [], []
    for u, e in enumerate(experts):
        lo, hi = int(starts[u]), int(starts[u + 1])
        if hi - lo < TILE_MIN_ROWS:
            small_pairs.extend(range(lo, hi))
            small_experts.extend([int(e)] * (hi - lo))
            continue
        xg = xs[rows_x[lo:hi]]                                               # [g,K]
        for r0 in range(0, n_out, TILE_ROWS):
            t = tile[:min(TILE_ROWS, n_out - r0)]                            # [rows,K]
            decode_rows(blocks, scales, int(e), r0, values, powers, t)
            out[lo:hi, r0:r0 + t.shape[0]] = xg @ t.T                        # [g,rows] BLAS
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


def moe_grouped_mxfp4(x, weights, ids, w_gate_up, w_down, b_gu, b_dn, activate, combine, gemv):
    """moe_experts for T >= 2 tokens with MXFP4 experts, float32.

    x [T,D]; weights, ids [T,k]; b_gu [E,2I] | None; b_dn [E,D] | None; ``activate(h, a)`` writes
    the expert activation of h [P,2I] into a [P,I]; ``combine(y, pair_of, weights, out)`` the
    weighted sum; ``gemv(blocks, scales, experts, x, bias)`` the streaming decode GEMV.
    """
    n_t, k = ids.shape
    flat = ids.reshape(-1).astype(np.int64)                                  # [P] expert of pair
    order = np.argsort(flat, kind="stable")                                  # pairs grouped by expert
    experts, counts = np.unique(flat[order], return_counts=True)             # [U], [U]
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)       # [U+1]
    tokens = (order // k).astype(np.int64)                                   # [P] token of sorted pair
    two_i = w_gate_up.scales.shape[1]
    h = np.empty((flat.size, two_i), np.float32)                             # [P,2I]
    _project(w_gate_up, experts, starts, tokens, x, b_gu, h, gemv)
    a = np.empty((flat.size, two_i // 2), np.float32)                        # [P,I]
    activate(h, a)
    y = np.empty((flat.size, w_down.scales.shape[1]), np.float32)            # [P,D]
    _project(w_down, experts, starts, np.arange(flat.size, dtype=np.int64), a, b_dn, y, gemv)
    pair_of = np.empty(flat.size, np.int64)
    pair_of[order] = np.arange(flat.size)                                    # sorted index of (t, j)
    out = np.zeros((n_t, y.shape[1]), np.float32)                            # [T,D]
    combine(y, pair_of.reshape(n_t, k), weights, out)
    return out
