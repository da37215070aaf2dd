"""Big weights in their stored dtype, widened one row at a time inside the kernels.

A weight of logical shape ``[E, R, K]`` (a linear weight is ``E = 1``) reaches the kernels as a
tuple ``wt`` of arrays plus a *row loader* ``loader(wt, e, r, buf, scratch) -> row[K]``:

- f32 / f64 equal to the compute dtype: the stored row itself (no copy);
- any other f32 / f64: cast into ``buf`` (the compute dtype);
- bfloat16: the uint16 bits shifted left by 16 into ``scratch`` (uint32) and viewed as float32
  (exact: bf16 is the top half of an f32);
- float16: the IEEE half bits rebuilt as float32 bits in ``scratch`` (exact, subnormals included;
  numba has no CPU float16 arithmetic);
- MXFP4 (``Mxfp4Weight``): ``blocks[e, r]`` [K/32, 16] and ``scales[e, r]`` [K/32] decoded into
  ``buf`` with a 16-entry value table and a 256-entry power-of-two table in the compute dtype
  (exact, the same values as ``gptevo.ops.mxfp4.mxfp4_decode``).

``buf`` (compute dtype) and ``scratch`` (uint32) are per-thread buffers of length K, so a weight is
never materialised in a wider dtype: only the current row is, in cache.

Each kind also has a *row dot* ``rowdot(wt, e, r, x, buf, scratch, zero) -> x . W[e, r]`` for a row
used by a single input row (decode, T = 1): bf16 and MXFP4 widen/decode inside the dot itself (no
pass through ``buf``); MXFP4 sums each block of 32 and multiplies by its power-of-two scale once.
"""
from __future__ import annotations

import numpy as np

from gptevo.backends.numba._common import dot, jit
from gptevo.ops.mxfp4 import FP4_VALUES, SCALE_BIAS, SCALE_NAN


def _scale_table(dtype) -> np.ndarray:
    """2**(s - 127) for every E8M0 byte s, exactly in ``dtype``; byte 255 is NaN."""
    with np.errstate(over="ignore"):                   # byte 255 (2**128) is replaced below
        table = np.ldexp(np.ones(256, dtype), np.arange(256) - SCALE_BIAS).astype(dtype)  # [256]
    table[SCALE_NAN] = np.nan
    return table


VALUE_TABLE = {np.dtype(dt): FP4_VALUES.astype(dt) for dt in (np.float32, np.float64)}   # [16] each
SCALE_TABLE = {np.dtype(dt): _scale_table(dt) for dt in (np.float32, np.float64)}        # [256] each


@jit
def row_same(wt, e, r, buf, scratch):
    """The stored row, already in the compute dtype."""
    return wt[0][e, r]


@jit
def row_cast(wt, e, r, buf, scratch):
    """f32 <-> f64 rounding cast into buf (as ``astype(compute dtype)`` does)."""
    w = wt[0][e, r]
    for j in range(buf.shape[0]):
        buf[j] = w[j]
    return buf


@jit
def row_bf16(wt, e, r, buf, scratch):
    """bfloat16 bits (uint16) -> float32: the bits become the high half of an f32."""
    w = wt[0][e, r]
    for j in range(scratch.shape[0]):
        scratch[j] = np.uint32(w[j]) << 16
    return scratch.view(np.float32)


@jit
def row_f16(wt, e, r, buf, scratch):
    """IEEE binary16 bits (uint16) -> float32 bits, exactly (normals, subnormals, inf, NaN)."""
    w = wt[0][e, r]
    for j in range(scratch.shape[0]):
        h = np.uint32(w[j])
        sign = (h & np.uint32(0x8000)) << 16
        exp = (h >> 10) & np.uint32(0x1F)
        mant = h & np.uint32(0x3FF)
        if exp == 0x1F:                                   # inf / NaN: keep the payload
            scratch[j] = sign | np.uint32(0x7F800000) | (mant << 13)
        elif exp != 0:                                    # normal: rebias 15 -> 127
            scratch[j] = sign | ((exp + np.uint32(112)) << 23) | (mant << 13)
        elif mant == 0:                                   # signed zero
            scratch[j] = sign
        else:                                             # subnormal: normalise the mantissa
            e32 = np.uint32(113)                          # exponent of 2**-14, biased for f32
            while (mant & np.uint32(0x400)) == 0:
                mant = mant << 1
                e32 -= np.uint32(1)
            scratch[j] = sign | (e32 << 23) | ((mant & np.uint32(0x3FF)) << 13)
    return scratch.view(np.float32)


@jit
def row_mxfp4(wt, e, r, buf, scratch):
    """MXFP4 row: value_table[code] * scale_table[scale byte] per element (two codes per byte)."""
    blocks = wt[0][e, r]          # [G,16] u8
    scales = wt[1][e, r]          # [G] u8
    values = wt[2]                # [16] compute dtype
    powers = wt[3]                # [256] compute dtype
    for g in range(scales.shape[0]):
        s = powers[scales[g]]
        base = 32 * g
        for i in range(16):
            b = blocks[g, i]
            buf[base + 2 * i] = values[b & 15] * s
            buf[base + 2 * i + 1] = values[b >> 4] * s
    return buf


