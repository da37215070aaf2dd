"""MXFP4 matrix-vector products for decode (T = 1): the expert weights streamed with explicit SIMD.

``mxfp4_gemv(blocks, scales, experts, x, out, mode, bias)`` computes, for every selected expert
``u`` (one parallel region over (expert, chunk of output rows), so gpt-oss' four experts run in a
single call)::

    out[u, n] = sum_k decode(W[experts[u], n, k]) * x[u or 0, k]  (+ bias[experts[u], n])

with ``W`` given as packed MXFP4 (``blocks`` uint8 [E, N, K/32, 16], ``scales`` uint8 [E, N, K/32],
OpenAI packing: low nibble of byte j = element 2j, high nibble = element 2j+1). ``x`` has one row
shared by every expert (gate_up) or one row per expert (down). float32 only.

Modes and variants (spec/backends.md, "MXFP4 decode kernels", has the measurements):

- ``"exact"`` (default). Float activations; every decoded weight equals the reference's
  (``mxfp4_decode``) bit for bit, including inf for scale bytes 253/254 and NaN for 255; only the
  summation order differs. Variant ``avx512``: per 32-value block the 16-entry E2M1 table is
  multiplied by the block's power of two (exact: a power of two, or the reference's overflow /
  NaN), the 16 bytes are zero-extended to dwords (``vpmovzxbd``) and ``vpermps`` looks up the even
  elements (low nibbles; vpermps reads only the low 4 bits of each index) and, after a 4-bit shift,
  the odd ones; two FMAs with ``x`` de-interleaved once per call into even/odd halves. Variant
  ``avx512-shift`` loads 64 bytes (4 blocks) and shifts dwords by 4m instead of zero-extending,
  scaling each lane's partial sum by its block's power of two (groups with a scale byte 0 or
  >= 253 take the per-block path); same results up to summation order, measured no faster.
- ``"int8"`` (opt-in). ``x`` is quantized once per call to int8 per 32-value block (scale
  ``max|x| / 127``, round half to even), as llama.cpp's ``ggml_vec_dot_mxfp4_q8_0`` does. Weights go
  through a ``vpshufb`` table to ``2 * e2m1 + 12`` (unsigned 0..24, so the unsigned x signed byte
  product ``vpdpbusd`` applies; the ``12 * sum(xq)`` offset is subtracted per lane, the factor 1/2
  folded into the activation scale), 64 weight bytes (4 blocks, 4 dword lanes each) per vector;
  per 16 blocks the four vectors' lanes are summed pairwise twice (one lane per block), converted
  to float and multiplied by the block's weight scale (``scale_byte << 23`` as float bits) times
  its activation scale; the last K/32 mod 16 blocks convert each vector's lanes. Variants ``avx512-vnni``
  (``vpdpbusd``) and ``avx512-bw`` (``vpmaddubsw`` + ``vpmaddwd``). Approximate (about 0.5%
  relative error on random data); scale byte 0 counts as 0 instead of 2**-127 and 255 as inf
  instead of NaN (``prepare`` records whether any 255 exists; ``moe_experts`` then uses exact mode).
  Rows need K >= 128 (4 blocks); smaller K falls back to exact mode.
- ``portable``: scalar numba code (the same exact semantics) for CPUs without AVX-512, selected by
  :func:`default_variant` from the host's features.

Weights are used in the stored layout: no repack is needed (the x layout is adapted instead, once
per call). :func:`prepare` optionally copies a weight into anonymous memory (no page faults per
token) and records the int8 mode on it.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from gptevo.backends.numba import _simd
from gptevo.backends.numba._simd import (
    bits_to_f32, dpbusd_x86, even_lanes, f32x16_bcast, f32x16_zero, hsum, i32_to_f32, i32x16_zero, iadd, iand, isll,
    isrl, isub, load_f32x16, load_i32x16, load_u32, load_u8x4_bcast, load_u8x16_zext, odd_lanes, permb, permps,
    pmaddubs_madd, prefetch, pshufb, vadd, vfma, vmul,
)
from gptevo.errors import RequestError
from gptevo.ops.mxfp4 import FP4_VALUES, SCALE_BIAS, SCALE_NAN

MODES = ("exact", "int8")
_VBMI = _simd.has_vbmi()     # int8 rows look nibbles up with vpermb (two masks fewer per 64 bytes)
EXACT_VARIANTS = ("avx512", "avx512-shift", "portable")
INT8_VARIANTS = ("avx512-vnni", "avx512-bw")

_OPTS = dict(cache=True, fastmath=False, error_model="numpy", nogil=True)
kjit = numba.njit(**_OPTS)
kpjit = numba.njit(parallel=True, **_OPTS)
# No helper functions with array arguments inside the inner loops: each call would take and
# release a reference on every array (NRT incref/decref), which halved the speed when measured.

# float32 tables: E2M1 values, and 2**(s - 127) for every scale byte (255: NaN), exactly.
VALUES_F32 = FP4_VALUES.astype(np.float32)                                   # [16]
with np.errstate(over="ignore"):
    POWERS_F32 = np.ldexp(np.ones(256), np.arange(256) - SCALE_BIAS).astype(np.float32)   # [256]
POWERS_F32[SCALE_NAN] = np.nan

# int8 mode constants, 192 bytes: the vpshufb table (2 * e2m1 + 12, repeated in each 128-bit lane),
# the shuffle that puts scale byte L of a broadcast dword into the low byte of dwords 4L..4L+3
# (0x80 zeroes a byte), and the nibble mask.
INT8_OFFSET = 12
PREFETCH_BYTES = 2048      # int8 kernel: software prefetch distance in weight bytes (measured, see spec)
_LUT = np.tile((2 * FP4_VALUES + INT8_OFFSET).astype(np.uint8), 4)          # [64]
_SMASK = np.full(64, 0x80, np.uint8)                                         # [64]
for _lane in range(4):
    for _m in range(4):
        _SMASK[16 * _lane + 4 * _m] = _lane
INT8_CONST = np.concatenate([_LUT, _SMASK, np.full(64, 0x0F, np.uint8)])    # [192]
SCALE_SHUFFLE = _SMASK.copy()                                                # [64]


# --- feature detection ----------------------------------------------------------------------------


def default_variant(mode: str = "exact") -> str:
    """The fastest variant of ``mode`` this host can run ("portable" when it has no AVX-512)."""
    if mode == "int8":
        if _simd.has_vnni():
            return "avx512-vnni"
        if _simd.has_avx512():
            return "avx512-bw"
        return "portable"
    return "avx512" if _simd.has_avx512() else "portable"


def host_variants(mode: str = "exact") -> tuple:
    """Every variant of ``mode`` the host can run (tests run all of them)."""
    if mode == "int8":
        out = []
        if _simd.has_vnni():
            out.append("avx512-vnni")
        if _simd.has_avx512():
            out.append("avx512-bw")
        return tuple(out)
    return ("avx512", "avx512-shift", "portable") if _simd.has_avx512() else ("portable",)


# --- exact mode -------------------------------------------------------------------------------------


@kjit
def _row_exact_avx512(blocks, boff, scales, soff, xe, xoff, xo, n_blocks, table, powers):
    """x . W-row for one row at byte offset boff (blocks) / soff (scales); x as even/odd halves."""
    acc0 = f32x16_zero()
    acc1 = f32x16_zero()
    t = load_f32x16(table, 0)
    for g in range(n_blocks):
        if g % 4 == 0:
            prefetch(blocks, boff + 16 * g + PREFETCH_BYTES)     # a few rows ahead
        ts = vmul(t, f32x16_bcast(powers[scales[soff + g]]))     # the block's 16 decoded values
        idx = load_u8x16_zext(blocks, boff + 16 * g)              # 16 bytes -> 16 dwords
        acc0 = vfma(permps(ts, idx), load_f32x16(xe, xoff + 16 * g), acc0)            # elements 2j
        acc1 = vfma(permps(ts, isrl(idx, 4)), load_f32x16(xo, xoff + 16 * g), acc1)   # elements 2j+1
    return hsum(vadd(acc0, acc1))


@kjit
def _row_exact_avx512_shift(blocks, boff, scales, soff, xp, xpoff, xe, xo, xoff, n_blocks, table, powers, smask):
    """x . W-row, 4 blocks (64 bytes) per step without zero-extension: dword lane l holds 8 codes
    (bytes 4l..4l+3, all of block l//4); shifting it by 4m puts code m in the low 4 bits vpermps
    reads, and x arrives permuted to match (xp, see _split_exact). The 8 products per lane are
    summed with the undecoded E2M1 values and multiplied by the block's power of two once (exact
    scaling); groups with a scale byte 0 (subnormal 2**-127) or >= 253 (overflow, NaN) take the
    per-block path, which multiplies the decoded weights, as the reference does."""
    acc0 = f32x16_zero()
    acc1 = f32x16_zero()
    t = load_f32x16(table, 0)
    sm = load_i32x16(smask, 0)
    for q in range(n_blocks // 4):
        v = load_u32(scales, soff + 4 * q)                       # the group's 4 scale bytes
        zero_byte = (v - 0x01010101) & ~v & 0x80808080           # some byte == 0
        high_byte = ((~v & 0xFFFFFFFF) - 0x03030303) & v & 0x80808080   # some byte >= 253
        if (zero_byte | high_byte) != 0:
            for g in range(4 * q, 4 * q + 4):                    # the per-block path (as _row_exact_avx512)
                ts = vmul(t, f32x16_bcast(powers[scales[soff + g]]))
                idx = load_u8x16_zext(blocks, boff + 16 * g)
                acc0 = vfma(permps(ts, idx), load_f32x16(xe, xoff + 16 * g), acc0)
                acc1 = vfma(permps(ts, isrl(idx, 4)), load_f32x16(xo, xoff + 16 * g), acc1)
            continue
        w = load_i32x16(blocks, boff + 64 * q)
        xb = xpoff + 128 * q
        p0 = vmul(permps(t, w), load_f32x16(xp, xb))
        p1 = vmul(permps(t, isrl(w, 4)), load_f32x16(xp, xb + 16))
        p0 = vfma(permps(t, isrl(w, 8)), load_f32x16(xp, xb + 32), p0)
        p1 = vfma(permps(t, isrl(w, 12)), load_f32x16(xp, xb + 48), p1)
        p0 = vfma(permps(t, isrl(w, 16)), load_f32x16(xp, xb + 64), p0)
        p1 = vfma(permps(t, isrl(w, 20)), load_f32x16(xp, xb + 80), p1)
        p0 = vfma(permps(t, isrl(w, 24)), load_f32x16(xp, xb + 96), p0)
        p1 = vfma(permps(t, isrl(w, 28)), load_f32x16(xp, xb + 112), p1)
        sv = bits_to_f32(isll(pshufb(load_u8x4_bcast(scales, soff + 4 * q), sm), 23))   # 2**(s-127) per lane
        if q % 2 == 0:
            acc0 = vfma(vadd(p0, p1), sv, acc0)
        else:
            acc1 = vfma(vadd(p0, p1), sv, acc1)
    for g in range(n_blocks - n_blocks % 4, n_blocks):          # the last K/32 mod 4 blocks
        ts = vmul(t, f32x16_bcast(powers[scales[soff + g]]))
        idx = load_u8x16_zext(blocks, boff + 16 * g)
        acc0 = vfma(permps(ts, idx), load_f32x16(xe, xoff + 16 * g), acc0)
        acc1 = vfma(permps(ts, isrl(idx, 4)), load_f32x16(xo, xoff + 16 * g), acc1)
    return hsum(vadd(acc0, acc1))


@kpjit
def _gemv_exact_avx512(blocks, scales, experts, xp, xe, xo, per_row, out, bias, has_bias, n_rows, n_blocks,
                       chunk, table, powers, smask, shift):
    n_u, n_out = out.shape
    n_chunks = (n_out + chunk - 1) // chunk
    xp_stride = 128 * (n_blocks // 4)
    for item in prange(n_u * n_chunks):
        u = item // n_chunks
        lo = (item % n_chunks) * chunk
        hi = min(n_out, lo + chunk)
        e = experts[u]
        m = u if per_row else 0
        for n in range(lo, hi):
            row = e * n_rows + n
            if shift:
                y = _row_exact_avx512_shift(blocks, row * n_blocks * 16, scales, row * n_blocks, xp, m * xp_stride,
                                            xe, xo, m * n_blocks * 16, n_blocks, table, powers, smask)
            else:
                y = _row_exact_avx512(blocks, row * n_blocks * 16, scales, row * n_blocks, xe, m * n_blocks * 16, xo,
                                      n_blocks, table, powers)
            out[u, n] = y + bias[e, n] if has_bias else y


@kjit
def _row_exact_portable(blocks, boff, scales, soff, x, xoff, n_blocks, table, powers, scaled):
    """Scalar exact row dot: per block the 16 decoded values (table * power of two), then 32 products."""
    total = np.float32(0)
    for g in range(n_blocks):
        p = powers[scales[soff + g]]
        for c in range(16):
            scaled[c] = table[c] * p
        a0 = np.float32(0)
        a1 = np.float32(0)
        base = xoff + 32 * g
        for j in range(16):
            b = blocks[boff + 16 * g + j]
            a0 += scaled[b & 15] * x[base + 2 * j]
            a1 += scaled[b >> 4] * x[base + 2 * j + 1]
        total += a0 + a1
    return total


@kpjit
def _gemv_exact_portable(blocks, scales, experts, x, x_stride, out, bias, has_bias, n_rows, n_blocks, chunk,
                         table, powers):
    n_u, n_out = out.shape
    n_chunks = (n_out + chunk - 1) // chunk
    for item in prange(n_u * n_chunks):
        u = item // n_chunks
        lo = (item % n_chunks) * chunk
        hi = min(n_out, lo + chunk)
        e = experts[u]
        scaled = np.empty(16, np.float32)
        for n in range(lo, hi):
            row = e * n_rows + n
            y = _row_exact_portable(blocks, row * n_blocks * 16, scales, row * n_blocks, x, u * x_stride,
                                    n_blocks, table, powers, scaled)
            out[u, n] = y + bias[e, n] if has_bias else y


@kjit
def _split_exact(x, xe, xo, xp):
    """x [M, K] -> per row: xe, xo [K/2] (per block of 32, its 16 even and 16 odd elements) and
    xp [128 * (K/128)] (per group q of 4 blocks, 8 vectors m of 16 lanes l:
    xp[128q + 16m + l] = x[128q + 32(l//4) + 8(l%4) + m], the element vpermps finds in lane l after
    a shift by 4m)."""
    half = x.shape[1] // 2
    n_groups = x.shape[1] // 128
    for r in range(x.shape[0]):
        for j in range(half):
            xe[r * half + j] = x[r, 2 * j]
            xo[r * half + j] = x[r, 2 * j + 1]
        for q in range(n_groups):
            for mm in range(8):
                for lane in range(16):
                    xp[r * 128 * n_groups + 128 * q + 16 * mm + lane] = \
                        x[r, 128 * q + 32 * (lane // 4) + 8 * (lane % 4) + mm]


# --- int8 mode --------------------------------------------------------------------------------------


@kjit
def _quantize_rows(x, n_blocks, xqe, xqo, xsl, corr, xsb):
    """Quantize each row of x [M, K] per 32-value block to int8 and lay it out for the int8 kernels.

    Groups of 4 blocks (64 weight bytes); the last group is the window of the last 4 blocks, its
    lanes of blocks already covered by the previous group get zero activations and scales. Per
    group q of row m: xqe/xqo [64] the even/odd elements (lane l = bytes 4l..4l+3 = block l//4,
    byte 4(l%4)+i of it), xsl [16] half the block's activation scale per lane, corr [16]
    INT8_OFFSET * the lane's sum of quantized values. xsb [M, n_blocks]: half of each block's
    activation scale (the 16-block steps of :func:`_row_int8`).
    """
    n_groups = (n_blocks + 3) // 4
    d = np.empty(n_blocks, np.float32)
    for m in range(x.shape[0]):
        for g in range(n_blocks):
            amax = np.float32(0)
            for i in range(32):
                amax = max(amax, abs(x[m, 32 * g + i]))
            d[g] = amax / np.float32(127)
            xsb[m, g] = np.float32(0.5) * d[g]
        for q in range(n_groups):
            b0 = 4 * q if q < n_groups - 1 else n_blocks - 4
            for lane in range(16):
                b = b0 + lane // 4
                dup = q == n_groups - 1 and b < 4 * (n_groups - 1)
                inv = np.float32(1) / d[b] if d[b] > 0 else np.float32(0)
                s = 0
                for i in range(4):
                    j = 4 * (lane % 4) + i                        # byte of the block
                    ve = 0 if dup else int(np.round(x[m, 32 * b + 2 * j] * inv))
                    vo = 0 if dup else int(np.round(x[m, 32 * b + 2 * j + 1] * inv))
                    xqe[m, 64 * q + 4 * lane + i] = ve
                    xqo[m, 64 * q + 4 * lane + i] = vo
                    s += ve + vo
                corr[m, 16 * q + lane] = INT8_OFFSET * s
                xsl[m, 16 * q + lane] = np.float32(0) if dup else np.float32(0.5) * d[b]


@kjit
def _row_int8(blocks, boff, scales, soff, xqe, xqo, xsl, corr, xsb, m, n_blocks, const, vnni):
    """x . W-row in int8 mode; m is the x row (quantized layout of _quantize_rows). 16 blocks (256
    weight bytes, four 64-byte vectors) per step: each vector's dword lanes hold partial sums of its
    4 blocks (4 lanes each); two levels of even/odd lane pair sums leave one lane per block, which
    is converted to float once and scaled by its weight scale times its activation scale. The last
    n_blocks % 16 blocks go one vector at a time (the last one the window of the last 4 blocks).
    (The loop body is written out, not a helper: a helper taking arrays costs a reference count
    per call.)"""
    lut = load_i32x16(const, 0)
    smask = load_i32x16(const, 64)
    mask4 = load_i32x16(const, 128)
    acc0 = f32x16_zero()
    acc1 = f32x16_zero()
    n_groups = (n_blocks + 3) // 4
    xbase = m * 64 * n_groups
    lbase = m * 16 * n_groups
    n16 = n_blocks // 16
    for h in range(n16):
        o = boff + 256 * h
        d0 = i32x16_zero()
        d1 = i32x16_zero()
        d2 = i32x16_zero()
        d3 = i32x16_zero()
        for v in range(4):
            prefetch(blocks, o + 64 * v + PREFETCH_BYTES)        # a few rows ahead
            w = load_i32x16(blocks, o + 64 * v)                  # 64 bytes: 4 blocks
            if _VBMI:                                            # vpermb reads 6 index bits; the table
                lo = permb(lut, w)                               # repeats every 16 bytes: no masks
                hi = permb(lut, isrl(w, 4))
            else:
                lo = pshufb(lut, iand(w, mask4))                 # elements 2j as 2*e2m1 + 12
                hi = pshufb(lut, iand(isrl(w, 4), mask4))        # elements 2j+1
            xoff = xbase + 64 * (4 * h + v)
            if vnni:
                dp = dpbusd_x86(dpbusd_x86(i32x16_zero(), lo, load_i32x16(xqe, xoff)), hi, load_i32x16(xqo, xoff))
            else:
                dp = pmaddubs_madd(pmaddubs_madd(i32x16_zero(), lo, load_i32x16(xqe, xoff)), hi,
                                   load_i32x16(xqo, xoff))
            dp = isub(dp, load_i32x16(corr, 4 * (lbase + 16 * (4 * h + v))))   # remove the +12 offset
            if v == 0:
                d0 = dp
            elif v == 1:
                d1 = dp
            elif v == 2:
                d2 = dp
            else:
                d3 = dp
        s01 = iadd(even_lanes(d0, d1), odd_lanes(d0, d1))       # blocks 0,0,1,1,..,7,7
        s23 = iadd(even_lanes(d2, d3), odd_lanes(d2, d3))       # blocks 8,8,..,15,15
        sb = iadd(even_lanes(s01, s23), odd_lanes(s01, s23))    # block 0..15
        sv = bits_to_f32(isll(load_u8x16_zext(scales, soff + 16 * h), 23))   # 2**(s-127) per block
        f = vmul(sv, load_f32x16(xsb, m * n_blocks + 16 * h))
        if h % 2 == 0:
            acc0 = vfma(i32_to_f32(sb), f, acc0)
        else:
            acc1 = vfma(i32_to_f32(sb), f, acc1)
    for q in range(4 * n16, n_groups):
        b0 = 4 * q if q < n_groups - 1 else n_blocks - 4
        w = load_i32x16(blocks, boff + 16 * b0)
        if _VBMI:
            lo = permb(lut, w)
            hi = permb(lut, isrl(w, 4))
        else:
            lo = pshufb(lut, iand(w, mask4))
            hi = pshufb(lut, iand(isrl(w, 4), mask4))
        xoff = xbase + 64 * q
        if vnni:
            dp = dpbusd_x86(dpbusd_x86(i32x16_zero(), lo, load_i32x16(xqe, xoff)), hi, load_i32x16(xqo, xoff))
        else:
            dp = pmaddubs_madd(pmaddubs_madd(i32x16_zero(), lo, load_i32x16(xqe, xoff)), hi, load_i32x16(xqo, xoff))
        dp = isub(dp, load_i32x16(corr, 4 * (lbase + 16 * q)))
        sv = bits_to_f32(isll(pshufb(load_u8x4_bcast(scales, soff + b0), smask), 23))   # 2**(s-127) per lane
        f = vmul(sv, load_f32x16(xsl, lbase + 16 * q))
        acc0 = vfma(i32_to_f32(dp), f, acc0)
    return hsum(vadd(acc0, acc1))


@kpjit
def _gemv_int8(blocks, scales, experts, xqe, xqo, xsl, corr, xsb, per_row, out, bias, has_bias, n_rows, n_blocks,
               chunk, const, vnni):
    n_u, n_out = out.shape
    n_chunks = (n_out + chunk - 1) // chunk
    for item in prange(n_u * n_chunks):
        u = item // n_chunks
        lo = (item % n_chunks) * chunk
        hi = min(n_out, lo + chunk)
        e = experts[u]
        m = u if per_row else 0
        for n in range(lo, hi):
            row = e * n_rows + n
            y = _row_int8(blocks, row * n_blocks * 16, scales, row * n_blocks, xqe, xqo, xsl, corr, xsb, m,
                          n_blocks, const, vnni)
            out[u, n] = y + bias[e, n] if has_bias else y


# --- public API -------------------------------------------------------------------------------------


class PreparedMxfp4:
    """An MXFP4 weight prepared for the decode kernels: its arrays in anonymous memory and a mode.

    Duck-types as ``Mxfp4Weight`` (``blocks``, ``scales``, ``shape``, ``dtype == "mxfp4"``,
    ``nbytes``, ``decode``, ``w[e]``), so every other path of the numba backend (and the reference)
    still accepts it. ``mode`` ("exact" or "int8") is what ``moe_experts`` uses for T = 1;
    ``has_nan_scale`` is True when some scale byte is 255, in which case int8 mode is not used.
    """

    def __init__(self, blocks, scales, mode="exact", name="mxfp4 weight", has_nan_scale=None):
        if mode not in MODES:
            raise RequestError(f"mxfp4 prepare: mode must be one of {MODES}, got {mode!r}")
        self.blocks = blocks
        self.scales = scales
        self.mode = mode
        self.name = name
        self.has_nan_scale = bool(np.any(scales == SCALE_NAN)) if has_nan_scale is None else has_nan_scale

    @property
    def shape(self):
        return (*self.scales.shape[:-1], self.scales.shape[-1] * 32)

    @property
    def ndim(self):
        return len(self.shape)

    dtype = "mxfp4"

    @property
    def nbytes(self):
        return int(self.blocks.nbytes + self.scales.nbytes)

    def __len__(self):
        return self.shape[0]

    def decode(self, dtype="float32"):
        """The decoded weight (as Mxfp4Weight.decode: blocks and scales were checked when the weight
        was made, so only ``dtype`` is checked here)."""
        from gptevo.ops.mxfp4 import _decode_dtype, mxfp4_decode
        from gptevo.ops.spec import unchecked

        return unchecked(mxfp4_decode)(blocks=self.blocks, scales=self.scales, dtype=_decode_dtype(dtype).name)

    def __getitem__(self, index):
        from gptevo.ops.mxfp4 import Mxfp4Weight

        return Mxfp4Weight(self.blocks, self.scales, self.name)[index]

    def __repr__(self):
        return f"PreparedMxfp4({self.name!r}, shape={list(self.shape)}, mode={self.mode!r})"


def prepare(weight, mode="exact", copy=True) -> PreparedMxfp4:
    """Prepare an ``Mxfp4Weight`` (or a ``(blocks, scales)`` pair) once at load time.

    copy=True copies the packed bytes into anonymous (ordinary) memory, so decode never takes page
    faults on a memory-mapped file (the layout is unchanged: the kernels read the stored layout;
    the mapping can then be dropped). ``mode`` selects the T = 1 kernel ``moe_experts`` uses.
    """
    if isinstance(weight, tuple):
        blocks, scales = weight
        name = "mxfp4 weight"
    else:
        blocks, scales, name = weight.blocks, weight.scales, getattr(weight, "name", "mxfp4 weight")
    blocks = np.array(blocks, np.uint8, order="C", copy=True) if copy else np.ascontiguousarray(blocks)
    scales = np.array(scales, np.uint8, order="C", copy=True) if copy else np.ascontiguousarray(scales)
    return PreparedMxfp4(blocks, scales, mode, name)


def _chunk(n_out: int, n_u: int) -> int:
    """Output rows per work item: about 8 items per thread, at least 16 rows."""
    threads = max(1, numba.get_num_threads())
    return max(16, -(-n_out * n_u // (8 * threads)))


def mxfp4_gemv(blocks, scales, experts, x, out=None, mode="exact", bias=None, variant=None):
    """out[u, n] = sum_k decode(W[experts[u], n, k]) * x[u or 0, k] (+ bias[experts[u], n]).

    blocks uint8 [E, N, K/32, 16], scales uint8 [E, N, K/32] (C-contiguous; e.g. an Mxfp4Weight's
    arrays); experts int [U]; x float32 [U, K] (one row per expert) or [1, K] (shared); out float32
    [U, N] (allocated when None); bias float32 [E, N] or None. mode "exact" | "int8"; variant None
    (the host's best) or one of EXACT_VARIANTS / INT8_VARIANTS. Returns out.
    """
    if mode not in MODES:
        raise RequestError(f"mxfp4_gemv: mode must be one of {MODES}, got {mode!r}")
    blocks = np.ascontiguousarray(blocks)
    scales = np.ascontiguousarray(scales)
    if blocks.ndim != 4 or blocks.shape[-1] != 16 or scales.shape != blocks.shape[:-1]:
        raise RequestError(f"mxfp4_gemv: expected blocks [E,N,G,16] and scales [E,N,G], got "
                           f"{list(blocks.shape)} and {list(scales.shape)}")
    n_e, n_rows, n_blocks = scales.shape
    k = 32 * n_blocks
    experts = np.ascontiguousarray(experts, dtype=np.int64).reshape(-1)
    n_u = experts.shape[0]
    if n_u and (experts.min() < 0 or experts.max() >= n_e):
        raise RequestError(f"mxfp4_gemv: experts must be in 0..{n_e - 1}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != k or x.shape[0] not in (1, n_u):
        raise RequestError(f"mxfp4_gemv: x must be [1, {k}] or [{n_u}, {k}], got {list(x.shape)}")
    if out is None:
        out = np.empty((n_u, n_rows), np.float32)
    if out.shape != (n_u, n_rows) or out.dtype != np.float32:
        raise RequestError(f"mxfp4_gemv: out must be float32 [{n_u}, {n_rows}]")
    has_bias = bias is not None
    b = np.ascontiguousarray(bias, dtype=np.float32) if has_bias else np.zeros((1, 1), np.float32)
    if has_bias and b.shape != (n_e, n_rows):
        raise RequestError(f"mxfp4_gemv: bias must be [{n_e}, {n_rows}], got {list(b.shape)}")
    if n_u == 0 or n_rows == 0:
        return out
    if k == 0:
        out[:] = b[experts] if has_bias else 0
        return out
    bflat, sflat = blocks.reshape(-1), scales.reshape(-1)
    chunk = _chunk(n_rows, n_u)
    per_row = x.shape[0] == n_u and n_u > 1
    if mode == "int8" and n_blocks >= 4:
        variant = variant or default_variant("int8")
        if variant in INT8_VARIANTS:
            if variant not in host_variants("int8"):
                raise RequestError(f"mxfp4_gemv: variant {variant!r} needs CPU features this host lacks")
            n_groups = (n_blocks + 3) // 4
            m = x.shape[0]
            xqe = np.empty((m, 64 * n_groups), np.int8)
            xqo = np.empty((m, 64 * n_groups), np.int8)
            xsl = np.empty((m, 16 * n_groups), np.float32)
            corr = np.empty((m, 16 * n_groups), np.int32)
            xsb = np.empty((m, n_blocks), np.float32)
            _quantize_rows(x, n_blocks, xqe, xqo, xsl, corr, xsb)
            _gemv_int8(bflat, sflat, experts, xqe.reshape(-1), xqo.reshape(-1), xsl.reshape(-1), corr.reshape(-1),
                       xsb.reshape(-1), x.shape[0] > 1, out, b, has_bias, n_rows,
                       n_blocks, chunk, INT8_CONST, variant == "avx512-vnni")
            return out
        variant = None                   # int8 not available here: exact on the best variant
    if variant in INT8_VARIANTS:
        variant = None
    variant = variant or default_variant("exact")
    x_stride = k if per_row else 0
    if variant in ("avx512", "avx512-shift"):
        if not _simd.has_avx512():
            raise RequestError(f"mxfp4_gemv: variant {variant!r} needs AVX-512 F/BW, which this host lacks")
        m = x.shape[0]
        xe = np.empty(m * k // 2, np.float32)
        xo = np.empty(m * k // 2, np.float32)
        xp = np.empty(m * 128 * (n_blocks // 4), np.float32)
        _split_exact(x, xe, xo, xp)
        _gemv_exact_avx512(bflat, sflat, experts, xp, xe, xo, per_row, out, b, has_bias, n_rows, n_blocks, chunk,
                           VALUES_F32, POWERS_F32, SCALE_SHUFFLE, variant == "avx512-shift")
    elif variant == "portable":
        _gemv_exact_portable(bflat, sflat, experts, x.reshape(-1), x_stride, out, b, has_bias, n_rows, n_blocks,
                             chunk, VALUES_F32, POWERS_F32)
    else:
        raise RequestError(f"mxfp4_gemv: unknown variant {variant!r}")
    return out


# --- mode selection for moe_experts ---------------------------------------------------------------

_DEFAULT_MODE = ["exact"]


def set_default_mode(mode: str) -> None:
    """Mode ``moe_experts`` uses for MXFP4 weights not prepared with a mode of their own."""
    if mode not in MODES:
        raise RequestError(f"mxfp4 mode must be one of {MODES}, got {mode!r}")
    _DEFAULT_MODE[0] = mode


def get_default_mode() -> str:
    return _DEFAULT_MODE[0]


def weight_mode(*weights) -> str:
    """The T = 1 mode for these MXFP4 weights: "int8" if each is prepared as int8 (or, unprepared,
    the default mode is int8) and none has a scale byte 255 on record; else "exact"."""
    for w in weights:
        mode = getattr(w, "mode", _DEFAULT_MODE[0])
        if mode != "int8" or getattr(w, "has_nan_scale", False):
            return "exact"
    return "int8"
