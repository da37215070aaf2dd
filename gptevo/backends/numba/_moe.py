"""Mixture of Experts on numba: routing, the expert MLPs, combining (spec: spec/ops/moe.md).

moe_experts sorts the (token, slot) pairs by expert and runs :func:`grouped_gemm` twice: each
used expert's rows of ``w_gate_up`` and then ``w_down`` are read (and, for MXFP4, decoded row by row
in the kernel) once per call, however many tokens chose that expert; unused experts are never
touched. The activation and the weighted sum are small kernels of their own.

Decode (T = 1) with MXFP4 expert weights in float32 on a CPU with AVX-512 takes
:func:`_moe_decode_mxfp4` instead: ``_mxfp4_gemv.mxfp4_gemv`` for gate_up of all k experts in one
parallel call, the activation, down for all k in one call, the weighted sum. Its mode is "exact"
(default) or "int8" (a weight prepared with ``_mxfp4_gemv.prepare(w, mode="int8")``, or
``_mxfp4_gemv.set_default_mode("int8")``); see spec/backends.md, "MXFP4 decode kernels".
The wrappers receive arguments checked by the registry (gptevo/ops/moe.py's checks).
"""
from __future__ import annotations

import math

import numpy as np
from numba import prange

from gptevo.backends.numba._common import as_compute, chunk_rows, compute_dtype, jit, pjit, run_parallel
from gptevo.backends.numba._elementwise import clamped_swiglu1, silu1
from gptevo.backends.numba._linear import grouped_gemm
from gptevo.backends.numba._weights import is_mxfp4, operand


@jit
def _route_kernel(z, k, softmax_first, renormalize, weights, ids):
    """Per row of z [T,E]: the k largest (ties: lower index first) and their weights."""
    n_e = z.shape[1]
    chosen = np.zeros(n_e, np.bool_)
    for t in range(z.shape[0]):
        chosen[:] = False
        for j in range(k):
            best = -1
            for e in range(n_e):
                if not chosen[e] and (best < 0 or z[t, e] > z[t, best]):
                    best = e
            chosen[best] = True
            ids[t, j] = best
        if softmax_first:                                      # p = softmax over all E, keep top k
            m = -np.inf
            for e in range(n_e):
                m = max(m, float(z[t, e]))
            m = m if math.isfinite(m) else 0.0
            denom = 0.0
            for e in range(n_e):
                denom += math.exp(float(z[t, e]) - m)
            total = 0.0
            for j in range(k):
                weights[t, j] = math.exp(float(z[t, ids[t, j]]) - m) / denom
                total += weights[t, j]
            if renormalize:
                for j in range(k):
                    weights[t, j] = weights[t, j] / total
        else:                                                  # softmax over the k kept logits
            m = float(z[t, ids[t, 0]])
            m = m if math.isfinite(m) else 0.0
            denom = 0.0
            for j in range(k):
                denom += math.exp(float(z[t, ids[t, j]]) - m)
            for j in range(k):
                weights[t, j] = math.exp(float(z[t, ids[t, j]]) - m) / denom


def moe_route(logits, k, order="softmax_topk", renormalize=False):
    """(weights [T,k] compute dtype, ids [T,k] int64), rows sorted by descending weight."""
    arr = logits
    dtype = compute_dtype(arr)
    z = as_compute(arr, dtype, "moe_route: logits")
    weights = np.empty((arr.shape[0], int(k)), dtype)
    ids = np.empty((arr.shape[0], int(k)), np.int64)
    _route_kernel(z, int(k), order == "softmax_topk", bool(renormalize), weights, ids)
    return weights, ids


@jit
def _combine_kernel(y, pair_of, weights, out):
    """out[t] += sum_j weights[t, j] * y[pair_of[t, j]], slots summed in order (out starts at zero)."""
    for t in range(out.shape[0]):
        for j in range(weights.shape[1]):
            p = pair_of[t, j]
            w = weights[t, j]
            for d in range(out.shape[1]):
                out[t, d] += w * y[p, d]


def moe_combine(expert_out, weights):
    """out[t] = sum_j weights[t, j] * expert_out[t, j], summed over the k slots in order."""
    y, w = expert_out, weights
    dtype = compute_dtype(y)
    n_t, k, d = y.shape
    out = np.zeros((n_t, d), dtype)
    pair_of = np.arange(n_t * k, dtype=np.int64).reshape(n_t, k)
    _combine_kernel(as_compute(y, dtype, "expert_out").reshape(n_t * k, d), pair_of,
                    as_compute(w, dtype, "weights"), out)
    return out


@pjit
def _expert_activation(h, clamped, alpha, limit, out):
    """h [P,2I] -> out [P,I]: swiglu (gate = first I columns, up = last I) or gpt-oss clamped_swiglu;
    rows over the threads (a batch of 8 gpt-oss tokens: 32 rows of 2880, 0.25 ms on one thread)."""
    n_i = out.shape[1]
    for p in prange(h.shape[0]):
        for i in range(n_i):
            if clamped:
                out[p, i] = clamped_swiglu1(float(h[p, 2 * i]), float(h[p, 2 * i + 1]), alpha, limit)
            else:
                out[p, i] = silu1(float(h[p, i])) * h[p, n_i + i]