@jit
def dot_same(wt, e, r, x, buf, scratch, zero):
    w = wt[0][e, r]
    return dot(x, w, w.shape[0], zero)


@jit
def dot_via_row(wt, e, r, x, buf, scratch, zero):
    """Row dot for f16 and cast rows: widen into the buffers, then dot."""
    return dot(x, row_cast(wt, e, r, buf, scratch), buf.shape[0], zero)


@jit
def dot_via_f16(wt, e, r, x, buf, scratch, zero):
    return dot(x, row_f16(wt, e, r, buf, scratch), buf.shape[0], zero)


@jit
def _bf16(bits):
    """One bfloat16 (uint16 bits) as float32."""
    return np.uint32(np.uint32(bits) << 16).view(np.float32)


@jit
def dot_bf16(wt, e, r, x, buf, scratch, zero):
    """x . bf16 row, widening each element in registers (eight partial sums)."""
    w = wt[0][e, r]
    n = w.shape[0]
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = zero
    n8 = n - n % 8
    for j in range(0, n8, 8):
        a0 += x[j] * _bf16(w[j])
        a1 += x[j + 1] * _bf16(w[j + 1])
        a2 += x[j + 2] * _bf16(w[j + 2])
        a3 += x[j + 3] * _bf16(w[j + 3])
        a4 += x[j + 4] * _bf16(w[j + 4])
        a5 += x[j + 5] * _bf16(w[j + 5])
        a6 += x[j + 6] * _bf16(w[j + 6])
        a7 += x[j + 7] * _bf16(w[j + 7])
    for j in range(n8, n):
        a0 += x[j] * _bf16(w[j])
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


@jit
def dot_mxfp4(wt, e, r, x, buf, scratch, zero):
    """x . MXFP4 row: per block, sum value_table[code] * x, then times the block's power of two.

    Blocks whose scale byte is >= 253 (where decoded values can overflow float32) take the
    decode-then-multiply order, so infinities appear exactly where the decoded weight has them.
    """
    blocks = wt[0][e, r]          # [G,16] u8
    scales = wt[1][e, r]          # [G] u8
    values = wt[2]                # [16]
    powers = wt[3]                # [256]
    total = zero
    for g in range(scales.shape[0]):
        s = scales[g]
        base = 32 * g
        a0 = a1 = a2 = a3 = zero
        if s < 253:
            for i in range(0, 16, 2):
                b0 = blocks[g, i]
                b1 = blocks[g, i + 1]
                a0 += values[b0 & 15] * x[base + 2 * i]
                a1 += values[b0 >> 4] * x[base + 2 * i + 1]
                a2 += values[b1 & 15] * x[base + 2 * i + 2]
                a3 += values[b1 >> 4] * x[base + 2 * i + 3]
            total += ((a0 + a1) + (a2 + a3)) * powers[s]
        else:
            p = powers[s]
            for i in range(16):
                b = blocks[g, i]
                a0 += (values[b & 15] * p) * x[base + 2 * i]
                a1 += (values[b >> 4] * p) * x[base + 2 * i + 1]
            total += a0 + a1
    return total


def is_mxfp4(w) -> bool:
    return hasattr(w, "blocks") and hasattr(w, "scales") and getattr(w, "dtype", None) == "mxfp4"


def operand(w, dtype, ndim: int, what: str):
    """(wt, loader, rowdot, logical shape) for a weight of ``ndim`` dims (2: [R,K], 3: [E,R,K]).

    The kernels always see a leading expert axis, so a 2-D weight gets ``E = 1``.
    """
    dtype = np.dtype(dtype)
    assert len(w.shape) == ndim, f"{what}: unchecked shape {tuple(w.shape)}"
    if is_mxfp4(w):
        blocks, scales = np.asarray(w.blocks), np.asarray(w.scales)
        shape = tuple(w.shape)
        if ndim == 2:
            blocks, scales = blocks[None], scales[None]
        wt = (np.ascontiguousarray(blocks), np.ascontiguousarray(scales), VALUE_TABLE[dtype], SCALE_TABLE[dtype])
        return wt, row_mxfp4, dot_mxfp4, shape
    if not isinstance(w, np.ndarray) and hasattr(w, "decode"):   # other packed weights (int8 blocks)
        w = w.decode(dtype)                                         # decoded once per call
    arr = np.asarray(w)
    shape = arr.shape
    if ndim == 2:
        arr = arr[None]
    arr = np.ascontiguousarray(arr)
    if arr.dtype.name == "bfloat16":
        return (arr.view(np.uint16),), row_bf16, dot_bf16, shape
    if arr.dtype == np.float16:
        return (arr.view(np.uint16),), row_f16, dot_via_f16, shape
    if arr.dtype == dtype:
        return (arr,), row_same, dot_same, shape
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(dtype)      # integer weights (tests only): widen once
        return (arr,), row_same, dot_same, shape
    return (arr,), row_cast, dot_via_row, shape

