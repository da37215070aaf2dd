"""softmax, attention and RoPE on numba (spec: spec/ops/attention.md, spec/ops/rope.md).

attention runs key tiles with an online softmax (``_attention_flash``: one parallel item per KV
head and block of queries; ``_attention_tiles``: the float32 prefill path in SIMD tiles). Nothing
of size [H,T,S] is materialised. k and v stored as f16/bf16 (a KV cache) are widened to the
compute dtype in the wrapper. The
wrappers receive arguments checked and defaulted by the registry (gptevo/ops/, spec/backends.md).
"""
from __future__ import annotations

import math

import numpy as np

from gptevo.backends.numba._common import as_compute, compute_dtype, jit
from gptevo.backends.numba._attention_flash import attention_flash


@jit
def _softmax_row(x, has_sink, sink, out):
    """out = exp(x - m) / (sum exp(x - m) + [exp(sink - m)]), m = max(x, sink); all -inf row -> zeros.

    NaN in x propagates like the reference (NaN max -> every output NaN).
    """
    n = x.shape[0]
    m = -np.inf
    for j in range(n):
        v = float(x[j])
        if v != v:
            m = v
            break
        if v > m:
            m = v
    if has_sink and sink > m:
        m = sink
    if not math.isfinite(m):
        m = 0.0
    denom = 0.0
    for j in range(n):
        e = math.exp(float(x[j]) - m)
        out[j] = e
        denom += e
    if has_sink:
        denom += math.exp(sink - m)
    if not denom > 0:              # all masked (0) or NaN: divide by 1, as the reference does
        denom = 1.0
    for j in range(n):
        out[j] = out[j] / denom


@jit
def _softmax_rows(x, sinks, has_sink, out):
    for i in range(x.shape[0]):
        buf = np.empty(x.shape[1])                                # [S] float64
        _softmax_row(x[i], has_sink, sinks[i] if has_sink else 0.0, buf)
        for j in range(x.shape[1]):
            out[i, j] = buf[j]


def softmax(x, sinks=None):
    """Softmax over the last axis; ``sinks`` (one raw logit per row) broadcast to ``x.shape[:-1]``."""
    arr = x
    dtype = compute_dtype(arr)
    x2 = as_compute(arr, dtype, "softmax: x").reshape(-1, arr.shape[-1]) if arr.shape[-1] else None
    if x2 is None:
        return np.zeros(arr.shape, dtype)
    if sinks is None:
        s = np.zeros(1)
    else:
        s = np.broadcast_to(np.asarray(sinks).astype(dtype).astype(np.float64), arr.shape[:-1]).reshape(-1)
        s = np.ascontiguousarray(s)
    out = np.empty(x2.shape, dtype)
    _softmax_rows(x2, s, sinks is not None, out)
    return out.reshape(arr.shape)


def attention(q, k, v, q_positions=None, k_positions=None, window=None, sinks=None, scale=None,
              alibi_slopes=None):
    """Softmax attention with GQA, causal/sliding-window masks from positions, sinks and ALiBi.

    Same contract as the reference (``gptevo.ops.attention.attention``): [T,H,Dh], [S,G,Dh], [S,G,Dv]
    -> [T,H,Dv]; positions default to the last T of 0..S-1; ``scale`` defaults to 1/sqrt(Dh).
    """
    qpos, kpos = q_positions, k_positions          # checked and defaulted by the registry
    n_q, n_heads, head_dim = q.shape
    n_k, n_kv, _ = k.shape
    per_head = {}
    for name, value in (("sinks", sinks), ("alibi_slopes", alibi_slopes)):
        per_head[name] = np.zeros(1) if value is None else np.asarray(value).astype(np.float64)
    dtype = compute_dtype(q)
    out = np.empty((n_q, n_heads, v.shape[2]), dtype)
    if sinks is not None:   # the reference rounds sinks to the compute dtype first
        per_head["sinks"] = per_head["sinks"].astype(dtype).astype(np.float64)
    if alibi_slopes is not None:
        per_head["alibi_slopes"] = per_head["alibi_slopes"].astype(dtype).astype(np.float64)
    attention_flash(as_compute(q, dtype, "attention: q"), as_compute(k, dtype, "attention: k"),
                    as_compute(v, dtype, "attention: v"), qpos.astype(np.int64), kpos.astype(np.int64),
                    0 if window is None else window, per_head["sinks"] if sinks is not None else None,
                    per_head["alibi_slopes"] if alibi_slopes is not None else None, float(dtype.type(scale)), out)
    return out


# ------------------------------------------------------------------------------------------
# RoPE

@jit
def _cos_sin_kernel(positions, inv_freq, factor, cos, sin):
    """angle = float(p) * inv_freq in the compute dtype (cos's dtype), cos/sin in float64, x factor."""
    for t in range(positions.shape[0]):
        for i in range(inv_freq.shape[0]):
            cos[t, i] = positions[t]          # round p to the compute dtype, as the reference does
            angle = cos[t, i] * inv_freq[i]
            cos[t, i] = math.cos(float(angle))
            sin[t, i] = math.sin(float(angle))
            cos[t, i] = cos[t, i] * factor
            sin[t, i] = sin[t, i] * factor


def rope_cos_sin(positions, inv_freq, attention_factor=1.0):
    """cos and sin of ``angle[t, i] = p_t * inv_freq[i]`` times ``attention_factor``: two [T, R/2]."""
    pos, inv = positions, inv_freq
    dtype = compute_dtype(inv)
    cos = np.empty((pos.shape[0], inv.shape[0]), dtype)
    sin = np.empty((pos.shape[0], inv.shape[0]), dtype)
    _cos_sin_kernel(pos.astype(np.int64), as_compute(inv, dtype, "inv_freq"), dtype.type(attention_factor), cos, sin)
    return cos, sin


@jit
def _rope_kernel(x, cos, sin, interleaved, out):
    """Rotate pairs (a, b) of the first R = 2*cos.shape[1] dims; the rest are copied."""
    n_t, n_h, head_dim = x.shape
    half = cos.shape[1]
    for item in range(n_t * n_h):
        t = item // n_h
        h = item % n_h
        for d in range(2 * half, head_dim):
            out[t, h, d] = x[t, h, d]
        for i in range(half):
            ia = 2 * i if interleaved else i
            ib = 2 * i + 1 if interleaved else i + half
            a = x[t, h, ia]
            b = x[t, h, ib]
            out[t, h, ia] = a * cos[t, i] - b * sin[t, i]
            out[t, h, ib] = b * cos[t, i] + a * sin[t, i]


def apply_rope(x, cos, sin, interleaved=False):
    """Rotate the first R dims of every head: half-split (NeoX/HF) or interleaved (GPT-J) pairs."""
    dtype = compute_dtype(x)
    out = np.empty(x.shape, dtype)
    _rope_kernel(as_compute(x, dtype, "apply_rope: x"), as_compute(cos, dtype, "cos"), as_compute(sin, dtype, "sin"),
                 interleaved, out)
    return out