def moe_experts(x, weights, ids, w_gate_up, b_gate_up, w_down, b_down, activation="swiglu",
                alpha=1.702, limit=7.0):
    """The routed expert MLPs and their weighted sum (b_down added before weighting, as gpt-oss)."""
    act = activation
    x_arr, ids_arr, w_arr = x, ids, weights          # checked by the registry (ids in 0..E-1)
    dtype = compute_dtype(x_arr)
    gu, gu_loader, gu_dot, gu_shape = operand(w_gate_up, dtype, 3, "moe_experts: w_gate_up")
    dn, dn_loader, dn_dot, dn_shape = operand(w_down, dtype, 3, "moe_experts: w_down")
    n_e, two_i, d = gu_shape
    from gptevo.backends.numba._linear import bias_operand

    b_gu, has_b_gu = bias_operand(b_gate_up, n_e, two_i, dtype, "moe_experts: b_gate_up")
    b_dn, has_b_dn = bias_operand(b_down, n_e, d, dtype, "moe_experts: b_down")

    n_t, k = ids_arr.shape
    if n_t == 1 and dtype == np.float32 and is_mxfp4(w_gate_up) and is_mxfp4(w_down) and _decode_kernels_ok():
        return _moe_decode_mxfp4(as_compute(x_arr, dtype, "moe_experts: x"),
                                 as_compute(w_arr, dtype, "moe_experts: weights"), ids_arr.astype(np.int64),
                                 w_gate_up, w_down, b_gu if has_b_gu else None,
                                 b_dn if has_b_dn else None, act == "clamped_swiglu", alpha, limit)
    if n_t > 1 and dtype == np.float32 and is_mxfp4(w_gate_up) and is_mxfp4(w_down) and _decode_kernels_ok():
        from gptevo.backends.numba import _mxfp4_gemv as mg
        from gptevo.backends.numba._moe_grouped import moe_grouped_mxfp4

        from gptevo.backends.numba._gemm_small import MAX_ROWS

        mode = mg.weight_mode(w_gate_up, w_down)
        if mode == "int8" and n_t > MAX_ROWS:
            mode = "exact"        # prefill: float activations, as the dense rows' BLAS path (spec/ops/int8.md)
        clamped = act == "clamped_swiglu"
        return moe_grouped_mxfp4(
            as_compute(x_arr, dtype, "moe_experts: x"), as_compute(w_arr, dtype, "moe_experts: weights"),
            ids_arr.astype(np.int64), w_gate_up, w_down, b_gu if has_b_gu else None, b_dn if has_b_dn else None,
            activate=lambda h, a: _expert_activation(h, clamped, alpha, limit, a),
            combine=_combine_kernel,
            gemv=lambda blocks, scales, experts, xr, bias: mg.mxfp4_gemv(blocks, scales, experts, xr, mode=mode,
                                                                         bias=bias),
            mode=mode)
    flat = ids_arr.reshape(-1).astype(np.int64)                             # [T*k] expert of each pair
    order = np.argsort(flat, kind="stable")                                 # pairs grouped by expert
    experts, counts = np.unique(flat[order], return_counts=True)            # [U], [U]
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)      # [U+1]
    tokens = (order // max(k, 1)).astype(np.int64)                          # [P] input row of pair p
    xs = as_compute(x_arr, dtype, "moe_experts: x")                         # [T,D]
    zero = dtype.type(0)

    h = np.empty((flat.size, two_i), dtype)                                 # [P,2I]
    work = experts.size * two_i * d * max(flat.size // max(experts.size, 1), 8) // 8   # weight-row work
    experts = experts.astype(np.int64)
    run_parallel(grouped_gemm, work, xs, tokens, starts, experts, gu, gu_loader, gu_dot, b_gu, has_b_gu, h,
                 chunk_rows(two_i, experts.size), zero)
    a = np.empty((flat.size, two_i // 2), dtype)                            # [P,I]
    _expert_activation(h, act == "clamped_swiglu", alpha, limit, a)
    y = np.empty((flat.size, d), dtype)                                     # [P,D]
    run_parallel(grouped_gemm, work // 2, a, np.arange(flat.size, dtype=np.int64), starts, experts,
                 dn, dn_loader, dn_dot, b_dn, has_b_dn, y, chunk_rows(d, experts.size), zero)
    pair_of = np.empty(flat.size, np.int64)
    pair_of[order] = np.arange(flat.size)                                   # pair index of (t, j)
    out = np.zeros((n_t, d), dtype)                                         # [T,D]
    _combine_kernel(y, pair_of.reshape(n_t, k), as_compute(w_arr, dtype, "moe_experts: weights"), out)
    return out


def _decode_kernels_ok() -> bool:
    """True when the explicit-SIMD MXFP4 decode kernels can run here (AVX-512 F/BW)."""
    from gptevo.backends.numba import _simd

    return _simd.has_avx512()


def _moe_decode_mxfp4(x, weights, ids, w_gate_up, w_down, b_gu, b_dn, clamped, alpha, limit):
    """moe_experts for one token with MXFP4 experts: two mxfp4_gemv calls over all k experts."""
    from gptevo.backends.numba import _mxfp4_gemv as mg

    mode = mg.weight_mode(w_gate_up, w_down)
    experts = ids[0]                                                        # [k]
    h = mg.mxfp4_gemv(w_gate_up.blocks, w_gate_up.scales, experts, x, mode=mode, bias=b_gu)   # [k,2I]
    a = np.empty((h.shape[0], h.shape[1] // 2), np.float32)                 # [k,I]
    _expert_activation(h, clamped, alpha, limit, a)
    y = mg.mxfp4_gemv(w_down.blocks, w_down.scales, experts, a, mode=mode, bias=b_dn)        # [k,D]
    out = np.zeros((1, y.shape[1]), np.float32)                             # [1,D]
    _combine_kernel(y, np.arange(y.shape[0], dtype=np.int64).reshape(1, -1), weights, out)
    return out
