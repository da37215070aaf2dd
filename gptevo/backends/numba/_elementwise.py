"""Norms and activations on numba (spec: spec/ops/norms.md, spec/ops/activations.md).

Row kernels loop over the rows of x viewed as [N, D]; elementwise kernels over the flattened
array. They are serial: at model sizes they are a small fraction of a step and a parallel region
would cost more than it saves at decode (T = 1).
Intermediates (row sums, sigmoids, erf) are float64 and each output is rounded once to the compute
dtype when stored, so a float32 result is at least as accurate as the reference's. Norm weights
and biases are [D] vectors, widened once in the wrapper (a negligible read next to x).
"""
from __future__ import annotations

import math

import numpy as np

from gptevo.backends.numba._common import as_compute, compute_dtype, jit, real, small_vector
from gptevo.backends.numba._vmath import sigmoid64, tanh64
from gptevo.errors import RequestError


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


def _norm_input(x):
    x = np.asarray(x)
    if x.ndim < 1 or x.shape[-1] == 0:
        raise RequestError(f"x must have a non-empty last axis [..., D]; found shape {x.shape}")
    dtype = compute_dtype(x)
    return as_compute(x, dtype, "x").reshape(-1, x.shape[-1]), dtype, x.shape


def _eps(eps) -> float:
    eps = real(eps, "eps")
    if eps < 0:
        raise RequestError(f"eps must be >= 0; found {eps!r}")
    return eps


def rms_norm(x, weight, eps, offset=0.0):
    """RMSNorm over the last axis: ``x / sqrt(mean(x^2) + eps) * (offset + weight)``."""
    x2, dtype, shape = _norm_input(x)
    eps, offset = _eps(eps), real(offset, "offset")
    w = small_vector(weight, np.float64, (shape[-1],), "weight")
    out = np.empty(x2.shape, dtype)
    _rms_norm_rows(x2, w, eps, offset, out)
    return out.reshape(shape)


def layer_norm(x, weight, bias, eps):
    """LayerNorm over the last axis: ``(x - mean) / sqrt(var + eps) * weight + bias`` (bias may be None)."""
    x2, dtype, shape = _norm_input(x)
    eps = _eps(eps)
    w = small_vector(weight, np.float64, (shape[-1],), "weight")
    b = np.zeros(1) if bias is None else small_vector(bias, np.float64, (shape[-1],), "bias")
    out = np.empty(x2.shape, dtype)
    _layer_norm_rows(x2, w, b, bias is not None, eps, out)
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


def silu(x):
    """``x * sigmoid(x)``, elementwise, in x's compute dtype."""
    arr = np.asarray(x)
    dtype = compute_dtype(arr)
    flat = as_compute(arr, dtype, "silu: x").reshape(-1)
    out = np.empty(flat.shape, dtype)
    _silu_flat(flat, out)
    return out.reshape(arr.shape)


def gelu(x, approximate="none"):
    """GELU: erf form ``x * erfc(-x/sqrt 2)/2`` or the tanh form, computed in float64 (math.erfc, math.tanh)."""
    if approximate not in ("none", "tanh"):
        raise RequestError(f'approximate must be "none" or "tanh"; found {approximate!r}')
    arr = np.asarray(x)
    dtype = compute_dtype(arr)
    flat = as_compute(arr, dtype, "gelu: x").reshape(-1)
    out = np.empty(flat.shape, dtype)
    _gelu_flat(flat, approximate == "tanh", out)
    return out.reshape(arr.shape)


def swiglu(gate, up):
    """``silu(gate) * up``, elementwise (float64 if either input is float64)."""
    g, u = np.asarray(gate), np.asarray(up)
    if g.shape != u.shape:
        raise RequestError(f"swiglu: gate has shape {g.shape} but up has shape {u.shape}; they must match")
    dtype = compute_dtype(g, u)
    out = np.empty(g.size, dtype)
    _swiglu_flat(as_compute(g, dtype, "swiglu: gate").reshape(-1), as_compute(u, dtype, "swiglu: up").reshape(-1),
                 out)
    return out.reshape(g.shape)


def clamped_swiglu(h, alpha=1.702, limit=7.0):
    """gpt-oss expert activation on interleaved columns: [..., 2I] -> [..., I]."""
    alpha = real(alpha, "clamped_swiglu: alpha")
    limit = real(limit, "clamped_swiglu: limit")
    arr = np.asarray(h)
    if arr.ndim < 1 or arr.shape[-1] % 2:
        raise RequestError(f"clamped_swiglu: h must have an even last axis [..., 2I] (gate and linear "
                           f"columns interleaved); found shape {arr.shape}")
    dtype = compute_dtype(arr)
    h2 = as_compute(arr, dtype, "clamped_swiglu: h").reshape(-1, arr.shape[-1])
    out = np.empty((h2.shape[0], arr.shape[-1] // 2), dtype)
    _clamped_swiglu_rows(h2, alpha, limit, out)
    return out.reshape(*arr.shape[:-1], arr.shape[-1] // 2)
