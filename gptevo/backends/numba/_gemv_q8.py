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

from gptevo.backends.numba._simd import (
    dpbusd_x86, f32x16_zero, has_vnni, hsum, i32_to_f32, i32x16_bcast, i32x16_zero, ixor, load_f32x16,
    load_i32x16, permps, vadd, vfma, vmul,
)
from gptevo.ops.int8 import Int8Weight

_OPTS = dict(cache=True, fastmath=False, error_model="numpy", nogil=True)
_FLIP = np.int32(-0x7F7F7F80)          # 0x80808080: xor turns int8 q into unsigned q + 128
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
    """q [N,K] int8, scales [N,K/32] float32 (C-contiguous); xq/xs/corr from quantize_row;
    bias [N] or [0]; out [N] float32; pick = PICK."""
    n_rows, k = q.shape
    nb = k // 32
    n_sb = nb // 16
    has_bias = bias.shape[0] == n_rows
    flip = i32x16_bcast(_FLIP)
    for c in prange((n_rows + chunk - 1) // chunk):
        for n in range(c * chunk, min(n_rows, (c + 1) * chunk)):
            base = n * k
            sbase = n * nb
            acc0 = f32x16_zero()
            acc1 = f32x16_zero()
            accc = f32x16_zero()
            for sb in range(n_sb):
                b0 = 16 * sb
                c16 = vmul(load_f32x16(scales, sbase + b0), load_f32x16(xs, b0))     # [16] s * xs
                accc = vfma(c16, load_f32x16(corr, b0), accc)
                for p in range(0, 8, 2):
                    o = 32 * (b0 + 2 * p)
                    d0 = dpbusd_x86(i32x16_zero(), ixor(load_i32x16(q, base + o), flip), load_i32x16(xq, o))
                    d1 = dpbusd_x86(i32x16_zero(), ixor(load_i32x16(q, base + o + 64), flip), load_i32x16(xq, o + 64))
                    acc0 = vfma(i32_to_f32(d0), permps(c16, load_i32x16(pick, 64 * p)), acc0)
                    acc1 = vfma(i32_to_f32(d1), permps(c16, load_i32x16(pick, 64 * p + 64)), acc1)
            tail = np.float32(0)
            t0 = 16 * n_sb
            if t0 < nb:                                   # the last nb % 16 blocks, in the window nb-16..nb
                w0 = nb - 16
                c16 = vmul(load_f32x16(scales, sbase + w0), load_f32x16(xs, w0))
                for b in range(t0, nb, 2):
                    o = 32 * b
                    d0 = dpbusd_x86(i32x16_zero(), ixor(load_i32x16(q, base + o), flip), load_i32x16(xq, o))
                    acc0 = vfma(i32_to_f32(d0), permps(c16, load_i32x16(pick, 32 * (b - w0))), acc0)
                for b in range(t0, nb):
                    tail += scales[n, b] * xs[b] * corr[b]
            y = hsum(vadd(acc0, acc1)) - hsum(accc) - tail
            out[n] = y + bias[n] if has_bias else y


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
    gemv_q8(weight.values, weight.scales, xq, xs, corr, bias, out, chunk, PICK)
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
