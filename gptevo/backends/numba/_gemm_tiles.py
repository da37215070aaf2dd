"""A few input rows times a weight read once, in AVX-512 register tiles (batched decode, 2-16 rows).

Same contract as :func:`_gemm_small.small_gemm` (``out[m, n] = W[n] . x[m] (+ bias[n])``), with the
products written as explicit vectors. Weight rows go in blocks of BLOCK_ROWS; each block takes the
input rows in passes of up to eight: 5-8 rows in one pass of three weight rows x eight input rows
(24 accumulators), 1-4 rows in one of four x four (16 accumulators); a second pass (9-16 rows)
reads the block from L2. Per 32 values two weight vectors per row (float32: two loads; bfloat16:
one 64-byte load split into its even and odd elements by a shift and a mask, so the input rows are
permuted once per call to match, as in ``_moe_tiles.permute_rows``); one horizontal sum per output
at the end. Every weight stream is prefetched PREFETCH_BYTES ahead into L2 (``prefetcht1``).
K % 32 == 0; every product is of the exactly widened operands, only summation order differs
(spec/backends.md, "Numerical policy"); both passes sum each lane in the same order, so a row's
result does not depend on how many rows came with it.

Measured (GPT-2 weights, all 49 matrices, 2 threads, same-process A/B, min of 5, ms per step):
the earlier two-pass 4 x 4 form with no prefetch took 27.6 (8 rows, float32) and 22.9 (bfloat16);
one pass of 3 x 8 with ``prefetcht0`` 8 KB ahead 22.2 / 14.8; with ``prefetcht1`` 18.0 / 14.8
(the streams stop evicting the input rows from L1). Against ``_gemm_small.small_rows`` (four weight
rows x two input rows, no prefetch): 2 rows 15.4 vs 15.8 (float32), 15.4 vs 8.7 (bfloat16); 3 rows
22.4 vs 18.1, 22.2 vs 11.6; 4 rows 17.7 vs 14.1, 18.1 vs 9.8; 12 rows 39.4 vs 27.5.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from gptevo.backends.numba._moe_tiles import permute_rows
from gptevo.backends.numba._simd import (bits_to_f32, f32x16_zero, hsum, i32x16_bcast, iand, isll, load_f32x16,
                                         load_i32x16, prefetch_l2, vfma)

MIN_ROWS = 2           # from this many input rows up to _gemm_small.MAX_ROWS
BLOCK_ROWS = 48        # weight rows per block: read from memory once, from L2 by a second pass
PREFETCH_BYTES = 8192  # software prefetch distance (measured with prefetcht0: 2 KB slower, 8-16 KB best)


def _make_pass4(is_bf16: bool):
    """Weight rows [lo, hi) times the q <= 4 input rows r0.. (four weight rows x four input rows per
    step, 16 accumulators; missing input rows repeat the last one and are not stored), float32
    weights or bfloat16 bits (a compile-time constant), each weight stream prefetched into L2."""
    def pass4(w, x, bias, has_bias, lo, hi, r0, q, out):
        k = w.shape[1]
        high = i32x16_bcast(np.int32(-65536))
        bpe = 2 if is_bf16 else 4                                   # bytes per weight element
        x0 = r0 * k
        x1 = (r0 + min(1, q - 1)) * k
        x2 = (r0 + min(2, q - 1)) * k
        x3 = (r0 + min(3, q - 1)) * k
        for n0 in range(lo, hi, 4):
            m = min(4, hi - n0)
            o0 = n0 * k * bpe
            o1 = (n0 + min(1, m - 1)) * k * bpe
            o2 = (n0 + min(2, m - 1)) * k * bpe
            o3 = (n0 + min(3, m - 1)) * k * bpe
            a00 = f32x16_zero(); a01 = f32x16_zero(); a02 = f32x16_zero(); a03 = f32x16_zero()  # noqa: E702
            a10 = f32x16_zero(); a11 = f32x16_zero(); a12 = f32x16_zero(); a13 = f32x16_zero()  # noqa: E702
            a20 = f32x16_zero(); a21 = f32x16_zero(); a22 = f32x16_zero(); a23 = f32x16_zero()  # noqa: E702
            a30 = f32x16_zero(); a31 = f32x16_zero(); a32 = f32x16_zero(); a33 = f32x16_zero()  # noqa: E702
            for j in range(0, k, 32):
                for half in range(2):
                    if half == 0 or not is_bf16:           # one 64-byte line per weight row and step
                        pj = bpe * (j + 16 * half) + PREFETCH_BYTES
                        prefetch_l2(w, o0 + pj)
                        prefetch_l2(w, o1 + pj)
                        prefetch_l2(w, o2 + pj)
                        prefetch_l2(w, o3 + pj)
                    if is_bf16:
                        v0 = load_i32x16(w, o0 + 2 * j)
                        v1 = load_i32x16(w, o1 + 2 * j)
                        v2 = load_i32x16(w, o2 + 2 * j)
                        v3 = load_i32x16(w, o3 + 2 * j)
                        if half == 0:
                            w0 = bits_to_f32(isll(v0, 16)); w1 = bits_to_f32(isll(v1, 16))  # noqa: E702
                            w2 = bits_to_f32(isll(v2, 16)); w3 = bits_to_f32(isll(v3, 16))  # noqa: E702
                        else:
                            w0 = bits_to_f32(iand(v0, high)); w1 = bits_to_f32(iand(v1, high))  # noqa: E702
                            w2 = bits_to_f32(iand(v2, high)); w3 = bits_to_f32(iand(v3, high))  # noqa: E702
                    else:
                        w0 = load_f32x16(w, o0 // 4 + j + 16 * half)
                        w1 = load_f32x16(w, o1 // 4 + j + 16 * half)
                        w2 = load_f32x16(w, o2 // 4 + j + 16 * half)
                        w3 = load_f32x16(w, o3 // 4 + j + 16 * half)
                    xo = j + 16 * half
                    y = load_f32x16(x, x0 + xo)
                    a00 = vfma(w0, y, a00); a10 = vfma(w1, y, a10)        # noqa: E702
                    a20 = vfma(w2, y, a20); a30 = vfma(w3, y, a30)        # noqa: E702
                    y = load_f32x16(x, x1 + xo)
                    a01 = vfma(w0, y, a01); a11 = vfma(w1, y, a11)        # noqa: E702
                    a21 = vfma(w2, y, a21); a31 = vfma(w3, y, a31)        # noqa: E702
                    y = load_f32x16(x, x2 + xo)
                    a02 = vfma(w0, y, a02); a12 = vfma(w1, y, a12)        # noqa: E702
                    a22 = vfma(w2, y, a22); a32 = vfma(w3, y, a32)        # noqa: E702
                    y = load_f32x16(x, x3 + xo)
                    a03 = vfma(w0, y, a03); a13 = vfma(w1, y, a13)        # noqa: E702
                    a23 = vfma(w2, y, a23); a33 = vfma(w3, y, a33)        # noqa: E702
            sums = ((a00, a01, a02, a03), (a10, a11, a12, a13), (a20, a21, a22, a23), (a30, a31, a32, a33))
            for i in range(m):
                for p in range(q):
                    v = hsum(sums[i][p])
                    out[r0 + p, n0 + i] = v + bias[n0 + i] if has_bias else v
    pass4.__name__ = pass4.__qualname__ = f"pass4_{'bf16' if is_bf16 else 'f32'}"
    return numba.njit(cache=True, error_model="numpy", nogil=True)(pass4)


def _make_pass8(is_bf16: bool):
    """Weight rows [lo, hi) times the 5 <= q <= 8 input rows r0.. in one pass: three weight rows x
    eight input rows per step (24 accumulators; missing input rows repeat the last one and are not
    stored), each weight stream prefetched PREFETCH_BYTES ahead into L2. Per lane the products are summed
    in the order of :func:`_make_pass4`'s kernel, so either pass gives the same bits. (The weight
    loads and widening repeat those of the 4 x 4 kernel on purpose: a helper taking the weight array
    inside the inner loop costs a reference count per call, which halved such loops when measured.)"""
    def pass8(w, x, bias, has_bias, lo, hi, r0, q, out):
        k = w.shape[1]
        high = i32x16_bcast(np.int32(-65536))
        bpe = 2 if is_bf16 else 4
        x0 = r0 * k
        x1 = (r0 + 1) * k
        x2 = (r0 + 2) * k
        x3 = (r0 + 3) * k
        x4 = (r0 + 4) * k
        x5 = (r0 + min(5, q - 1)) * k
        x6 = (r0 + min(6, q - 1)) * k
        x7 = (r0 + min(7, q - 1)) * k
        for n0 in range(lo, hi, 3):
            m = min(3, hi - n0)
            o0 = n0 * k * bpe
            o1 = (n0 + min(1, m - 1)) * k * bpe
            o2 = (n0 + min(2, m - 1)) * k * bpe
            a0 = f32x16_zero(); a1 = f32x16_zero(); a2 = f32x16_zero(); a3 = f32x16_zero()  # noqa: E702
            a4 = f32x16_zero(); a5 = f32x16_zero(); a6 = f32x16_zero(); a7 = f32x16_zero()  # noqa: E702
            b0 = f32x16_zero(); b1 = f32x16_zero(); b2 = f32x16_zero(); b3 = f32x16_zero()  # noqa: E702
            b4 = f32x16_zero(); b5 = f32x16_zero(); b6 = f32x16_zero(); b7 = f32x16_zero()  # noqa: E702
            c0 = f32x16_zero(); c1 = f32x16_zero(); c2 = f32x16_zero(); c3 = f32x16_zero()  # noqa: E702
            c4 = f32x16_zero(); c5 = f32x16_zero(); c6 = f32x16_zero(); c7 = f32x16_zero()  # noqa: E702
            for j in range(0, k, 32):
                for half in range(2):
                    if half == 0 or not is_bf16:           # one 64-byte line per weight row and step
                        pj = bpe * (j + 16 * half) + PREFETCH_BYTES
                        prefetch_l2(w, o0 + pj)
                        prefetch_l2(w, o1 + pj)
                        prefetch_l2(w, o2 + pj)
                    if is_bf16:
                        v0 = load_i32x16(w, o0 + 2 * j)
                        v1 = load_i32x16(w, o1 + 2 * j)
                        v2 = load_i32x16(w, o2 + 2 * j)
                        if half == 0:
                            w0 = bits_to_f32(isll(v0, 16)); w1 = bits_to_f32(isll(v1, 16))  # noqa: E702
                            w2 = bits_to_f32(isll(v2, 16))
                        else:
                            w0 = bits_to_f32(iand(v0, high)); w1 = bits_to_f32(iand(v1, high))  # noqa: E702
                            w2 = bits_to_f32(iand(v2, high))
                    else:
                        w0 = load_f32x16(w, o0 // 4 + j + 16 * half)
                        w1 = load_f32x16(w, o1 // 4 + j + 16 * half)
                        w2 = load_f32x16(w, o2 // 4 + j + 16 * half)
                    xo = j + 16 * half
                    y = load_f32x16(x, x0 + xo)
                    a0 = vfma(w0, y, a0); b0 = vfma(w1, y, b0); c0 = vfma(w2, y, c0)  # noqa: E702
                    y = load_f32x16(x, x1 + xo)
                    a1 = vfma(w0, y, a1); b1 = vfma(w1, y, b1); c1 = vfma(w2, y, c1)  # noqa: E702
                    y = load_f32x16(x, x2 + xo)
                    a2 = vfma(w0, y, a2); b2 = vfma(w1, y, b2); c2 = vfma(w2, y, c2)  # noqa: E702
                    y = load_f32x16(x, x3 + xo)
                    a3 = vfma(w0, y, a3); b3 = vfma(w1, y, b3); c3 = vfma(w2, y, c3)  # noqa: E702
                    y = load_f32x16(x, x4 + xo)
                    a4 = vfma(w0, y, a4); b4 = vfma(w1, y, b4); c4 = vfma(w2, y, c4)  # noqa: E702
                    y = load_f32x16(x, x5 + xo)
                    a5 = vfma(w0, y, a5); b5 = vfma(w1, y, b5); c5 = vfma(w2, y, c5)  # noqa: E702
                    y = load_f32x16(x, x6 + xo)
                    a6 = vfma(w0, y, a6); b6 = vfma(w1, y, b6); c6 = vfma(w2, y, c6)  # noqa: E702
                    y = load_f32x16(x, x7 + xo)
                    a7 = vfma(w0, y, a7); b7 = vfma(w1, y, b7); c7 = vfma(w2, y, c7)  # noqa: E702
            sums = ((a0, a1, a2, a3, a4, a5, a6, a7), (b0, b1, b2, b3, b4, b5, b6, b7),
                    (c0, c1, c2, c3, c4, c5, c6, c7))
            for i in range(m):
                for p in range(q):
                    v = hsum(sums[i][p])
                    out[r0 + p, n0 + i] = v + bias[n0 + i] if has_bias else v
    pass8.__name__ = pass8.__qualname__ = f"pass8_{'bf16' if is_bf16 else 'f32'}"
    return numba.njit(cache=True, error_model="numpy", nogil=True)(pass8)


_PASS4_F32, _PASS4_BF16 = _make_pass4(False), _make_pass4(True)
_PASS8_F32, _PASS8_BF16 = _make_pass8(False), _make_pass8(True)


def _make_range(is_bf16: bool):
    """Weight rows [lo, hi) times every input row, for float32 weights or bfloat16 bits (a
    compile-time constant): what the parallel kernel runs per chunk, and the fused batched decode
    step per share. Blocks of BLOCK_ROWS weight rows (kept in L2) take the input rows in passes of
    up to eight (one pass for 5-8 rows: the weights stream from memory once)."""
    def rows_range(w, x, bias, has_bias, lo, hi, out):
        m_rows = x.shape[0]
        for s0 in range(lo, hi, BLOCK_ROWS):
            s1 = min(hi, s0 + BLOCK_ROWS)
            r = 0
            while r < m_rows:
                q = min(8, m_rows - r)
                if q > 4:
                    if is_bf16:
                        _PASS8_BF16(w, x, bias, has_bias, s0, s1, r, q, out)
                    else:
                        _PASS8_F32(w, x, bias, has_bias, s0, s1, r, q, out)
                elif is_bf16:
                    _PASS4_BF16(w, x, bias, has_bias, s0, s1, r, q, out)
                else:
                    _PASS4_F32(w, x, bias, has_bias, s0, s1, r, q, out)
                r += q
    rows_range.__name__ = rows_range.__qualname__ = f"tiles_rows_{'bf16' if is_bf16 else 'f32'}"
    return numba.njit(cache=True, error_model="numpy", nogil=True)(rows_range)


RANGES = {False: _make_range(False), True: _make_range(True)}
tile_rows_f32 = RANGES[False]
tile_rows_bf16 = RANGES[True]


@numba.njit(cache=True, error_model="numpy", parallel=True, nogil=True)
def _tiles_parallel(w, x, bias, out, chunk, is_bf16):
    """Chunks of weight rows over the threads, each one ``tile_rows_*`` call (the functions are named
    here: numba caches a kernel only when the jitted functions it calls are globals)."""
    n_rows = w.shape[0]
    has_bias = bias.shape[0] == n_rows
    for c in prange((n_rows + chunk - 1) // chunk):
        lo, hi = c * chunk, min(n_rows, (c + 1) * chunk)
        if is_bf16:
            tile_rows_bf16(w, x, bias, has_bias, lo, hi, out)
        else:
            tile_rows_f32(w, x, bias, has_bias, lo, hi, out)


def supported(weight, m_rows: int) -> bool:
    """Whether :func:`tiles_rows` takes this weight and row count (AVX-512 checked by the caller)."""
    return (isinstance(weight, np.ndarray) and weight.ndim == 2 and weight.flags.c_contiguous
            and weight.shape[1] % 32 == 0 and m_rows >= MIN_ROWS
            and (weight.dtype == np.float32 or weight.dtype.name == "bfloat16"))


def tiles_rows(x2, weight, bias, chunk):
    """out [M,N] = x2 [M,K] float32 @ weight.T (+ bias [N] float32) for a weight :func:`supported`."""
    is_bf16 = weight.dtype.name == "bfloat16"
    w = weight.view(np.uint16) if is_bf16 else weight
    xs = permute_rows(x2) if is_bf16 else np.ascontiguousarray(x2)            # [M,K]
    out = np.empty((x2.shape[0], weight.shape[0]), np.float32)                # [M,N]
    _tiles_parallel(w, xs, np.zeros(0, np.float32) if bias is None else bias, out, chunk, is_bf16)
    return out
