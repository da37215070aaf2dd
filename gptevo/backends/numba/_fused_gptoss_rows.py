"""The batched fused step of gpt-oss-style models: B sequences, one new token each, in one region.

What ``GptOssStep.rows`` runs (``Model.forward_batch`` and the batch decoder take it for B >= 2),
in two compile-time forms: bfloat16 dense weights with exact-mode MXFP4 experts (the default
load), and the int8 mode (Q8 dense weights, int8-activation experts); a mix of the two returns
None and the model runs the ops. It computes what the op path computes for the same rows, with the
same kernels per piece (``_fused_tiles``: the ``linear`` tiles, or ``_gemv_q8.rows_q8_multi``;
``_moe_region.half_items``: the grouped expert products, with the op's rule for streaming, tiling
or int8 rows), so the logits equal the op path's up to the summation
order of attention (``attend_heads``, as the one-token step); in int8 mode an input that differs
in its last bit can round one int8 value differently, as in the one-token step.

Per layer, between barriers: (1) every thread normalizes all rows, then its share of the q|k|v
weight rows times every row; (2) items (sequence, KV group): RoPE of the group's q heads and its k
head, k and v into the sequence's cache slot (ring slots on sliding layers), attention of the
group's query heads; (3) the output projection's share, residual; (4) every thread normalizes all
rows, its share of the router rows; (5) every thread routes every row (top-k, then the pairs
(row, slot) grouped by expert in (row, slot) order, as ``moe_grouped_mxfp4`` sorts them) and lays out
its own copy of the normalized rows in pair order; gate_up items (expert group, chunk of weight
rows) from a shared counter; (6) the clamped SwiGLU of a share of the pairs, written in the
down projection's input layout; (7) down items from a second counter; (8) per share of the model
dims, each row's weighted sum of its k expert outputs (slot order) and the residual. Then the final
norm and the head. Python between layers, one region per op and the per-sequence attention calls
are gone: at 8 sequences of gpt-oss-20b they were 30-50 ms of a 540 ms step.
"""
from __future__ import annotations

import functools

import numba
import numpy as np
from numba import prange

from gptevo.backends.numba._atomics import barrier, rendezvous
from gptevo.backends.numba._elementwise import _rms_norm_rows, clamped_swiglu1
from gptevo.backends.numba._fused_rows import attend_heads, rope_heads
from gptevo.backends.numba._fused_tiles import add_columns, share, tile_share
from gptevo.backends.numba._moe import _route_kernel
from gptevo.backends.numba._gemv_q8 import quantize_row, rows_q8_multi
from gptevo.backends.numba._moe_region import half_items, item_rows
from gptevo.backends.numba._mxfp4_gemv import _quantize_rows
from gptevo.backends.numba._simd import pointer_like

_OPTS = dict(cache=True, fastmath=False, error_model="numpy", nogil=True)


@numba.njit(**_OPTS)
def _group_pairs(rid, n_experts, counts, experts, starts, pair_row, pair_of):
    """The (row, slot) pairs of rid [B,k] grouped by expert, in (row, slot) order within a group:
    experts[u] the u-th used expert (ascending), starts[u]..starts[u+1] its pairs, pair_row [P] the
    row of each grouped pair, pair_of [B,k] each pair's grouped index. Returns the group count U."""
    n_b, k = rid.shape
    counts[:] = 0
    for b in range(n_b):
        for j in range(k):
            counts[rid[b, j]] += 1
    n_groups = 0
    starts[0] = 0
    for e in range(n_experts):
        if counts[e] > 0:
            experts[n_groups] = e
            starts[n_groups + 1] = starts[n_groups] + counts[e]
            counts[e] = starts[n_groups]                 # from here: the next free index of expert e
            n_groups += 1
    for b in range(n_b):
        for j in range(k):
            p = counts[rid[b, j]]
            counts[rid[b, j]] = p + 1
            pair_row[p] = b
            pair_of[b, j] = p
    return n_groups


@numba.njit(**_OPTS)
def _quantize_all(x, xq, xs, xc):
    """Each row of x [B,K] as ``_gemv_q8.quantize_row`` quantizes it (the Q8 input of the dense rows)."""
    for b in range(x.shape[0]):
        quantize_row(x[b], xq[b], xs[b], xc[b])


