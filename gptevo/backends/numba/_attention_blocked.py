"""Attention for many queries (prefill) on numba: blocked, with BLAS for both products.

For each KV head g and each block of ``QUERY_BLOCK`` query positions, the queries of g's heads
(``H/G`` of them under GQA) are stacked into one [heads x block, Dh] matrix, so one BLAS call gives
their scores against g's keys and one gives the weighted values: the keys and values of a KV head
are read once per block for all the heads that share them. Between the two products a numba
kernel applies the ALiBi bias, the causal / sliding-window mask from positions and the softmax
with the optional sink logit, row by row in float64 (as the reference), into the probabilities.
That kernel is serial on purpose: between two multi-threaded BLAS calls, BLAS's worker threads
still spin for a while, and a parallel numba region competing with them for the same cores ran
30 times slower than the serial loop (measured on 2 cores).

Memory is bounded by the block: scores and probabilities are [heads x block, S] in the compute
dtype (64 x 8 x 4096 float32 = 8 MB at S = 4096), never [H, T, S]. Results equal the reference's
(``gptevo.ops.attention.attention``) up to summation order, including NaN propagation (a NaN in
a masked value slot leaks through 0 * NaN exactly as in the reference's ``probs @ v``).
"""
from __future__ import annotations

import math

import numpy as np

from gptevo.backends.numba._gemv import fast_jit
from gptevo.backends.numba._vmath import exp64

QUERY_BLOCK = 64          # query positions per block
MIN_QUERIES = 16          # below this, the per-(query, head) kernel is faster (decode, short chunks)


@fast_jit
def _mask_softmax(scores, qpos, kpos, window, heads, h0, sinks, has_sink, slopes, has_alibi):
    """In place, per row r of scores [heads*tb, S] (row = head h0 + r // tb, query r % tb): ALiBi,
    mask, then softmax with the sink (float64 arithmetic, written back in scores' dtype)."""
    tb = scores.shape[0] // heads
    n_k = scores.shape[1]
    for r in range(scores.shape[0]):
        h = h0 + r // tb
        qt = qpos[r % tb]
        row = scores[r]
        m = -np.inf
        nan = False
        for s in range(n_k):
            ks = kpos[s]
            if ks >= 0 and ks <= qt and (window <= 0 or ks > qt - window):
                v = float(row[s])
                if has_alibi:
                    v -= slopes[h] * float(qt - ks)
                    row[s] = v
                if v != v:
                    nan = True
                elif v > m:
                    m = v
            else:
                row[s] = -np.inf
        sink = sinks[h] if has_sink else 0.0
        if has_sink and sink > m:
            m = sink
        if nan:
            for s in range(n_k):
                row[s] = np.nan
            continue
        if not math.isfinite(m):
            m = 0.0
        denom = 0.0
        for s in range(n_k):
            e = exp64(float(row[s]) - m)
            row[s] = e
            denom += e
        if has_sink:
            denom += exp64(sink - m)
        if not denom > 0:
            denom = 1.0
        inv = 1.0 / denom
        for s in range(n_k):
            row[s] = row[s] * inv


def attention_blocked(q, k, v, qpos, kpos, window, sinks, slopes, scale, out):
    """q [T,H,Dh], k [S,G,Dh], v [S,G,Dv] (compute dtype), positions int64, window (0 = none),
    sinks / slopes float64 [H] or None; writes out [T,H,Dv]."""
    n_q, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    group = n_heads // n_kv
    dtype = out.dtype
    no_vec = np.zeros(1)
    sink_arr = no_vec if sinks is None else sinks
    slope_arr = no_vec if slopes is None else slopes
    for g in range(n_kv):
        kg = np.ascontiguousarray(k[:, g])                                    # [S,Dh]
        vg = np.ascontiguousarray(v[:, g])                                    # [S,Dv]
        heads = slice(g * group, (g + 1) * group)
        for t0 in range(0, n_q, QUERY_BLOCK):
            t1 = min(n_q, t0 + QUERY_BLOCK)
            qb = q[t0:t1, heads].transpose(1, 0, 2).reshape(-1, head_dim)     # [group*tb,Dh]
            scores = qb @ kg.T                                                # [group*tb,S] BLAS
            scores *= dtype.type(scale)
            _mask_softmax(scores, qpos[t0:t1], kpos, window, group, g * group, sink_arr, sinks is not None,
                          slope_arr, slopes is not None)
            o = scores @ vg                                                   # [group*tb,Dv] BLAS
            out[t0:t1, heads] = o.reshape(group, t1 - t0, -1).transpose(1, 0, 2)
