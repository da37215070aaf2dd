"""Streaming matrix-vector kernels for decode: ``out[n] = W[n] . x (+ bias[n])`` for one input row.

Batch-1 decode reads every weight byte once per token, so these kernels exist to run at the memory
read bandwidth. Each weight kind has its own kernel, all with the same shape of loop: a ``prange``
over chunks of output rows, one serial dot product per row, compiled with the reassociating
fast-math flags of :data:`FASTMATH` so LLVM vectorizes the dot into several SIMD partial sums
(spec/backends.md, "Numerical policy"). Weights are widened in registers, never in memory:

- float32 / float64: read as stored;
- bfloat16 (uint16 bits): shifted into the high half of a uint32 and bit-cast to float32 (exact);
- float16 (uint16 bits): converted by the CPU's half-to-float instruction (``fpext``, exact);
- int8 blockwise (``Int8Weight``: int8 values, one float16 scale per 32 values along K): each
  block's dot is formed in float32 from exactly widened int8 values and multiplied by its scale.

The reduction order is the only difference from the reference (sums of products in float32 with
vector-width partial sums); every product is the exact product of the widened operands.
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from gptevo.backends.numba import _gemv_q8
from gptevo.backends.numba._fused_rows import rows_bf16
from gptevo.backends.numba._simd import (f32x16_bcast, f32x16_zero, has_avx512, hsum, load_f32x16, load_i8x16_f32, vadd,
                                         vfma, vmul)

# Reassociation and contraction (FMA) let LLVM vectorize reductions; no 'nnan'/'ninf': NaN and inf
# propagate as in IEEE arithmetic, so a NaN weight still poisons exactly the rows it belongs to.
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}

fast_pjit = numba.njit(cache=True, fastmath=FASTMATH, error_model="numpy", parallel=True)
fast_jit = numba.njit(cache=True, fastmath=FASTMATH, error_model="numpy")


def _to_float32(bitwidth: int, emit, doc: str):
    """An ``@intrinsic`` taking one integer of ``bitwidth`` bits and returning the float32 that
    ``emit(builder, value)`` computes in LLVM IR (a scalar op that LLVM vectorizes in loops)."""
    def typer(typingctx, value):
        if not isinstance(value, types.Integer) or value.bitwidth != bitwidth:
            return None

        def codegen(context, builder, signature, args):
            return emit(builder, args[0])

        return types.float32(value), codegen

    typer.__doc__ = doc
    return intrinsic(typer)


half_bits_to_float = _to_float32(
    16, lambda b, v: b.fpext(b.bitcast(v, ir.HalfType()), ir.FloatType()),
    "float32 of IEEE binary16 bits (uint16): the CPU's half-to-float conversion, exact.")
bf16_bits_to_float = _to_float32(
    16, lambda b, v: b.bitcast(b.shl(b.zext(v, ir.IntType(32)), ir.Constant(ir.IntType(32), 16)), ir.FloatType()),
    "float32 of bfloat16 bits (uint16): the bits become the high half of a float32, exact.")
int8_to_float = _to_float32(
    8, lambda b, v: b.sitofp(v, ir.FloatType()),
    "float32 of an int8 (one sitofp: LLVM vectorizes it as sign-extend + convert).")


@fast_pjit
def gemv_float(w, x, bias, out, chunk, zero):
    """w [N,K] float32/float64 (same dtype as x, and as ``zero``); x [K]; bias [N] or [0]; out [N].

    One row per pass over x: on the 2-core AMD EPYC (Zen 4) machine this streamed 50257 x 768
    float32 at 30.5 GB/s on one thread against 15.5 for four rows per pass (x loaded once for four
    rows, which had measured 10-25 % faster on the earlier Intel machine); spec/backends.md.
    """
    n_rows, k = w.shape
    has_bias = bias.shape[0] == n_rows
    for c in prange((n_rows + chunk - 1) // chunk):
        for r in range(c * chunk, min(n_rows, (c + 1) * chunk)):
            row = w[r]
            acc = zero
            for j in range(k):
                acc += row[j] * x[j]
            out[r] = acc + bias[r] if has_bias else acc


@fast_jit
def half_to_float(bits, is_bf16):
    """float32 of 16-bit float ``bits``: bfloat16 when ``is_bf16``, else IEEE binary16 (both exact).
    ``is_bf16`` is loop-invariant where this is used, so LLVM unswitches the loop on it."""
    return bf16_bits_to_float(bits) if is_bf16 else half_bits_to_float(bits)


@fast_pjit
def gemv_half(w, x, bias, out, chunk, is_bf16):
    """w [N,K] uint16 bits of bfloat16 (``is_bf16``) or binary16; x [K] float32; bias [N] or [0];
    out [N]. One row per pass, as :func:`gemv_float` (bf16 50257 x 768, one thread: 25.8 GB/s vs
    10.7 for four rows per pass)."""
    n_rows, k = w.shape
    has_bias = bias.shape[0] == n_rows
    zero = np.float32(0)
    for c in prange((n_rows + chunk - 1) // chunk):
        for r in range(c * chunk, min(n_rows, (c + 1) * chunk)):
            row = w[r]
            acc = zero
            for j in range(k):
                acc += half_to_float(row[j], is_bf16) * x[j]
            out[r] = acc + bias[r] if has_bias else acc


@numba.njit(cache=True, error_model="numpy", parallel=True, nogil=True)
def gemv_bf16_avx512(w, xe, xo, bias, out, chunk):
    """``gemv_half`` for bfloat16 with explicit vectors: 64 bytes (32 values) per load, the low
    halves of the dwords (even elements) shifted up and the high halves masked, so each load
    becomes two float32 vectors without a widening load; x split once per call into its even and
    odd elements (xe, xo [K/2]). w [N,K] uint16 bits, K % 32 == 0. Per 2-thread measurement on GPT-2
    shapes: 28-45 GB/s against 23-26 for the loop LLVM vectorized (spec/backends.md). Each chunk of
    rows is ``_fused_rows.rows_bf16`` (the fused decode step streams its share with it)."""
    n_rows = w.shape[0]
    has_bias = bias.shape[0] == n_rows
    for c in prange((n_rows + chunk - 1) // chunk):
        rows_bf16(w, xe, xo, bias, has_bias, c * chunk, min(n_rows, (c + 1) * chunk), out)


@fast_pjit
def gemv_int8(q, scales, x, bias, out, chunk):
    """q [N,K] int8; scales [N,K/32] float16 as uint16 bits; x [K] float32;
    out[n] = sum_k q[n,k] * x[k] * s[n,k/32].

    Each product is scaled by its block's scale (one vector multiply per value, which LLVM keeps in
    the vectorized loop) instead of scaling per-block partial sums: the same value up to rounding,
    and about ten times faster here because the loop stays one flat vectorizable reduction.
    """
    n_rows, k = q.shape
    has_bias = bias.shape[0] == n_rows
    for c in prange((n_rows + chunk - 1) // chunk):
        for n in range(c * chunk, min(n_rows, (c + 1) * chunk)):
            row = q[n]
            s = scales[n]
            acc = np.float32(0)
            for j in range(k):
                acc += int8_to_float(row[j]) * x[j] * half_bits_to_float(s[j >> 5])   # 32 values per scale
            out[n] = acc + bias[n] if has_bias else acc


@fast_pjit
def gemv_int8_avx512(q, scales, x, bias, out, chunk):
    """``gemv_int8`` with explicit AVX-512 vectors: per 32-value block, two 16-lane loads of int8
    sign-extended and converted to float32 (exact), multiplied by x, and the block's partial vector
    scaled into two accumulators. The loop over K as LLVM vectorized it gathered the per-element
    scale and streamed at under half the bandwidth. q [N,K] int8 (K % 32 == 0); scales [N,K/32]
    float16 as uint16 bits."""
    n_rows, k = q.shape
    n_blocks = k // 32
    has_bias = bias.shape[0] == n_rows
    for c in prange((n_rows + chunk - 1) // chunk):
        for n in range(c * chunk, min(n_rows, (c + 1) * chunk)):
            base = n * k
            sbase = n * n_blocks
            acc0 = f32x16_zero()
            acc1 = f32x16_zero()
            b = 0
            while b + 2 <= n_blocks:
                p0 = vmul(load_i8x16_f32(q, base + 32 * b), load_f32x16(x, 32 * b))
                p0 = vfma(load_i8x16_f32(q, base + 32 * b + 16), load_f32x16(x, 32 * b + 16), p0)
                p1 = vmul(load_i8x16_f32(q, base + 32 * b + 32), load_f32x16(x, 32 * b + 32))
                p1 = vfma(load_i8x16_f32(q, base + 32 * b + 48), load_f32x16(x, 32 * b + 48), p1)
                acc0 = vfma(p0, f32x16_bcast(half_bits_to_float(scales.flat[sbase + b])), acc0)
                acc1 = vfma(p1, f32x16_bcast(half_bits_to_float(scales.flat[sbase + b + 1])), acc1)
                b += 2
            if b < n_blocks:
                p0 = vmul(load_i8x16_f32(q, base + 32 * b), load_f32x16(x, 32 * b))
                p0 = vfma(load_i8x16_f32(q, base + 32 * b + 16), load_f32x16(x, 32 * b + 16), p0)
                acc0 = vfma(p0, f32x16_bcast(half_bits_to_float(scales.flat[sbase + b])), acc0)
            y = hsum(vadd(acc0, acc1))
            out[n] = y + bias[n] if has_bias else y


def rows_per_chunk(n_rows: int, threads: int) -> int:
    """Output rows per parallel work item: about 8 items per thread, at least 16 rows."""
    return max(16, -(-n_rows // (8 * max(1, threads))))


def gemv(x, weight, bias, threads: int):
    """``weight . x (+ bias)`` for one float32/float64 row ``x`` [K] (C-contiguous), or None when this
    weight kind has no streaming kernel (the caller then takes the general path).

    weight: a C-contiguous ndarray [N,K] (float32 / float64 equal to x's dtype, bfloat16, float16)
    or an ``Int8Weight`` (float32 x only); bias: [N] in x's dtype, or None.
    """
    dt = x.dtype
    values = getattr(weight, "values", None)
    if values is not None and getattr(weight, "dtype", None) == "int8_block32":
        if dt != np.float32 or values.ndim != 2 or not values.flags.c_contiguous:
            return None
        n = values.shape[0]
        if isinstance(weight, _gemv_q8.Q8Int8Weight) and _gemv_q8.supported(values.shape[1]):
            return _gemv_q8.gemv_int8_q8(weight, x, _bias(bias, dt), rows_per_chunk(n, threads))
        out = np.empty(n, dt)                                                   # [N]
        kernel = gemv_int8_avx512 if _AVX512 else gemv_int8
        kernel(values, weight.scales.view(np.uint16), x, _bias(bias, dt), out, rows_per_chunk(n, threads))
        return out
    if not isinstance(weight, np.ndarray) or weight.ndim != 2 or not weight.flags.c_contiguous:
        return None
    n = weight.shape[0]
    wd = weight.dtype
    out = np.empty(n, dt)                                                       # [N]
    if wd == dt:
        gemv_float(weight, x, _bias(bias, dt), out, rows_per_chunk(n, threads), dt.type(0))
    elif dt == np.float32 and wd.name == "bfloat16" and _AVX512 and weight.shape[1] % 32 == 0:
        gemv_bf16_avx512(weight.view(np.uint16), np.ascontiguousarray(x[0::2]), np.ascontiguousarray(x[1::2]),
                         _bias(bias, dt), out, rows_per_chunk(n, threads))
    elif dt == np.float32 and (wd.name == "bfloat16" or wd == np.float16):
        gemv_half(weight.view(np.uint16), x, _bias(bias, dt), out, rows_per_chunk(n, threads), wd.name == "bfloat16")
    else:
        return None
    return out


_AVX512 = has_avx512()
_NO_BIAS = {np.dtype(np.float32): np.zeros(0, np.float32), np.dtype(np.float64): np.zeros(0, np.float64)}


def _bias(bias, dtype) -> np.ndarray:
    return _NO_BIAS[dtype] if bias is None else bias
