"""linear, embedding and mxfp4_decode on numba (spec: spec/ops/linear.md, embedding.md, mxfp4.md).

The one matrix kernel, :func:`grouped_gemm`, serves ``linear`` (one group: every input row times
one weight) and ``moe_experts`` (one group per used expert: the rows routed to it). Work items are
(group, chunk of output rows); each weight byte is read once per call whatever T is: a group of one
input row uses the weight kind's fused row dot, a larger group widens eight weight rows at a time
into a [K, 8] tile in cache and reuses it for every input row of the group.
"""
from __future__ import annotations

import numba
import numpy as np

from gptevo.backends.numba import _blas, _gemm_small, _gemm_tiles, _gemv, _gemv_q8
from gptevo.backends.numba._common import (as_compute, chunk_rows, compute_dtype, jit, jit_uncached, pjit_uncached,
                                           prange, run_parallel)
from gptevo.backends.numba._weights import VALUE_TABLE, SCALE_TABLE, operand, row_mxfp4
from gptevo.ops.int8 import Int8Weight


TILE_ROWS = 8      # weight rows widened together for multi-row groups (eight accumulators per input row)
TILE_K = 256       # reduction block: partial sums are added per block, which bounds float32 error growth


@jit_uncached
def _tiled_rows(x, rows, first, last, wt, loader, e, lo, hi, bias, has_bias, out, buf, scratch, zero):
    """out[p, lo:hi] for the input rows p of one group: widen TILE_ROWS weight rows into a [K, 8]
    tile (transposed), then for each input row run eight independent sums over K (one per weight
    row), which the compiler can keep in one vector register without reassociating any sum."""
    k = x.shape[1]
    tile = np.empty((k, TILE_ROWS), out.dtype)          # [K,8] widened weight rows, transposed
    acc = np.empty(TILE_ROWS, out.dtype)                # [8] per-block totals
    for n0 in range(lo, hi, TILE_ROWS):
        nb = min(TILE_ROWS, hi - n0)
        if nb < TILE_ROWS:
            tile[:, nb:] = 0
        for l in range(nb):
            w = loader(wt, e, n0 + l, buf, scratch)     # [K]
            for j in range(k):
                tile[j, l] = w[j]
        for p in range(first, last):
            xr = x[rows[p]]                             # [K]
            acc[:] = 0
            for j0 in range(0, k, TILE_K):
                a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = zero
                for j in range(j0, min(k, j0 + TILE_K)):
                    xv = xr[j]
                    t = tile[j]
                    a0 += xv * t[0]
                    a1 += xv * t[1]
                    a2 += xv * t[2]
                    a3 += xv * t[3]
                    a4 += xv * t[4]
                    a5 += xv * t[5]
                    a6 += xv * t[6]
                    a7 += xv * t[7]
                acc[0] += a0
                acc[1] += a1
                acc[2] += a2
                acc[3] += a3
                acc[4] += a4
                acc[5] += a5
                acc[6] += a6
                acc[7] += a7
            for l in range(nb):
                out[p, n0 + l] = acc[l] + bias[e, n0 + l] if has_bias else acc[l]


@pjit_uncached
def grouped_gemm(x, rows, starts, experts, wt, loader, rowdot, bias, has_bias, out, chunk, zero):
    """out[p, n] = x[rows[p]] . W[experts[u], n] (+ bias[experts[u], n]) for p in group u.

    x: [M,K] compute dtype; rows: [P] int64 (input row of each output row p); starts: [U+1] int64
    (group u is p in starts[u]..starts[u+1]); experts: [U] int64; W given by (wt, loader, rowdot)
    with logical shape [E,N,K]; bias: [E,N] compute dtype; out: [P,N]. A group of one input row
    (decode) uses the fused row dot; larger groups widen each weight row once into a tile.
    """
    n_out = out.shape[1]
    k = x.shape[1]
    n_chunks = (n_out + chunk - 1) // chunk
    for item in prange(experts.shape[0] * n_chunks):
        u = item // n_chunks
        lo = (item % n_chunks) * chunk
        hi = min(n_out, lo + chunk)
        e = experts[u]
        first, last = starts[u], starts[u + 1]
        buf = np.empty(k, out.dtype)                    # [K] decoded row (compute dtype)
        scratch = np.empty(k, np.uint32)                # [K] f32 bits for bf16/f16 rows
        if last - first == 1:
            xr = x[rows[first]]                         # [K]
            for n in range(lo, hi):
                y = rowdot(wt, e, n, xr, buf, scratch, zero)
                out[first, n] = y + bias[e, n] if has_bias else y
        elif last > first:
            _tiled_rows(x, rows, first, last, wt, loader, e, lo, hi, bias, has_bias, out, buf, scratch, zero)


