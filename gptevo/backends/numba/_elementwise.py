"""Norms and activations on numba (spec: spec/ops/norms.md, spec/ops/activations.md).

Row kernels loop over the rows of x viewed as [N, D]; elementwise kernels over the flattened
array. They are serial at decode sizes (a parallel region would cost more than it saves at T = 1);
inputs of at least ``PARALLEL_VALUES`` values (prefill) run in parallel chunks of rows or values.
Arguments arrive checked by the registry.
Intermediates (row sums, sigmoids, erf) are float64 and each output is rounded once to the compute
dtype when stored, so a float32 result is at least as accurate as the reference's. Norm weights
and biases are [D] vectors, widened once in the wrapper (a negligible read next to x).
"""
from __future__ import annotations

import math

import numpy as np

from gptevo.backends.numba._common import as_compute, compute_dtype, jit, pjit, prange, small_vector
from gptevo.backends.numba._vmath import sigmoid64, tanh64


PARALLEL_VALUES = 1 << 16     # values below which one thread is faster than a parallel region


# ------------------------------------------------------------------------------------------
# norms

@jit
def _sum(a, n):
    """sum_j a[j] in float64, four partial sums."""
    s0 = s1 = s2 = s3 = 0.0
    n4 = n - n % 4
    for j in range(0, n4, 4):
        s0 += a[j]
        s1 += a[j + 1]
        s2 += a[j + 2]
        s3 += a[j + 3]
    for j in range(n4, n):
        s0 += a[j]
    return (s0 + s1) + (s2 + s3)


@jit
def _rms_norm_rows(x, w, eps, offset, out):
    """out[i] = x[i] / sqrt(mean(x[i]^2) + eps) * (offset + w), per row of x [N,D]."""
    d = x.shape[1]
    for i in range(x.shape[0]):
        row = x[i]
        sq = 0.0
        for j in range(d):
            sq += float(row[j]) * float(row[j])
        denom = math.sqrt(sq / d + eps)
        for j in range(d):
            out[i, j] = row[j] / denom * (offset + w[j])


@jit
def _layer_norm_rows(x, w, b, has_bias, eps, out):
    """out[i] = (x[i] - mean) / sqrt(var + eps) * w + b, biased variance, two passes."""
    d = x.shape[1]
    for i in range(x.shape[0]):
        row = x[i]
        mean = _sum(row, d) / d
        var = 0.0
        for j in range(d):
            c = row[j] - mean
            var += c * c
        denom = math.sqrt(var / d + eps)
        for j in range(d):
            y = (row[j] - mean) / denom * w[j]
            out[i, j] = y + b[j] if has_bias else y


NORM_ROWS_PER_ITEM = 16      # rows per parallel item of the norms (prefill)


