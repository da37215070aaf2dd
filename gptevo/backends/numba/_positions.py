"""Position signals, masks and the dense MLPs on numba (spec: spec/ops/embedding.md, attention.md, linear.md).

gelu_mlp and swiglu_mlp are compositions of this backend's own linear / gelu / swiglu kernels.
alibi_slopes is H numbers computed in plain Python at model load (there is nothing to compile).
"""
from __future__ import annotations

import math

import numpy as np

from gptevo.backends.numba._common import jit
from gptevo.backends.numba._elementwise import gelu, swiglu
from gptevo.backends.numba._linear import embedding, linear


def learned_positions(table, positions):
    """Row ``positions[t]`` of a learned position table [P, D] (GPT-2 wpe)."""
    return embedding(table=table, ids=positions)


@jit
def _sinusoidal_kernel(positions, base, out):
    """out[t, j] = sin(p / base**(2i/dim)) for even j = 2i, cos(...) for odd j = 2i + 1."""
    dim = out.shape[1]
    for t in range(positions.shape[0]):
        for j in range(dim):
            angle = positions[t] * base ** (-(2.0 * (j // 2)) / dim)
            out[t, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)


def sinusoidal_positions(positions, dim, base=10000.0, dtype="float32"):
    """The fixed sin/cos table of Vaswani et al. (interleaved), float64 angles, rounded once: [T, dim]."""
    out = np.empty((positions.shape[0], dim), dtype)
    _sinusoidal_kernel(positions.astype(np.float64), base, out)
    return out


def alibi_slopes(num_heads):
    """ALiBi slopes [H] float64: 2**(-8(h+1)/n) for n a power of two, else Press et al.'s interleaving."""
    n = num_heads
    m = 1 << (n.bit_length() - 1)                        # largest power of two <= n
    slopes = [2.0 ** (-8.0 * (h + 1) / m) for h in range(m)]
    slopes += [2.0 ** (-8.0 * (2 * h + 1) / (2 * m)) for h in range(n - m)]
    return np.array(slopes, dtype=np.float64)


@jit
def _alibi_kernel(slopes, q, k, out):
    for h in range(out.shape[0]):
        for t in range(out.shape[1]):
            for s in range(out.shape[2]):
                out[h, t, s] = slopes[h] * (k[s] - q[t])


def alibi_bias(slopes, q_positions, k_positions):
    """``bias[h, t, s] = slopes[h] * (k_s - q_t)``, product in float64, rounded to the slopes' compute dtype."""
    out = np.empty((slopes.shape[0], q_positions.shape[0], k_positions.shape[0]),
                   np.float64 if slopes.dtype == np.float64 else np.float32)
    _alibi_kernel(slopes.astype(np.float64), q_positions.astype(np.float64), k_positions.astype(np.float64), out)
    return out


@jit
def _mask_kernel(q, k, window, out):
    for t in range(out.shape[0]):
        for s in range(out.shape[1]):
            out[t, s] = k[s] >= 0 and k[s] <= q[t] and (window <= 0 or k[s] > q[t] - window)


def attention_mask(q_positions, k_positions, window=None):
    """``visible[t, s] = 0 <= k_s <= q_t and (window is None or k_s > q_t - window)``: bool [T, S]."""
    out = np.empty((q_positions.shape[0], k_positions.shape[0]), np.bool_)
    _mask_kernel(q_positions.astype(np.int64), k_positions.astype(np.int64), 0 if window is None else window, out)
    return out


def gelu_mlp(x, w_fc, b_fc, w_proj, b_proj, approximate):
    """``linear(gelu(linear(x, w_fc, b_fc), approximate), w_proj, b_proj)`` with this backend's kernels."""
    hidden = gelu(linear(x, w_fc, b_fc), approximate=approximate)  # [T,I]
    return linear(hidden, w_proj, b_proj)  # [T,D]


def swiglu_mlp(x, w_gate, w_up, w_down, b_gate=None, b_up=None, b_down=None):
    """``linear(silu(linear(x, w_gate)) * linear(x, w_up), w_down)`` with this backend's kernels."""
    return linear(swiglu(linear(x, w_gate, b_gate), linear(x, w_up, b_up)), w_down, b_down)  # [T,D]
