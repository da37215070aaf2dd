"""Attention on numba for any number of queries: key tiles, online softmax (flash-style).

One parallel item is one KV head g and one block of up to ``QUERY_BLOCK`` query positions; its rows
are the (head, query) pairs of the ``H/G`` query heads that share g (GQA), so each key and value of
g is read once per block for all of them. Keys are visited in tiles of ``KEY_BLOCK``; a tile no
row of the block can see (causal / window bounds from the block's query positions, empty slots
marked -1) is skipped, so causal prefill does about half the products of a full score matrix.
For each tile and row: the scores (the q.k sums in the compute dtype), then scale, ALiBi and the
mask in float64, then the online softmax update: with m the running maximum (starting at the
sink logit, or -inf) and l the running denominator (starting at exp(sink - m) = 1, or 0),

    m' = max(m, max_j x_j),  l' = l * exp(m - m') + sum_j exp(x_j - m'),
    acc' = acc * exp(m - m') + sum_j exp(x_j - m') v_j,

and out = acc / l at the end (zeros where nothing is visible and there is no sink, as the
reference). The exponentials are float64 (``exp64``, vectorized); the weights enter the value sum
rounded to the compute dtype. A NaN score makes its row NaN, as the reference's softmax does.

Two ways to form the scores, chosen by the caller:
- ``kt`` (keys transposed per KV head, [G, Dh, S], made once per call): the tile of scores is
  accumulated over d with the inner loop running over keys, which vectorizes without horizontal
  sums. For prefill, where the copy costs S x G x Dh against T x H x S x Dh products.
- ``k`` as stored ([S, G, Dh]): one vectorized dot product per (row, key). For decode, where a
  transposed copy of a long cache per token would cost more than the attention.

Memory per item is bounded by the block: scores [rows, KEY_BLOCK] and accumulators [rows, Dv] in
the compute dtype; nothing of size [H, T, S] exists. Results equal the reference
(``gptevo.ops.attention.attention``) up to summation order and the rescaling's rounding
(spec/backends.md, "Numerical policy").
"""
from __future__ import annotations

import functools

import numba
import numpy as np
from numba import prange

from gptevo.backends.numba._attention_tiles import attention_tiles, item_queries
from gptevo.backends.numba._vmath import exp64

QUERY_BLOCK = 16          # query positions per parallel item
KEY_BLOCK = 64            # keys per tile (scores of a tile stay in L1)
_FAST = {"reassoc", "contract", "nsz", "arcp"}   # vectorized sums (spec/backends.md, numerical policy)


def _flash_items(q, k, v, qpos, kpos, window, sinks, has_sink, slopes, has_alibi, scale, order, q_block, out):
    """q [T,H,Dh], k [S,G,Dh], v [S,G,Dv], out [T,H,Dv] (compute dtype);
    qpos [T], kpos [S] int64 (-1: empty slot); window <= 0: none; sinks / slopes float64 [H];
    order: a permutation of the G * ceil(T / q_block) items (g fastest), for load balance."""
    n_q, n_heads, head_dim = q.shape
    n_k = kpos.shape[0]
    n_kv = k.shape[1]
    dv = v.shape[2]
    group = n_heads // n_kv
    zero = out.dtype.type(0)
    for it in prange(order.shape[0]):
        g, t0, tb, qmin, qmax = item_queries(order[it], n_kv, q_block, n_q, qpos)
        rows = group * tb                      # row r: head g * group + r // tb, query t0 + r % tb
        m = np.empty(rows)                                        # [rows] float64 running max
        den = np.empty(rows)                                      # [rows] float64 running denominator
        nan_row = np.zeros(rows, np.bool_)
        acc = np.zeros((rows, dv), out.dtype)                     # [rows,Dv]
        sc = np.empty((rows, KEY_BLOCK), out.dtype)               # [rows,tile] scores, then weights
        for r in range(rows):
            h = g * group + r // tb
            m[r] = sinks[h] if has_sink else -np.inf
            den[r] = 1.0 if has_sink else 0.0
        for s0 in range(0, n_k, KEY_BLOCK):
            n = min(n_k, s0 + KEY_BLOCK) - s0
            live = False
            for s in range(s0, s0 + n):
                ks = kpos[s]
                if ks >= 0 and ks <= qmax and (window <= 0 or ks > qmin - window):
                    live = True
                    break
            if not live:
                continue
            for r in range(rows):
                h = g * group + r // tb
                t = t0 + r % tb
                qt = qpos[t]
                srow = sc[r]
                for j in range(n):
                    a = zero
                    for d in range(head_dim):
                        a += q[t, h, d] * k[s0 + j, g, d]
                    srow[j] = a
                top = -np.inf
                for j in range(n):
                    ks = kpos[s0 + j]
                    if ks >= 0 and ks <= qt and (window <= 0 or ks > qt - window):
                        x = float(srow[j]) * scale
                        if has_alibi:
                            x -= slopes[h] * float(qt - ks)
                        srow[j] = x
                        if x != x:
                            nan_row[r] = True
                        elif x > top:
                            top = x
                    else:
                        srow[j] = -np.inf
                new_m = max(m[r], top)
                if new_m == -np.inf:          # nothing visible to this row yet
                    continue
                arow = acc[r]
                if m[r] != new_m:
                    alpha = exp64(m[r] - new_m)
                    den[r] *= alpha
                    a32 = out.dtype.type(alpha)
                    for e in range(dv):
                        arow[e] *= a32
                m[r] = new_m
                total = 0.0
                for j in range(n):
                    p = exp64(float(srow[j]) - new_m)
                    srow[j] = p
                    total += p
                den[r] += total
                for j in range(n):
                    p = srow[j]
                    if p != zero:
                        for e in range(dv):
                            arow[e] += p * v[s0 + j, g, e]
        for r in range(rows):
            h = g * group + r // tb
            t = t0 + r % tb
            inv = 1.0 / den[r] if den[r] > 0 else 1.0
            for e in range(dv):
                out[t, h, e] = np.nan if nan_row[r] else acc[r, e] * inv