@pjit
def _rms_norm_par(x, w, eps, offset, out):
    for c in prange((x.shape[0] + NORM_ROWS_PER_ITEM - 1) // NORM_ROWS_PER_ITEM):
        a, b = c * NORM_ROWS_PER_ITEM, min(x.shape[0], (c + 1) * NORM_ROWS_PER_ITEM)
        _rms_norm_rows(x[a:b], w, eps, offset, out[a:b])


@pjit
def _layer_norm_par(x, w, b, has_bias, eps, out):
    for c in prange((x.shape[0] + NORM_ROWS_PER_ITEM - 1) // NORM_ROWS_PER_ITEM):
        a, e = c * NORM_ROWS_PER_ITEM, min(x.shape[0], (c + 1) * NORM_ROWS_PER_ITEM)
        _layer_norm_rows(x[a:e], w, b, has_bias, eps, out[a:e])


def _norm_input(x):
    """(x as rows [N, D] of its compute dtype, that dtype, x's shape)."""
    dtype = compute_dtype(x)
    return as_compute(x, dtype, "x").reshape(-1, x.shape[-1]), dtype, x.shape


def rms_norm(x, weight, eps, offset=0.0):
    """RMSNorm over the last axis: ``x / sqrt(mean(x^2) + eps) * (offset + weight)``."""
    x2, dtype, shape = _norm_input(x)
    w = small_vector(weight, np.float64)
    out = np.empty(x2.shape, dtype)
    (_rms_norm_par if x2.size >= PARALLEL_VALUES else _rms_norm_rows)(x2, w, eps, offset, out)
    return out.reshape(shape)


def layer_norm(x, weight, bias, eps):
    """LayerNorm over the last axis: ``(x - mean) / sqrt(var + eps) * weight + bias`` (bias may be None)."""
    x2, dtype, shape = _norm_input(x)
    w = small_vector(weight, np.float64)
    b = np.zeros(1) if bias is None else small_vector(bias, np.float64)
    out = np.empty(x2.shape, dtype)
    (_layer_norm_par if x2.size >= PARALLEL_VALUES else _layer_norm_rows)(x2, w, b, bias is not None, eps, out)
    return out.reshape(shape)


# ------------------------------------------------------------------------------------------
# activations (scalar float64 functions + flat kernels)

@jit
def sigmoid(z):
    """1 / (1 + exp(-z)) in float64 without overflow (exp only of -|z|; vectorizable, see _vmath)."""
    return sigmoid64(z)


@jit
def silu1(z):
    return z * sigmoid(z)


@jit
def clamped_swiglu1(gate, lin, alpha, limit):
    """gpt-oss: min(gate, limit) * sigmoid(alpha * that) * (clip(lin, -limit, limit) + 1)."""
    g = min(gate, limit)
    li = max(min(lin, limit), -limit)
    return g * sigmoid(alpha * g) * (li + 1.0)


@jit
def _silu_flat(x, out):
    for i in range(x.shape[0]):
        out[i] = silu1(float(x[i]))


@jit
def _gelu_flat(x, tanh_form, out):
    c = math.sqrt(2.0 / math.pi)
    for i in range(x.shape[0]):
        v = float(x[i])
        if tanh_form:
            out[i] = 0.5 * v * (1.0 + tanh64(c * (v + 0.044715 * v * v * v)))
        else:
            out[i] = v * 0.5 * math.erfc(-v / math.sqrt(2.0))


@jit
def _swiglu_flat(gate, up, out):
    for i in range(gate.shape[0]):
        out[i] = silu1(float(gate[i])) * up[i]


@jit
def _clamped_swiglu_rows(h, alpha, limit, out):
    """h [N,2I] interleaved (gate = even, linear = odd columns) -> out [N,I]."""
    for n in range(h.shape[0]):
        for i in range(out.shape[1]):
            out[n, i] = clamped_swiglu1(float(h[n, 2 * i]), float(h[n, 2 * i + 1]), alpha, limit)


CHUNK = 1 << 14               # values per parallel item


@pjit
def _silu_par(x, out):
    for c in prange((x.shape[0] + CHUNK - 1) // CHUNK):
        _silu_flat(x[c * CHUNK:(c + 1) * CHUNK], out[c * CHUNK:(c + 1) * CHUNK])


@pjit
def _gelu_par(x, tanh_form, out):
    for c in prange((x.shape[0] + CHUNK - 1) // CHUNK):
        _gelu_flat(x[c * CHUNK:(c + 1) * CHUNK], tanh_form, out[c * CHUNK:(c + 1) * CHUNK])


@pjit
def _swiglu_par(gate, up, out):
    for c in prange((gate.shape[0] + CHUNK - 1) // CHUNK):
        _swiglu_flat(gate[c * CHUNK:(c + 1) * CHUNK], up[c * CHUNK:(c + 1) * CHUNK], out[c * CHUNK:(c + 1) * CHUNK])


def silu(x):
    """``x * sigmoid(x)``, elementwise, in x's compute dtype."""
    dtype = compute_dtype(x)
    flat = as_compute(x, dtype, "silu: x").reshape(-1)
    out = np.empty(flat.shape, dtype)
    (_silu_par if flat.size >= PARALLEL_VALUES else _silu_flat)(flat, out)
    return out.reshape(x.shape)


def gelu(x, approximate="none"):
    """GELU: erf form ``x * erfc(-x/sqrt 2)/2`` or the tanh form, computed in float64 (math.erfc, math.tanh)."""
    dtype = compute_dtype(x)
    flat = as_compute(x, dtype, "gelu: x").reshape(-1)
    out = np.empty(flat.shape, dtype)
    (_gelu_par if flat.size >= PARALLEL_VALUES else _gelu_flat)(flat, approximate == "tanh", out)
    return out.reshape(x.shape)


def swiglu(gate, up):
    """``silu(gate) * up``, elementwise (float64 if either input is float64)."""
    dtype = compute_dtype(gate, up)
    out = np.empty(gate.size, dtype)
    kernel = _swiglu_par if gate.size >= PARALLEL_VALUES else _swiglu_flat
    kernel(as_compute(gate, dtype, "swiglu: gate").reshape(-1), as_compute(up, dtype, "swiglu: up").reshape(-1), out)
    return out.reshape(gate.shape)


def clamped_swiglu(h, alpha=1.702, limit=7.0):
    """gpt-oss expert activation on interleaved columns: [..., 2I] -> [..., I]."""
    dtype = compute_dtype(h)
    h2 = as_compute(h, dtype, "clamped_swiglu: h").reshape(-1, h.shape[-1])
    out = np.empty((h2.shape[0], h.shape[-1] // 2), dtype)
    _clamped_swiglu_rows(h2, alpha, limit, out)
    return out.reshape(*h.shape[:-1], h.shape[-1] // 2)
