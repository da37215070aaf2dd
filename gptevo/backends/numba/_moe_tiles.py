"""Grouped MXFP4 expert GEMM with explicit AVX-512 tiles (the many-row path of ``_moe_grouped``).

For one expert and the g input rows routed to it: four weight rows at a time are decoded (exact:
the 16-entry e2m1 table times the block's power of two, looked up with ``vpermps``, two stores
per 32-value block) into a per-thread buffer, then multiplied by the input rows four at a time:
16 vector accumulators (4 weight rows x 4 input rows), per 16 values four weight loads, four
input loads and 16 FMAs, one horizontal sum per output at the end. The earlier kernel decoded
with scalar table lookups and multiplied one input row at a time (5 loads per 4 FMAs).

The decoded row keeps each 32-value block as its 16 even elements then its 16 odd ones (what the
two lookups give); the input rows are permuted the same way once per call (:func:`permute_rows`),
so every product is the reference's ``value * 2**(scale - 127) * x`` and only the summation order
differs (spec/backends.md, "Numerical policy"). AVX-512 hosts only; ``_moe_grouped`` keeps the
portable kernel for the others.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from gptevo.backends.numba._mxfp4_gemv import PREFETCH_BYTES, kjit, kpjit
from gptevo.backends.numba._simd import (f32x16_bcast, f32x16_zero, hsum, isrl, load_f32x16, load_u8x16_zext,
                                         permps, prefetch, store_f32x16, vadd, vfma, vmul)


def permute_rows(x: np.ndarray) -> np.ndarray:
    """x [g,K] (K % 32 == 0) -> per 32-value block its even elements, then its odd ones."""
    g, k = x.shape
    return np.ascontiguousarray(x.reshape(g, k // 32, 16, 2).transpose(0, 1, 3, 2).reshape(g, k))


@kjit
def _decode_row(blocks, boff, sflat, soff, n_blocks, table, powers, dst, doff):
    """dst[doff : doff + 32 n_blocks] = the decoded row at byte offset boff / scale offset soff, in
    the even-then-odd order of :func:`permute_rows`."""
    t = load_f32x16(table, 0)
    for b in range(n_blocks):
        ts = vmul(t, f32x16_bcast(powers[sflat[soff + b]]))    # the block's 16 decoded values
        idx = load_u8x16_zext(blocks, boff + 16 * b)                   # 16 bytes -> 16 dwords
        store_f32x16(dst, doff + 32 * b, permps(ts, idx))              # low nibbles: elements 2j
        store_f32x16(dst, doff + 32 * b + 16, permps(ts, isrl(idx, 4)))  # high nibbles: 2j + 1


@kjit
def _biased(y, bias, e, n, has_bias):
    """y + bias[e, n] when the weight has a bias."""
    return y + bias[e, n] if has_bias else y


@kjit
def tiles_rows(blocks, sflat, e, n_out, n_blocks, xp, xoff, g, table, powers, out, orow, lo, hi, buf, bias, has_bias):
    """out[orow + r, n] = decode(W[e, n]) . xp-row r (+ bias[e, n]) for the g input rows starting at
    flat offset ``xoff`` of xp (rows of K = 32 n_blocks values, permuted by :func:`permute_rows`) and
    the weight rows ``lo <= n < hi`` of expert e; blocks [E,N,K/32,16] and ``sflat`` (scales, 1-D)
    C-contiguous; buf float32 [4K] scratch; bias [E,N] (read when has_bias)."""
    k = 32 * n_blocks
    for n0 in range(lo, hi, 4):
        m = min(4, hi - n0)
        for i in range(m):
            row = e * n_out + n0 + i
            _decode_row(blocks, row * n_blocks * 16, sflat, row * n_blocks, n_blocks, table, powers, buf, i * k)
        r = 0
        while r + 4 <= g:
            a00 = f32x16_zero(); a01 = f32x16_zero(); a02 = f32x16_zero(); a03 = f32x16_zero()  # noqa: E702
            a10 = f32x16_zero(); a11 = f32x16_zero(); a12 = f32x16_zero(); a13 = f32x16_zero()  # noqa: E702
            a20 = f32x16_zero(); a21 = f32x16_zero(); a22 = f32x16_zero(); a23 = f32x16_zero()  # noqa: E702
            a30 = f32x16_zero(); a31 = f32x16_zero(); a32 = f32x16_zero(); a33 = f32x16_zero()  # noqa: E702
            xo = xoff + r * k
            for j in range(0, k, 16):
                w0 = load_f32x16(buf, j)
                w1 = load_f32x16(buf, k + j)
                w2 = load_f32x16(buf, 2 * k + j)
                w3 = load_f32x16(buf, 3 * k + j)
                x0 = load_f32x16(xp, xo + j)
                x1 = load_f32x16(xp, xo + k + j)
                x2 = load_f32x16(xp, xo + 2 * k + j)
                x3 = load_f32x16(xp, xo + 3 * k + j)
                a00 = vfma(w0, x0, a00); a01 = vfma(w0, x1, a01); a02 = vfma(w0, x2, a02)  # noqa: E702
                a03 = vfma(w0, x3, a03); a10 = vfma(w1, x0, a10); a11 = vfma(w1, x1, a11)  # noqa: E702
                a12 = vfma(w1, x2, a12); a13 = vfma(w1, x3, a13); a20 = vfma(w2, x0, a20)  # noqa: E702
                a21 = vfma(w2, x1, a21); a22 = vfma(w2, x2, a22); a23 = vfma(w2, x3, a23)  # noqa: E702
                a30 = vfma(w3, x0, a30); a31 = vfma(w3, x1, a31); a32 = vfma(w3, x2, a32)  # noqa: E702
                a33 = vfma(w3, x3, a33)
            out[orow + r, n0] = _biased(hsum(a00), bias, e, n0, has_bias)
            out[orow + r + 1, n0] = _biased(hsum(a01), bias, e, n0, has_bias)
            out[orow + r + 2, n0] = _biased(hsum(a02), bias, e, n0, has_bias)
            out[orow + r + 3, n0] = _biased(hsum(a03), bias, e, n0, has_bias)
            if m > 1:
                out[orow + r, n0 + 1] = _biased(hsum(a10), bias, e, n0 + 1, has_bias)
                out[orow + r + 1, n0 + 1] = _biased(hsum(a11), bias, e, n0 + 1, has_bias)
                out[orow + r + 2, n0 + 1] = _biased(hsum(a12), bias, e, n0 + 1, has_bias)
                out[orow + r + 3, n0 + 1] = _biased(hsum(a13), bias, e, n0 + 1, has_bias)
            if m > 2:
                out[orow + r, n0 + 2] = _biased(hsum(a20), bias, e, n0 + 2, has_bias)
                out[orow + r + 1, n0 + 2] = _biased(hsum(a21), bias, e, n0 + 2, has_bias)
                out[orow + r + 2, n0 + 2] = _biased(hsum(a22), bias, e, n0 + 2, has_bias)
                out[orow + r + 3, n0 + 2] = _biased(hsum(a23), bias, e, n0 + 2, has_bias)
            if m > 3:
                out[orow + r, n0 + 3] = _biased(hsum(a30), bias, e, n0 + 3, has_bias)
                out[orow + r + 1, n0 + 3] = _biased(hsum(a31), bias, e, n0 + 3, has_bias)
                out[orow + r + 2, n0 + 3] = _biased(hsum(a32), bias, e, n0 + 3, has_bias)
                out[orow + r + 3, n0 + 3] = _biased(hsum(a33), bias, e, n0 + 3, has_bias)
            r += 4
        while r < g:                                                  # the last g % 4 input rows
            a0 = f32x16_zero(); a1 = f32x16_zero(); a2 = f32x16_zero(); a3 = f32x16_zero()  # noqa: E702
            xo = xoff + r * k
            for j in range(0, k, 16):
                x0 = load_f32x16(xp, xo + j)
                a0 = vfma(load_f32x16(buf, j), x0, a0)
                a1 = vfma(load_f32x16(buf, k + j), x0, a1)
                a2 = vfma(load_f32x16(buf, 2 * k + j), x0, a2)
                a3 = vfma(load_f32x16(buf, 3 * k + j), x0, a3)
            out[orow + r, n0] = _biased(hsum(a0), bias, e, n0, has_bias)
            if m > 1:
                out[orow + r, n0 + 1] = _biased(hsum(a1), bias, e, n0 + 1, has_bias)
            if m > 2:
                out[orow + r, n0 + 2] = _biased(hsum(a2), bias, e, n0 + 2, has_bias)
            if m > 3:
                out[orow + r, n0 + 3] = _biased(hsum(a3), bias, e, n0 + 3, has_bias)
            r += 1


@kpjit
def expert_tiles_gemm(blocks, scales, e, xp, table, powers, out, chunk):
    """out[r, n] = decode(W[e, n]) . x[r] for xp [g,K] (rows permuted by :func:`permute_rows`) and
    every weight row n of expert e; blocks [E,N,K/32,16] uint8, scales [E,N,K/32] uint8 (both
    C-contiguous); out [g,N] float32; parallel over chunks of ``chunk`` weight rows (a multiple of 4)."""
    n_out, n_blocks = scales.shape[1], scales.shape[2]
    sflat = scales.reshape(-1)             # 1-D indexing (``.flat[i]`` of a 3-D array is far slower)
    no_bias = np.zeros((1, 1), np.float32)
    for c in prange((n_out + chunk - 1) // chunk):
        buf = np.zeros(4 * 32 * n_blocks, np.float32)                     # [4*K] decoded rows
        tiles_rows(blocks, sflat, e, n_out, n_blocks, xp, 0, xp.shape[0], table, powers, out, 0, c * chunk,
                   min(n_out, (c + 1) * chunk), buf, no_bias, False)


def _make_stream_rows(g: int):
    """:func:`stream_rows` for exactly ``g`` rows (a compile-time constant, so each variant keeps
    only its own accumulators and loads)."""
    def body(blocks, sflat, e, n_out, n_blocks, xp, xoff, table, powers, out, orow, lo, hi, bias, has_bias):
        k = 32 * n_blocks
        t = load_f32x16(table, 0)
        for n in range(lo, hi):
            row = e * n_out + n
            boff = row * n_blocks * 16
            soff = row * n_blocks
            a0 = f32x16_zero(); b0 = f32x16_zero(); a1 = f32x16_zero(); b1 = f32x16_zero()  # noqa: E702
            a2 = f32x16_zero(); b2 = f32x16_zero(); a3 = f32x16_zero(); b3 = f32x16_zero()  # noqa: E702
            for b in range(n_blocks):
                if b % 4 == 0:
                    prefetch(blocks, boff + 16 * b + PREFETCH_BYTES)
                ts = vmul(t, f32x16_bcast(powers[sflat[soff + b]]))
                idx = load_u8x16_zext(blocks, boff + 16 * b)
                lo_v = permps(ts, idx)                                  # elements 2j
                hi_v = permps(ts, isrl(idx, 4))                         # elements 2j + 1
                xb = xoff + 32 * b
                a0 = vfma(lo_v, load_f32x16(xp, xb), a0)
                b0 = vfma(hi_v, load_f32x16(xp, xb + 16), b0)
                if g > 1:
                    a1 = vfma(lo_v, load_f32x16(xp, k + xb), a1)
                    b1 = vfma(hi_v, load_f32x16(xp, k + xb + 16), b1)
                if g > 2:
                    a2 = vfma(lo_v, load_f32x16(xp, 2 * k + xb), a2)
                    b2 = vfma(hi_v, load_f32x16(xp, 2 * k + xb + 16), b2)
                if g > 3:
                    a3 = vfma(lo_v, load_f32x16(xp, 3 * k + xb), a3)
                    b3 = vfma(hi_v, load_f32x16(xp, 3 * k + xb + 16), b3)
            out[orow, n] = _biased(hsum(vadd(a0, b0)), bias, e, n, has_bias)
            if g > 1:
                out[orow + 1, n] = _biased(hsum(vadd(a1, b1)), bias, e, n, has_bias)
            if g > 2:
                out[orow + 2, n] = _biased(hsum(vadd(a2, b2)), bias, e, n, has_bias)
            if g > 3:
                out[orow + 3, n] = _biased(hsum(vadd(a3, b3)), bias, e, n, has_bias)
    body.__name__ = body.__qualname__ = f"stream_rows_{g}"
    return kjit(body)


_STREAM_1, _STREAM_2, _STREAM_3, _STREAM_4 = (_make_stream_rows(g) for g in (1, 2, 3, 4))


@kjit
def stream_rows(blocks, sflat, e, n_out, n_blocks, xp, xoff, g, table, powers, out, orow, lo, hi, bias, has_bias):
    """As :func:`tiles_rows` for g = 1..4 input rows, without the buffer: each block decoded once
    in registers (two ``vpermps``) and multiplied by every row, so 2-3 rows of one expert cost about
    one streamed pass instead of one pass each (small groups in batched decode)."""
    if g == 1:
        _STREAM_1(blocks, sflat, e, n_out, n_blocks, xp, xoff, table, powers, out, orow, lo, hi, bias, has_bias)
    elif g == 2:
        _STREAM_2(blocks, sflat, e, n_out, n_blocks, xp, xoff, table, powers, out, orow, lo, hi, bias, has_bias)
    elif g == 3:
        _STREAM_3(blocks, sflat, e, n_out, n_blocks, xp, xoff, table, powers, out, orow, lo, hi, bias, has_bias)
    else:
        _STREAM_4(blocks, sflat, e, n_out, n_blocks, xp, xoff, table, powers, out, orow, lo, hi, bias, has_bias)


@kpjit
def expert_rows_stream(blocks, scales, e, xp, table, powers, out, chunk):
    """out[r, n] = decode(W[e, n]) . x[r] for the 1-4 rows of xp [g,K] (permuted by
    :func:`permute_rows`), parallel over chunks of ``chunk`` weight rows (:func:`stream_rows`)."""
    n_out, n_blocks = scales.shape[1], scales.shape[2]
    sflat = scales.reshape(-1)
    no_bias = np.zeros((1, 1), np.float32)
    for c in prange((n_out + chunk - 1) // chunk):
        stream_rows(blocks, sflat, e, n_out, n_blocks, xp, 0, xp.shape[0], table, powers, out, 0, c * chunk,
                    min(n_out, (c + 1) * chunk), no_bias, False)