_flash_parallel = numba.njit(_flash_items, cache=True, fastmath=_FAST, error_model="numpy", parallel=True)
_flash_serial = numba.njit(_flash_items, cache=True, fastmath=_FAST, error_model="numpy")
SERIAL_WORK = 1 << 14      # multiply-adds below which one thread beats starting a parallel region
# (GPT-2 bf16 decode, 12 heads x ~100 keys, alternating processes, 18 runs of 64 tokens each:
# parallel from 2**14 92.6 tok/s mean against 89.1 serial up to 2**20; the spread of one run is
# larger than the difference; the parallel kernel was ahead in 5 of 6 alternating pairs)


@functools.lru_cache(maxsize=256)
def balanced_order(n_blocks: int, n_kv: int) -> np.ndarray:
    """Item indices (block-major, g fastest) ordered first, last, second, second-to-last, ... by
    block: causal blocks grow in cost with their position, and the parallel loop hands each thread
    a contiguous share of the order, so every share gets early and late blocks alike."""
    blocks = np.empty(n_blocks, np.int64)
    blocks[0::2] = np.arange((n_blocks + 1) // 2)
    blocks[1::2] = np.arange(n_blocks - 1, (n_blocks + 1) // 2 - 1, -1)
    order = (blocks[:, None] * n_kv + np.arange(n_kv)).reshape(-1)
    order.flags.writeable = False          # shared between calls (cached)
    return order


def attention_flash(q, k, v, qpos, kpos, window, sinks, slopes, scale, out):
    """q [T,H,Dh], k [S,G,Dh], v [S,G,Dv] (C-contiguous, compute dtype), positions int64 [T], [S],
    window (0 = none), sinks / slopes float64 [H] or None; writes out [T,H,Dv].

    float32 with at least ``QUERY_BLOCK`` queries (prefill) runs the SIMD tiles of
    ``_attention_tiles``; decode and float64 run :func:`_flash_items`."""
    n_q, n_heads, head_dim = q.shape
    n_k, n_kv, _ = k.shape
    q_block = QUERY_BLOCK if n_q > 1 else 1
    order = balanced_order(-(-n_q // q_block), n_kv)
    if n_q >= QUERY_BLOCK and q.dtype == np.float32:
        attention_tiles(q, k, v, qpos, kpos, window, sinks, slopes, scale, out, order, q_block)
        return
    no_vec = np.zeros(1)
    work = n_q * n_heads * n_k * (head_dim + v.shape[2])
    kernel = _flash_serial if work < SERIAL_WORK else _flash_parallel
    kernel(q, k, v, qpos, kpos, window, no_vec if sinks is None else sinks, sinks is not None,
           no_vec if slopes is None else slopes, slopes is not None, scale, order, q_block, out)
