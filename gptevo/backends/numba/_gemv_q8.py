"""int8-weight GEMV with int8 activations (AVX-512 VNNI): the decode kernel of the 8-bit mode.

``out[n] = sum_b s[n, b] * xs[b] * sum_{j<32} q[n, 32b + j] * xq[32b + j]  (+ bias[n])``

where ``q``/``s`` are an ``Int8Weight``'s values and scales and ``xq``/``xs`` the input row quantized
once per call by :func:`quantize_row`, per 32-value block as the weights are (``xs[b] = max|x| / 127``,
``xq = round_half_even(x / xs[b])``): the dot product of llama.cpp's Q8_0 x Q8_0 path. Integer dot
products (``vpdpbusd``: unsigned x signed bytes, so the weights are flipped to ``q + 128`` with one
xor and ``128 * sum(xq in block)`` is taken back out per block) run four times fewer vector
instructions per weight byte than widening every int8 weight to float32, which on this class of
CPU (two cores, 512-bit vectors executed as two halves) was what limited the float-activation
kernel to about 10 GB/s per core.

Layout of one row's work, per 16 blocks (eight 64-byte vectors, two blocks each): the 16 combined
scales ``s[n, b] * xs[b]`` are formed with one vector multiply, each vector's 16 int32 lane sums
(lanes 0-7: its first block, 8-15: its second) are converted to float and multiplied by their
block's scale picked with one ``vpermps``; the offset correction is one FMA per 16 blocks. Rows
whose block count is not a multiple of 16 finish with the window of their last 16 blocks.

Numerics: approximate, like the MXFP4 int8 kernel (spec/backends.md, "MXFP4 decode kernels"):
the activation rounding adds at most ``xs[b] / 2`` per value; tests bound the error by
``sum_k |W'[n, k]| * xs[b(k)] / 2`` plus float32 rounding. Needs K % 64 == 0 and K >= 512;
:func:`supported` says when this kernel applies.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from gptevo.backends.numba._fused_rows import Q8_FLIP, rows_q8
from gptevo.backends.numba._simd import (
    dpbusd_x86, f16_to_f32, f32x16_zero, has_vnni, hsum, i32_to_f32, i32x16_bcast, i32x16_zero, ixor,
    load_f16x16_f32, load_f32x16, load_i32x16, permps, vadd, vfma, vmul,
)
from gptevo.ops.int8 import Int8Weight

_OPTS = dict(cache=True, fastmath=False, error_model="numpy", nogil=True)
_FLIP = Q8_FLIP                        # 0x80808080: xor turns int8 q into unsigned q + 128
# Lane picks: vector p of a 16-block window holds blocks 2p (lanes 0-7) and 2p+1 (lanes 8-15).
PICK = np.array([[2 * p + (lane >= 8) for lane in range(16)] for p in range(8)], np.int32)   # [8,16]


def supported(k: int) -> bool:
    """True when this host and a row length of ``k`` can use :func:`gemv_q8`."""
    return has_vnni() and k % 64 == 0 and k >= 512


@numba.njit(**_OPTS)
def quantize_row(x, xq, xs, corr):
    """x [K] float32 -> xq [K] int8, xs [K/32] float32 (block scale), corr [K/32] float32
    (128 * sum of the block's xq: the offset the flipped weights add, before scaling)."""
    for b in range(xs.shape[0]):
        amax = np.float32(0)
        for j in range(32):
            amax = max(amax, abs(x[32 * b + j]))
        d = amax / np.float32(127)
        inv = np.float32(1) / d if d > 0 else np.float32(0)
        s = 0
        for j in range(32):
            v = int(np.round(x[32 * b + j] * inv))
            xq[32 * b + j] = v
            s += v
        xs[b] = d
        corr[b] = np.float32(128 * s)


@numba.njit(parallel=True, **_OPTS)
def gemv_q8(q, scales, xq, xs, corr, bias, out, chunk, pick):
    """q [N,K] int8, scales [N,K/32] float16 as uint16 bits (C-contiguous); xq/xs/corr from quantize_row;
    bias [N] or [0]; out [N] float32; pick = PICK. Each chunk of rows is ``_fused_rows.rows_q8``
    (the fused decode step calls the same function on its share, so both give the same bits)."""
    n_rows = q.shape[0]
    has_bias = bias.shape[0] == n_rows
    for c in prange((n_rows + chunk - 1) // chunk):
        rows_q8(q, scales, xq, xs, corr, bias, has_bias, c * chunk, min(n_rows, (c + 1) * chunk), out, pick)


BLOCK_ROWS = 48        # weight rows (about 140 KB at K = 2880) kept in L2 while every group of 4 input rows passes


@numba.njit(**_OPTS)
def _rows_q8_four(q, scales, xq, xs, corr, bias, has_bias, lo, hi, r0, n_in, out, pick):
    """out[r0 + r, n] for the input rows r0 .. r0 + n_in - 1 (1 <= n_in <= 4) and weight rows
    [lo, hi). Each weight vector is loaded and flipped once for all rows; every row's operations
    are exactly those of :func:`gemv_q8` in the same order, so each output row is bitwise what the
    one-row kernel gives (batched == single). Missing rows (n_in < 4) repeat the last one and are
    not stored."""
    k = q.shape[1]
    nb = k // 32
    n_sb = nb // 16
    flip = i32x16_bcast(_FLIP)
    ra = r0
    r1, r2, r3 = r0 + min(1, n_in - 1), r0 + min(2, n_in - 1), r0 + min(3, n_in - 1)
    for n in range(lo, hi):
        base = n * k
        sbase = n * nb
        a0 = f32x16_zero(); a1 = f32x16_zero(); ac = f32x16_zero()      # noqa: E702
        b0 = f32x16_zero(); b1 = f32x16_zero(); bc = f32x16_zero()      # noqa: E702
        e0 = f32x16_zero(); e1 = f32x16_zero(); ec = f32x16_zero()      # noqa: E702
        f0 = f32x16_zero(); f1 = f32x16_zero(); fc = f32x16_zero()      # noqa: E702
        for sb in range(n_sb):
            b_0 = 16 * sb
            s16 = load_f16x16_f32(scales, sbase + b_0)
            ca = vmul(s16, load_f32x16(xs, ra * nb + b_0))
            cb = vmul(s16, load_f32x16(xs, r1 * nb + b_0))
            ce = vmul(s16, load_f32x16(xs, r2 * nb + b_0))
            cf = vmul(s16, load_f32x16(xs, r3 * nb + b_0))
            ac = vfma(ca, load_f32x16(corr, ra * nb + b_0), ac)
            bc = vfma(cb, load_f32x16(corr, r1 * nb + b_0), bc)
            ec = vfma(ce, load_f32x16(corr, r2 * nb + b_0), ec)
            fc = vfma(cf, load_f32x16(corr, r3 * nb + b_0), fc)
            for p in range(0, 8, 2):
                o = 32 * (b_0 + 2 * p)
                w0 = ixor(load_i32x16(q, base + o), flip)
                w1 = ixor(load_i32x16(q, base + o + 64), flip)
                k0 = load_i32x16(pick, 64 * p)
                k1 = load_i32x16(pick, 64 * p + 64)
                a0 = vfma(i32_to_f32(dpbusd_x86(i32x16_zero(), w0, load_i32x16(xq, ra * k + o))), permps(ca, k0), a0)
                a1 = vfma(i32_to_f32(dpbusd_x86(i32x16_zero(), w1, load_i32x16(xq, ra * k + o + 64))),
                          permps(ca, k1), a1)
                b0 = vfma(i32_to_f32(dpbusd_x86(i32x16_zero(), w0, load_i32x16(xq, r1 * k + o))), permps(cb, k0), b0)
                b1 = vfma(i32_to_f32(dpbusd_x86(i32x16_zero(), w1, load_i32x16(xq, r1 * k + o + 64))),
                          permps(cb, k1), b1)
                e0 = vfma(i32_to_f32(dpbusd_x86(i32x16_zero(), w0, load_i32x16(xq, r2 * k + o))), permps(ce, k0), e0)
                e1 = vfma(i32_to_f32(dpbusd_x86(i32x16_zero(), w1, load_i32x16(xq, r2 * k + o + 64))),
                          permps(ce, k1), e1)
                f0 = vfma(i32_to_f32(dpbusd_x86(i32x16_zero(), w0, load_i32x16(xq, r3 * k + o))), permps(cf, k0), f0)
                f1 = vfma(i32_to_f32(dpbusd_x86(i32x16_zero(), w1, load_i32x16(xq, r3 * k + o + 64))),
                          permps(cf, k1), f1)
        accs = ((a0, a1, ac), (b0, b1, bc), (e0, e1, ec), (f0, f1, fc))
        for r in range(n_in):
            acc0, acc1, accc = accs[r]
            row = r0 + r
            tail = np.float32(0)
            t0 = 16 * n_sb
            if t0 < nb:                       # as gemv_q8: the last nb % 16 blocks, window nb-16..nb
                w_0 = nb - 16
                c16 = vmul(load_f16x16_f32(scales, sbase + w_0), load_f32x16(xs, row * nb + w_0))
                for b in range(t0, nb, 2):
                    o = 32 * b
                    d0 = dpbusd_x86(i32x16_zero(), ixor(load_i32x16(q, base + o), flip), load_i32x16(xq, row * k + o))
                    acc0 = vfma(i32_to_f32(d0), permps(c16, load_i32x16(pick, 32 * (b - w_0))), acc0)
                for b in range(t0, nb):
                    tail += f16_to_f32(scales[n, b]) * xs[row, b] * corr[row, b]
            y = hsum(vadd(acc0, acc1)) - hsum(accc) - tail
            out[row, n] = y + bias[n] if has_bias else y


@numba.njit(**_OPTS)
def rows_q8_multi(q, scales, xq, xs, corr, bias, has_bias, lo, hi, out, pick):
    """out[r, n] for every input row r of xq [R,K] (xs / corr [R,K/32] from :func:`quantize_row` per
    row) and the weight rows [lo, hi): blocks of BLOCK_ROWS weight rows, each read by every group
    of four input rows (the first group streams the block from memory, the next ones read L2).
    Every output is bitwise what :func:`gemv_q8` gives for that row alone."""
    n_in = xq.shape[0]
    for s0 in range(lo, hi, BLOCK_ROWS):
        s1 = min(hi, s0 + BLOCK_ROWS)
        for r0 in range(0, n_in, 4):
            _rows_q8_four(q, scales, xq, xs, corr, bias, has_bias, s0, s1, r0, min(4, n_in - r0), out, pick)


@numba.njit(parallel=True, **_OPTS)
def gemv_q8_rows(q, scales, xq, xs, corr, bias, out, chunk, pick):
    """:func:`gemv_q8` for several input rows at once (batched decode, short prefill): xq [R,K],
    xs / corr [R,K/32] from :func:`quantize_row` per row, out [R,N]; chunks of weight rows over the
    threads, each :func:`rows_q8_multi` (the batched fused gpt-oss step calls it on its share)."""
    n_rows = q.shape[0]
    has_bias = bias.shape[0] == n_rows
    for c in prange((n_rows + chunk - 1) // chunk):
        rows_q8_multi(q, scales, xq, xs, corr, bias, has_bias, c * chunk, min(n_rows, (c + 1) * chunk), out, pick)


def gemv_int8_q8_rows(weight, x, bias, chunk):
    """out [M,N] = the Int8Weight ``weight`` times each float32 row of x [M,K], every row exactly as
    :func:`gemv_int8_q8` computes it alone; one weight pass (from memory) for all rows."""
    m, k = x.shape
    nb = k // 32
    xq = np.empty((m, k), np.int8)                 # [M,K]
    xs = np.empty((m, nb), np.float32)             # [M,K/32]
    corr = np.empty((m, nb), np.float32)           # [M,K/32]
    for r in range(m):
        quantize_row(x[r], xq[r], xs[r], corr[r])
    out = np.empty((m, weight.values.shape[0]), np.float32)   # [M,N]
    gemv_q8_rows(weight.values, weight.scales.view(np.uint16), xq, xs, corr, bias, out, chunk, PICK)
    return out


def gemv_int8_q8(weight, x, bias, chunk):
    """out [N] = the Int8Weight ``weight`` [N,K] times the float32 row ``x`` [K], activations
    quantized per block (see the module doc); bias float32 [N] or [0]."""
    k = x.shape[0]
    nb = k // 32
    xq = np.empty(k, np.int8)                      # [K]
    xs = np.empty(nb, np.float32)                  # [K/32]
    corr = np.empty(nb, np.float32)                # [K/32]
    quantize_row(x, xq, xs, corr)
    out = np.empty(weight.values.shape[0], np.float32)   # [N]
    gemv_q8(weight.values, weight.scales.view(np.uint16), xq, xs, corr, bias, out, chunk, PICK)
    return out


class Q8Int8Weight(Int8Weight):
    """An ``Int8Weight`` whose one-row products quantize the input row to int8 (:func:`gemv_q8`):
    how the numba backend's load-time hook marks dense weights in the opt-in int8 mode. Everything
    else treats it as the Int8Weight it is (same values, scales, decode)."""

    __slots__ = ()


def mark(weight):
    """``weight`` as a :class:`Q8Int8Weight` if it is an Int8Weight (else unchanged)."""
    if isinstance(weight, Int8Weight) and not isinstance(weight, Q8Int8Weight):
        return Q8Int8Weight(weight.values, weight.scales, weight.name)
    return weight