def bias_operand(bias, n_groups: int, n_out: int, dtype, what: str):
    """(bias [E,N] compute dtype, has_bias) for an optional bias of shape ``[N]`` or ``[E,N]``."""
    if bias is None:
        return np.zeros((1, 1), dtype), False
    b = np.asarray(bias)
    assert b.shape == ((n_out,) if n_groups == 0 else (n_groups, n_out)), f"{what}: unchecked shape {b.shape}"
    return np.ascontiguousarray(b.astype(dtype, copy=False).reshape(-1, n_out)), True


def linear(x, weight, bias=None):
    """``y = x @ weight.T + bias`` with the weight widened (or decoded) in the kernel, never in memory.

    One input row (decode) streams the weight through :func:`_gemv.gemv` when the weight kind has a
    streaming kernel; 2-16 float32 rows (batched decode) with float32/bf16/f16 weights go through
    the register tiles of :mod:`_gemm_tiles` (AVX-512, K % 32 == 0) or
    :func:`_gemm_small.small_rows` (each weight row read once for all rows; BLAS is slow at that
    shape); the int8 mode's marked weights take the VNNI kernel on blocks of weight rows kept in L2
    for every group of four input rows (:func:`_gemv_q8.gemv_int8_q8_rows`, each row bitwise as
    alone), other int8 weights one streamed pass per row. More rows go to BLAS split over the
    threads (:mod:`_blas`; 16-bit and int8 weights widened tile by tile); everything else takes
    :func:`grouped_gemm`.
    """
    dtype = compute_dtype(x)
    fast = _linear_fast(x, weight, bias, dtype)
    if fast is not None:
        return fast
    wt, loader, rowdot, (n_out, n_in) = operand(weight, dtype, 2, "linear weight")
    b, has_bias = bias_operand(bias, 0, n_out, dtype, "linear: bias")
    x2 = as_compute(x, dtype, "linear: x").reshape(-1, n_in)                 # [M,in]
    m = x2.shape[0]
    out = np.empty((m, n_out), dtype)                                        # [M,out]
    work = n_out * n_in * max(m, 8) // 8            # weight rows dominate at small M, products at large M
    run_parallel(grouped_gemm, work, x2, np.arange(m, dtype=np.int64), np.array([0, m], np.int64),
                 np.zeros(1, np.int64), wt, loader, rowdot, b, has_bias, out, chunk_rows(n_out), dtype.type(0))
    return out.reshape(*x.shape[:-1], n_out)                                 # [...,out]


