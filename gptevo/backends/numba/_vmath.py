"""Vectorizable float64 exp, sigmoid and tanh for the activation kernels.

``math.exp`` / ``math.tanh`` are calls into libm that LLVM cannot vectorize (numba has no vector
math library here), so an activation over a [T, I] block ran one value at a time, about 16 ns each.
These versions are straight-line arithmetic plus one integer bit-cast, which LLVM turns into SIMD
code inside a fast-math loop, while staying accurate to a few float64 ulp:

    exp(x) = 2**n * p(r),  n = round(x / ln 2),  r = x - n ln 2 (Cody-Waite, two constants),
             p = the degree-13 Taylor polynomial of exp on |r| <= ln2/2 (truncation < 2e-17
             relative), 2**n built from exponent bits in two halves so subnormal results are right.

Special values: exp(NaN) = NaN, exp(+inf) = +inf, exp(x > 709.78) = +inf, exp(-inf) = 0. Results
below the smallest normal float64 (x < -708.39, exp < 2.2e-308) are flushed to 0: computing them
would need subnormal arithmetic, which costs over a hundred cycles per operation on x86 and made a
masked softmax row (every -inf lane takes that path in SIMD code) 30 times slower. The flushed
values are below 1e-307 of the sums they enter, far inside every tolerance.
"""
from __future__ import annotations

import numba
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

LOG2E = 1.4426950408889634
LN2_HI = 6.93147180369123816490e-01
LN2_LO = 1.90821492927058770002e-10
EXP_MAX = 709.782712893384          # largest x with finite exp(x)
EXP_MIN = -708.39                   # below: exp(x) is subnormal; flushed to 0

# IEEE semantics on purpose (no fast-math): the 2**n scaling must not be reassociated (p * 2**a *
# 2**b is finite where 2**a * 2**b overflows). Elementwise loops vectorize without fast-math, and
# LLVM inlines these small functions into them.
vjit = numba.njit(cache=True, error_model="numpy")


@intrinsic
def _bits_to_float64(typingctx, bits):
    """The float64 whose IEEE bits are the int64 ``bits`` (a bit-cast, free in SIMD code)."""
    if not isinstance(bits, types.Integer) or bits.bitwidth != 64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(bits), codegen


@vjit
def _pow2(n):
    """2.0 ** n for an integral float64 n in [-1022, 1023]."""
    return _bits_to_float64((numba.int64(n) + 1023) << 52)


@vjit
def exp64(x):
    """exp(x) in float64 (see the module doc for accuracy and special values)."""
    xc = min(max(x, EXP_MIN), EXP_MAX)
    n = float(int(xc * LOG2E + (0.5 if xc >= 0 else -0.5)))       # round half away from zero
    r = (xc - n * LN2_HI) - n * LN2_LO
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    half = float(int(n * 0.5))                                      # 2**n = 2**half * 2**(n - half)
    y = p * _pow2(half) * _pow2(n - half)
    if x > EXP_MAX:
        y = float("inf")
    if x < EXP_MIN:
        y = 0.0
    if x != x:
        y = x
    return y


@vjit
def sigmoid64(z):
    """1 / (1 + exp(-z)) without overflow (exp only of -|z|)."""
    e = exp64(-abs(z))
    return 1.0 / (1.0 + e) if z >= 0 else e / (1.0 + e)


@vjit
def tanh64(y):
    """tanh(y) = sign(y) (1 - e) / (1 + e), e = exp(-2|y|); absolute error a few ulp of 1."""
    e = exp64(-2.0 * abs(y))
    t = (1.0 - e) / (1.0 + e)
    return t if y >= 0 else -t


@intrinsic
def _bits_to_float32(typingctx, bits):
    """The float32 whose IEEE bits are the int32 ``bits`` (a bit-cast)."""
    if not isinstance(bits, types.Integer) or bits.bitwidth != 32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(bits), codegen


EXP32_MAX = 88.72283            # largest float32 x with finite exp(x)
EXP32_MIN = -87.33654           # below: exp(x) < smallest normal float32; flushed to 0


@vjit
def exp32(x):
    """exp(x) for float32 x, in float32: 2**n * p(r) as :func:`exp64`, with a degree-7 Taylor
    polynomial on |r| <= ln2/2 (truncation < 6e-9 relative) and float32 Cody-Waite constants:
    within 2 float32 ulp. Same special values as exp64 (NaN -> NaN, -inf -> 0, overflow -> inf,
    subnormal results flushed to 0). For the softmax of the float32 attention tiles, which do 16
    lanes per vector where exp64 does 8."""
    xc = min(max(x, numba.float32(EXP32_MIN)), numba.float32(EXP32_MAX))
    n = numba.float32(numba.int32(xc * numba.float32(LOG2E) + (numba.float32(0.5) if xc >= 0 else numba.float32(-0.5))))
    r = (xc - n * numba.float32(0.693359375)) - n * numba.float32(-2.12194440e-4)
    p = numba.float32(1.0 / 5040.0)
    p = p * r + numba.float32(1.0 / 720.0)
    p = p * r + numba.float32(1.0 / 120.0)
    p = p * r + numba.float32(1.0 / 24.0)
    p = p * r + numba.float32(1.0 / 6.0)
    p = p * r + numba.float32(0.5)
    p = p * r + numba.float32(1.0)
    p = p * r + numba.float32(1.0)
    half = numba.int32(n * numba.float32(0.5))                      # 2**n = 2**half * 2**(n - half)
    y = p * _bits_to_float32(numba.int32((half + 127) << 23))
    y = y * _bits_to_float32(numba.int32((numba.int32(n) - half + 127) << 23))
    if x > numba.float32(EXP32_MAX):
        y = numba.float32(float("inf"))
    if x < numba.float32(EXP32_MIN):
        y = numba.float32(0)
    if x != x:
        y = x
    return y
