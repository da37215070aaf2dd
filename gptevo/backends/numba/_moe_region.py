"""One MoE half (gate_up or down) for several tokens with MXFP4 experts, in one parallel region.

The pairs (token, slot) are sorted by expert (``starts`` delimits each expert's group). The work
items are (group, chunk of at least 256 weight rows); the threads take them from a shared counter, so a group of
eight rows and a group of one, or a fast thread and a slow one, balance by themselves. Per item:

- exact mode: a group of 1-3 rows streams the chunk once for all its rows
  (``_moe_tiles.stream_rows``: each block decoded in registers), a group of 4 or more decodes four
  weight rows at a time into a per-thread buffer and multiplies them by the rows in 4 x 4 register
  tiles (``_moe_tiles.tiles_rows``); every product is the reference's ``value * 2**(s-127) * x``;
- int8 mode (weights prepared as int8, K >= 128): every row of the group through the int8 row dot
  of ``_mxfp4_gemv`` (the same products as one token alone), the weight row read from L1 after the
  first.

Before this, each expert group was one or two parallel calls (21 experts and 2 halves per layer
at 8 sequences: about a thousand calls per step, each with its fork/join and Python glue); now
there are two per layer. The result is the same as before up to summation order within a row
(exact) and bit for bit the int8 rows of a single token (int8).
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from gptevo.backends.numba import _moe_tiles
from gptevo.backends.numba._atomics import atomic_add
from gptevo.backends.numba._moe_tiles import stream_rows, tiles_rows
from gptevo.backends.numba._mxfp4_gemv import (INT8_CONST, POWERS_F32, VALUES_F32, _quantize_rows, _row_int8,
                                               default_variant, kjit, kpjit)

TILE_MIN_ROWS = 4        # rows per expert group from which a decoded-row buffer and register tiles pay
MIN_ROWS_PER_ITEM = 256  # weight rows per work item at least (measured: 32 rows cost 10-20 %, see _item_rows)


@kjit
def _int8_rows(blocks, scales, e, n_out, n_blocks, xqe, xqo, xsl, corr, xsb, p0, g, out, lo, hi, bias, has_bias,
               const, vnni):
    """out[p0 + r, n] for the g int8-quantized rows p0.. of the group and weight rows lo..hi."""
    for n in range(lo, hi):
        row = e * n_out + n
        for r in range(g):
            y = _row_int8(blocks, row * n_blocks * 16, scales, row * n_blocks, xqe, xqo, xsl, corr, xsb, p0 + r,
                          n_blocks, const, vnni)
            out[p0 + r, n] = y + bias[e, n] if has_bias else y


@kjit
def half_items(blocks, scales, sflat, n_out, n_blocks, experts, starts, n_groups, xp, xqe, xqo, xsl, corr, xsb, int8,
               vnni, out, bias, has_bias, table, powers, const, rows_per_item, buf, work, slot):
    """One thread's share of a half: items (group u < n_groups, chunk of ``rows_per_item`` weight rows)
    taken from the counter ``work[slot]`` until none is left. Per item, out[p, n] = decode(W[experts[u],
    n]) . x[p] (+ bias) for the pairs p of group u: int8 rows, or (exact) groups of fewer than
    TILE_MIN_ROWS pairs streamed and larger ones tiled through ``buf`` [4K]. ``sflat`` is ``scales``
    flattened (both may be 1-D views of the stored arrays)."""
    k = 32 * n_blocks
    n_chunks = (n_out + rows_per_item - 1) // rows_per_item
    n_items = n_groups * n_chunks
    while True:
        i = atomic_add(work, slot, 1)
        if i >= n_items:
            break
        u = i // n_chunks
        lo = (i % n_chunks) * rows_per_item
        hi = min(n_out, lo + rows_per_item)
        e = experts[u]
        p0 = starts[u]
        g = starts[u + 1] - p0
        if int8:
            _int8_rows(blocks, scales, e, n_out, n_blocks, xqe, xqo, xsl, corr, xsb, p0, g, out, lo, hi, bias,
                       has_bias, const, vnni)
        elif g < TILE_MIN_ROWS:
            stream_rows(blocks, sflat, e, n_out, n_blocks, xp, p0 * k, g, table, powers, out, p0, lo, hi, bias,
                        has_bias)
        else:
            tiles_rows(blocks, sflat, e, n_out, n_blocks, xp, p0 * k, g, table, powers, out, p0, lo, hi, buf, bias,
                       has_bias)


@kpjit
def _half(blocks, scales, experts, starts, xp, xqe, xqo, xsl, corr, xsb, int8, vnni, out, bias, has_bias, table,
          powers, const, chunk, work, n_threads):
    """out[p, n] = decode(W[experts[u], n]) . x[p] (+ bias) for every pair p of group u (sorted order);
    xp [P,K] the rows permuted by ``_moe_tiles.permute_rows`` (exact) or xqe/xqo/xsl/corr/xsb the
    int8 layout of ``_mxfp4_gemv._quantize_rows`` (int8); work int64 [1] zeroed: the item counter.
    Each thread runs :func:`half_items` (the batched fused gpt-oss step calls it too)."""
    n_out, n_blocks = scales.shape[1], scales.shape[2]
    sflat = scales.reshape(-1)
    for _ in prange(n_threads):
        buf = np.empty(4 * 32 * n_blocks, np.float32)                    # [4*K] decoded weight rows
        half_items(blocks, scales, sflat, n_out, n_blocks, experts, starts, experts.shape[0], xp, xqe, xqo, xsl, corr,
                   xsb, int8, vnni, out, bias, has_bias, table, powers, const, chunk, buf, work, 0)


@kjit
def item_rows(n_out, n_groups, n_threads, min_rows):
    """Weight rows per work item: about 8 items per thread over all groups, at least ``min_rows``
    (each item is one contiguous stream: with 32-row items the two threads took alternate 46 KB
    pieces of each expert and the int8 half of a 20b layer at 8 tokens took 19.5 ms against 16.2
    with 256 rows), at most one expert's rows; a multiple of 4 (the tiles). Also called inside the
    batched fused gpt-oss step, where the group count is known only after routing."""
    rows = -(-n_out * n_groups // (8 * max(1, n_threads)))
    rows = min(n_out, max(min_rows, rows))
    return max(4, -(-rows // 4) * 4)


def _item_rows(n_out: int, n_groups: int, n_threads: int) -> int:
    """:func:`item_rows` with this module's MIN_ROWS_PER_ITEM."""
    return int(item_rows(n_out, n_groups, n_threads, MIN_ROWS_PER_ITEM))