def _linear_fast(x, weight, bias, dtype):
    """The decode / BLAS / int8 paths of :func:`linear`, or None to take the general path."""
    shape = weight.shape
    if x.size == 0 or x.dtype not in (np.float32, np.float64):
        return None
    n_out = shape[0]
    if bias is not None:
        bias = np.asarray(bias)
        if not (bias.dtype.kind == "f" or bias.dtype.name == "bfloat16"):
            return None
        bias = np.ascontiguousarray(bias.astype(dtype, copy=False))              # [out]
    lead = x.shape[:-1]
    x2 = np.ascontiguousarray(x.astype(dtype, copy=False)).reshape(-1, shape[1])  # [M,in]
    if x2.shape[0] == 1:
        y = _gemv.gemv(x2[0], weight, bias, numba.get_num_threads())              # [out]
        return None if y is None else y.reshape(*lead, n_out)
    if x2.shape[0] <= _gemm_small.MAX_ROWS:                                        # batched decode
        if _gemv._AVX512 and dtype == np.float32 and _gemm_tiles.supported(weight, x2.shape[0]):
            chunk = 4 * max(4, -(-n_out // (32 * numba.get_num_threads())))       # a multiple of 4
            return _gemm_tiles.tiles_rows(x2, weight, bias, chunk).reshape(*lead, n_out)
        y = _gemm_small.small_rows(x2, weight, bias, numba.get_num_threads())     # [M,out]
        if y is not None:
            return y.reshape(*lead, n_out)
        if (isinstance(weight, _gemv_q8.Q8Int8Weight) and dtype == np.float32 and weight.values.ndim == 2
                and weight.values.flags.c_contiguous and _gemv_q8.supported(shape[1])):
            chunk = _gemv.rows_per_chunk(n_out, numba.get_num_threads())           # one weight pass for all
            b = np.zeros(0, np.float32) if bias is None else bias                  # rows, each as the one-row kernel
            return _gemv_q8.gemv_int8_q8_rows(weight, x2, b, chunk).reshape(*lead, n_out)
        if isinstance(weight, Int8Weight) and dtype == np.float32:                 # one streamed pass per row
            rows = [_gemv.gemv(r, weight, bias, numba.get_num_threads()) for r in x2]
            if all(r is not None for r in rows):
                return np.stack(rows).reshape(*lead, n_out)                        # [...,out]
    threads = numba.get_num_threads()
    if isinstance(weight, np.ndarray) and weight.dtype == dtype:
        y = _blas.matmul_nt(x2, weight, threads, bias)                             # [M,out] BLAS
    elif isinstance(weight, Int8Weight) and dtype == np.float32:
        def fill(r0, tile):
            part = Int8Weight(weight.values[r0:r0 + len(tile)], weight.scales[r0:r0 + len(tile)], weight.name)
            tile[:] = part.decode(dtype)                                           # [rows,in]
        y = _blas.tiled_matmul_nt(x2, n_out, fill, threads, bias)                  # [M,out]
    elif isinstance(weight, np.ndarray) and dtype == np.float32 and weight.flags.c_contiguous and (
            weight.dtype.name == "bfloat16" or weight.dtype == np.float16):
        bits, is_bf16 = weight.view(np.uint16), weight.dtype.name == "bfloat16"    # [out,in]
        y = _blas.tiled_matmul_nt(x2, n_out, lambda r0, tile: _blas.widen_rows(bits, r0, tile, is_bf16),
                                  threads, bias)                                   # [M,out]
    else:
        return None
    return y.reshape(*lead, n_out)


def embedding(table, ids):
    """``out[t] = table[ids[t]]`` in the table's compute dtype (ids checked to lie in [0, V))."""
    dtype = compute_dtype(table)
    return table[ids.reshape(-1)].astype(dtype).reshape(*ids.shape, table.shape[1])   # gather, widen exactly


@jit
def _decode_all(wt, out):
    """Every row of a packed MXFP4 tensor [1,R,G,16] into out [R, 32G]."""
    for r in range(out.shape[0]):
        row_mxfp4(wt, 0, r, out[r], np.empty(0, np.uint32))


def mxfp4_decode(blocks, scales, dtype="float32"):
    """Decode packed MXFP4 exactly (same values as the reference, bit for bit; NaN for scale 255)."""
    dt = np.dtype(dtype)
    lead, groups = scales.shape[:-1], scales.shape[-1]
    n_rows = int(np.prod(lead, dtype=np.int64))
    b = np.ascontiguousarray(blocks).reshape(1, n_rows, groups, 16)          # [1,R,G,16]
    s = np.ascontiguousarray(scales).reshape(1, n_rows, groups)              # [1,R,G]
    out = np.empty((n_rows, groups * 32), dt)                                # [R,32G]
    _decode_all((b, s, VALUE_TABLE[dt], SCALE_TABLE[dt]), out)
    return out.reshape(*lead, groups * 32)