@numba.njit(**_OPTS)
def _q8_share(w, ws, xq, xs, xc, bias, has_bias, t, n_threads, out, pick):
    """Thread t's share of the Q8 product ``out = x @ w.T (+ bias)`` (rows_q8_multi); returns (lo, hi)."""
    lo, hi = share(w.shape[0], t, n_threads)
    rows_q8_multi(w, ws, xq, xs, xc, bias, has_bias, lo, hi, out, pick)
    return lo, hi


@numba.njit(**_OPTS)
def _activate_pairs(hbuf, p_lo, p_hi, alpha, limit, permuted, ap):
    """ap[p] = clamped SwiGLU of hbuf[p] (gate = even, linear = odd columns) for pairs [p_lo, p_hi),
    with ``permuted`` laid out as ``_moe_tiles.permute_rows`` (per 32-value block its 16 even
    elements, then the odd: the exact experts' input), else in order (the int8 rows quantize it)."""
    n_i = ap.shape[1]
    for p in range(p_lo, p_hi):
        for b in range(n_i // 32):
            for i in range(16):
                for half in range(2):
                    j = 32 * b + 2 * i + half
                    c = 32 * b + 16 * half + i if permuted else j
                    ap[p, c] = clamped_swiglu1(float(hbuf[p, 2 * j]), float(hbuf[p, 2 * j + 1]), alpha, limit)


@numba.njit(**_OPTS)
def _combine_share(xb, y, rw, pair_of, lo, hi):
    """xb[b, r] += sum_j rw[b, j] * y[pair_of[b, j], r] (slots in order, from zero) for r in [lo, hi)."""
    for b in range(xb.shape[0]):
        for r in range(lo, hi):
            acc = np.float32(0)
            for j in range(rw.shape[1]):
                acc += rw[b, j] * y[pair_of[b, j], r]
            xb[b, r] += acc


def _make_rows(int8: bool):
    """The batched step for bf16 dense + exact experts, or the int8 mode (a compile-time constant)."""

    def step_rows(xb, pos, waddr, lm_head, lm_head_s, u16_like, u8_like, ln1, ln2, lnf, bqkv, bo, rbias, sinks,
                  has_sinks, gu_bias, dn_bias, has_expert_bias, kv_addr, slots, windows, cos, sin, interleaved, eps,
                  offset, scale, n_heads, n_kv, head_dim, top_k, softmax_first, renormalize, alpha, limit,
                  min_item_rows, qkv, o, tmp, z, hbuf, ap, y, aqe, aqo, asl, acorr, asb, logits, table, powers,
                  const, pick, sync, work, n_threads):
        """xb [B,D] float32: row b sequence b's token embedding (updated in place); pos [B]; waddr [L,9],
        lm_head and lm_head_s as the one-token step; kv_addr [B,L,3] each sequence's cache keys, values
        and slot positions with slots [B,L]; cos / sin [B,R/2] per row; shared float32 scratch
        qkv [B,(H+2G)Dh], o [B,H*Dh], tmp [B,D], z [B,E], hbuf [B*k,2I], ap [B*k,I], y [B*k,D], and in
        int8 mode the down projection's quantized inputs aqe / aqo / asl / acorr / asb [B*k, ...];
        logits [B,V] out; work int64 [2L] zeroed; sync as the one-token step."""
        n_b, d_model = xb.shape
        n_layers = waddr.shape[0]
        n_experts = z.shape[1]
        group = n_heads // n_kv
        n_q = n_heads * head_dim
        n_kvd = n_kv * head_dim
        n_qkv = n_q + 2 * n_kvd
        n_pairs = hbuf.shape[0]
        n_exp_rows = hbuf.shape[1]                                   # 2I
        n_inner = ap.shape[1]                                        # I
        nb_d = d_model // 32
        nb_i = n_inner // 32
        ng_d = (nb_d + 3) // 4
        max_pos = pos.max()
        for t in prange(n_threads):
            if not rendezvous(sync, n_threads):
                continue
            gen = 0
            h = np.empty((n_b, d_model), np.float32)                         # normed rows
            hp = np.empty((n_b, d_model), np.float32)                        # the tiles' input layout
            op = np.empty((n_b, n_q), np.float32)
            xg = np.empty((n_pairs, d_model), np.float32)                    # rows in grouped pair order
            buf = np.empty(4 * 32 * max(nb_d, nb_i), np.float32)             # decoded weight rows (tiles)
            scores = np.empty(max_pos + 1)                                   # [S] float64
            rw = np.empty((n_b, top_k), np.float32)
            rid = np.empty((n_b, top_k), np.int64)
            counts = np.empty(n_experts, np.int64)
            experts = np.empty(n_experts, np.int64)
            starts = np.empty(n_experts + 1, np.int64)
            pair_row = np.empty(n_pairs, np.int64)
            pair_of = np.empty((n_b, top_k), np.int64)
            hq = np.empty((n_b, d_model if int8 else 1), np.int8)            # Q8 inputs of the dense rows
            hs = np.empty((n_b, nb_d if int8 else 1), np.float32)
            hc = np.empty((n_b, nb_d if int8 else 1), np.float32)
            oq = np.empty((n_b, n_q if int8 else 1), np.int8)
            os_ = np.empty((n_b, n_q // 32 if int8 else 1), np.float32)
            oc = np.empty((n_b, n_q // 32 if int8 else 1), np.float32)
            n_pq = n_pairs if int8 else 1                                    # MXFP4 int8 inputs of gate_up
            xqe = np.empty((n_pq, 64 * ng_d), np.int8)
            xqo = np.empty((n_pq, 64 * ng_d), np.int8)
            xsl = np.empty((n_pq, 16 * ng_d), np.float32)
            xcorr = np.empty((n_pq, 16 * ng_d), np.int32)
            xsb = np.empty((n_pq, nb_d), np.float32)
            n_items = n_b * n_kv
            for layer in range(n_layers):
                # (1) q|k|v
                _rms_norm_rows(xb, ln1[layer], eps, offset, h)
                if int8:
                    _quantize_all(h, hq, hs, hc)
                    w8 = numba.carray(pointer_like(waddr[layer, 0], lm_head), (n_qkv, d_model))
                    ws = numba.carray(pointer_like(waddr[layer, 1], lm_head_s), (n_qkv, nb_d))
                    _q8_share(w8, ws, hq, hs, hc, bqkv[layer], True, t, n_threads, qkv, pick)
                else:
                    w = numba.carray(pointer_like(waddr[layer, 0], lm_head), (n_qkv, d_model))
                    tile_share(True, w, h, hp, bqkv[layer], True, t, n_threads, qkv)
                gen += 1
                barrier(sync, n_threads, gen)
                # (2) per (sequence, KV group): RoPE, cache slot, attention
                for item in range(n_items * t // n_threads, n_items * (t + 1) // n_threads):
                    b = item // n_kv
                    g = item % n_kv
                    n_slots = slots[b, layer]
                    kc = numba.carray(pointer_like(kv_addr[b, layer, 0], xb), n_slots * n_kvd)
                    vc = numba.carray(pointer_like(kv_addr[b, layer, 1], xb), n_slots * n_kvd)
                    sp = numba.carray(pointer_like(kv_addr[b, layer, 2], kv_addr), n_slots)
                    slot = pos[b] % n_slots
                    row = qkv[b]
                    rope_heads(row, g * group, (g + 1) * group, head_dim, cos[b], sin[b], interleaved)
                    kview = row[n_q:n_q + n_kvd]
                    rope_heads(kview, g, g + 1, head_dim, cos[b], sin[b], interleaved)
                    for j in range(g * head_dim, (g + 1) * head_dim):
                        kc[slot * n_kvd + j] = row[n_q + j]
                        vc[slot * n_kvd + j] = row[n_q + n_kvd + j]
                    attend_heads(row, g * group, (g + 1) * group, kc, vc, sp, slot, pos[b],
                                 min(pos[b] + 1, n_slots), windows[layer], sinks[layer], has_sinks, n_heads, n_kv,
                                 head_dim, scale, scores, o[b])
                gen += 1
                barrier(sync, n_threads, gen)
                # (3) output projection, residual
                if int8:
                    _quantize_all(o, oq, os_, oc)
                    w8 = numba.carray(pointer_like(waddr[layer, 2], lm_head), (d_model, n_q))
                    ws = numba.carray(pointer_like(waddr[layer, 3], lm_head_s), (d_model, n_q // 32))
                    lo, hi = _q8_share(w8, ws, oq, os_, oc, bo[layer], True, t, n_threads, tmp, pick)
                else:
                    w = numba.carray(pointer_like(waddr[layer, 2], lm_head), (d_model, n_q))
                    lo, hi = tile_share(True, w, o, op, bo[layer], True, t, n_threads, tmp)
                add_columns(xb, tmp, lo, hi)
                gen += 1
                barrier(sync, n_threads, gen)
                # (4) norm, router logits (bf16 in both modes)
                _rms_norm_rows(xb, ln2[layer], eps, offset, h)
                router = numba.carray(pointer_like(waddr[layer, 4], u16_like), (n_experts, d_model))
                tile_share(True, router, h, hp, rbias[layer], True, t, n_threads, z)
                gen += 1
                barrier(sync, n_threads, gen)
                # (5) every thread: routes, groups, its input rows in pair order; gate_up items
                _route_kernel(z, top_k, softmax_first, renormalize, rw, rid)
                n_groups = _group_pairs(rid, n_experts, counts, experts, starts, pair_row, pair_of)
                blocks = numba.carray(pointer_like(waddr[layer, 5], u8_like), n_experts * n_exp_rows * nb_d * 16)
                sc = numba.carray(pointer_like(waddr[layer, 6], u8_like), n_experts * n_exp_rows * nb_d)
                per_item = item_rows(n_exp_rows, n_groups, n_threads, min_item_rows)
                for p in range(n_pairs):             # int8: h as is; exact: hp, the tiles' (= experts') layout
                    xg[p] = h[pair_row[p]] if int8 else hp[pair_row[p]]
                if int8:
                    _quantize_rows(xg, nb_d, xqe, xqo, xsl, xcorr, xsb)
                half_items(blocks, sc, sc, n_exp_rows, nb_d, experts, starts, n_groups, xg.reshape(-1), xqe, xqo, xsl,
                           xcorr, xsb, int8, True, hbuf, gu_bias[layer], has_expert_bias, table, powers, const,
                           per_item, buf, work, 2 * layer)
                gen += 1
                barrier(sync, n_threads, gen)
                # (6) activation of this thread's pairs, in the down projection's input layout
                p_lo, p_hi = n_pairs * t // n_threads, n_pairs * (t + 1) // n_threads
                _activate_pairs(hbuf, p_lo, p_hi, alpha, limit, not int8, ap)
                if int8 and p_hi > p_lo:
                    _quantize_rows(ap[p_lo:p_hi], nb_i, aqe[p_lo:p_hi], aqo[p_lo:p_hi], asl[p_lo:p_hi],
                                   acorr[p_lo:p_hi], asb[p_lo:p_hi])
                gen += 1
                barrier(sync, n_threads, gen)
                # (7) down items
                blocks = numba.carray(pointer_like(waddr[layer, 7], u8_like), n_experts * d_model * nb_i * 16)
                sc = numba.carray(pointer_like(waddr[layer, 8], u8_like), n_experts * d_model * nb_i)
                per_item = item_rows(d_model, n_groups, n_threads, min_item_rows)
                half_items(blocks, sc, sc, d_model, nb_i, experts, starts, n_groups, ap.reshape(-1), aqe, aqo, asl,
                           acorr, asb, int8, True, y, dn_bias[layer], has_expert_bias, table, powers, const, per_item,
                           buf, work, 2 * layer + 1)
                gen += 1
                barrier(sync, n_threads, gen)
                # (8) weighted sum of each row's experts, residual
                _combine_share(xb, y, rw, pair_of, d_model * t // n_threads, d_model * (t + 1) // n_threads)
                gen += 1
                barrier(sync, n_threads, gen)
            _rms_norm_rows(xb, lnf, eps, offset, h)
            if int8:
                _quantize_all(h, hq, hs, hc)
                _q8_share(lm_head, lm_head_s, hq, hs, hc, bo[0], False, t, n_threads, logits, pick)
            else:
                tile_share(True, lm_head, h, hp, bo[0], False, t, n_threads, logits)

    step_rows.__name__ = step_rows.__qualname__ = f"fused_gptoss_rows_{'int8' if int8 else 'bf16'}"
    return numba.njit(parallel=True, **_OPTS)(step_rows)


kernel = functools.cache(_make_rows)      # one kernel per weight mode and process (compiled once per machine)