def grouped_half(weight, experts, starts, x, bias, out, mode="exact"):
    """out [P,N] = the MXFP4 expert product of every pair: rows ``starts[u]:starts[u+1]`` of x [P,K]
    (float32, pairs sorted by expert) times expert ``experts[u]`` of ``weight`` (blocks [E,N,K/32,16],
    scales [E,N,K/32], C-contiguous) plus ``bias[experts[u]]`` (bias [E,N] float32 or None).

    mode "exact" (the reference's products) or "int8" (activations quantized per 32 values, as the
    single-token int8 kernels; K < 128 or a host without AVX-512 BW falls back to exact). AVX-512
    hosts only (``_moe_grouped`` keeps the portable kernel for the others).
    """
    blocks, scales = weight.blocks, weight.scales
    n_blocks = scales.shape[2]
    has_bias = bias is not None
    b = bias if has_bias else np.zeros((1, 1), np.float32)
    variant = default_variant("int8")
    int8 = mode == "int8" and n_blocks >= 4 and variant in ("avx512-vnni", "avx512-bw")
    if int8:
        n_groups = (n_blocks + 3) // 4
        p = x.shape[0]
        xqe = np.empty((p, 64 * n_groups), np.int8)                       # [P, 64 groups]
        xqo = np.empty((p, 64 * n_groups), np.int8)
        xsl = np.empty((p, 16 * n_groups), np.float32)                    # [P, 16 groups]
        corr = np.empty((p, 16 * n_groups), np.int32)
        xsb = np.empty((p, n_blocks), np.float32)                         # [P, K/32]
        _quantize_rows(x, n_blocks, xqe, xqo, xsl, corr, xsb)
        xp = np.zeros(16, np.float32)
    else:
        xp = _moe_tiles.permute_rows(x).reshape(-1)                       # [P*K]
        xqe = xqo = np.zeros((1, 64), np.int8)
        xsl = np.zeros((1, 16), np.float32)
        xsb = np.zeros((1, 16), np.float32)
        corr = np.zeros((1, 16), np.int32)
    work = np.zeros(1, np.int64)
    n_threads = numba.get_num_threads()
    rows = _item_rows(scales.shape[1], len(experts), n_threads)
    _half(blocks, scales, experts, starts, xp, xqe, xqo, xsl, corr, xsb, int8, variant == "avx512-vnni",
          out, b, has_bias, VALUES_F32, POWERS_F32, INT8_CONST, rows, work, n_threads)
    return out
