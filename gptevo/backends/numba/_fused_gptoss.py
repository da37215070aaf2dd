"""The fused decode step of gpt-oss-style models (see ``_fused_decode`` for the scheme).

Taken (:func:`plan` returns None for anything else): pre-norm RMSNorm blocks, RoPE (any scaling
rule; cos and sin of the position made before the region), fused q|k|v, attention sinks or none,
full or sliding-window layers (the cache's ring slots), MoE on every layer with MXFP4 experts and
the clamped SwiGLU, routing top-k then softmax or softmax then top-k; dense weights bfloat16, or the
int8 mode's Q8 weights (``weights="int8"``), with experts in exact or int8 mode as ``moe_experts``
would run them (``_mxfp4_gemv.weight_mode``).

Per layer: q|k|v rows (barrier); per KV group of this thread: RoPE of its q and k heads, k and v
into the cache slot, attention of its query heads (barrier); output projection rows + residual
(barrier); every thread: RMSNorm, router logits, top-k; expert gate_up rows over the flattened
(expert, row) range, clamped SwiGLU of its pairs (barrier); the down projection's input rows
prepared (split or quantized) by expert (barrier); down rows for all k experts, weighted sum and
residual per output row (barrier). Then the final norm and the head.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from gptevo.backends.numba import _gemv_q8
from gptevo.backends.numba import _mxfp4_gemv as mg
from gptevo.backends.numba._atomics import barrier, chunk_size, rendezvous, take_chunk
from gptevo.backends.numba._elementwise import _rms_norm_rows, clamped_swiglu1
from gptevo.backends.numba._fused_decode import FusedDecode, f32_vector, kv_addresses, weight_kind
from gptevo.backends.numba._fused_rows import attend_heads, rope_heads, rows_bf16, rows_q8, split_even_odd
from gptevo.backends.numba._moe import _route_kernel
from gptevo.backends.numba._simd import pointer_like

_OPTS = dict(cache=True, fastmath=False, error_model="numpy", nogil=True)


def _make(dense_q8: bool, moe_int8: bool):
    """The step kernel for bf16 or Q8 dense weights and exact or int8 MXFP4 experts (compile-time)."""

    def step(x, pos, waddr, lm_head, lm_head_s, u16_like, u8_like, ln1, ln2, lnf, bqkv, bo, rbias,
             sinks, has_sinks, gu_bias, dn_bias, has_expert_bias, kv_addr, slots, windows, cos, sin, interleaved,
             eps, offset, scale, n_heads, n_kv, head_dim, top_k, softmax_first, renormalize, alpha, limit,
             qkv, o, hbuf, act, ae, ao, aqe, aqo, asl, acorr, asb, tmp, logits, table, powers, const, pick,
             sync, work, chunks, n_threads):
        """See the module doc. x [D] float32 (updated in place); waddr [L,9] int64, per layer the data
        addresses of wqkv, its Q8 scales, wo, its Q8 scales (dense: lm_head's dtype, bf16 bits or Q8
        int8 values; scales float16 bits [N,K/32]), router [E,D] bf16 bits, gate_up blocks, gate_up scales,
        down blocks, down scales (uint8, [E,N,K/32,16] and [E,N,K/32]); kv_addr [L,3] the cache's keys,
        values (float32 [slots,G,Dh]) and slot positions (int64) with slots [L];
        ln1 / ln2 [L,D], lnf [D] float64; biases float32 stacked by layer; sinks [L,H] float64;
        windows [L] (0: full); cos / sin [R/2] for this position; shared float32 scratch qkv, o, hbuf
        [k*2I], act [k*I], tmp; the down projection's input layouts ae / ao or aqe / aqo / asl / acorr / asb;
        logits [V] out; sync int64 zeroed (sync[VERDICT] == 1 afterwards when the step ran)."""
        d_model = x.shape[0]
        n_layers = waddr.shape[0]
        n_experts = rbias.shape[1]
        group = n_heads // n_kv
        n_q = n_heads * head_dim
        n_kvd = n_kv * head_dim
        n_exp_rows = hbuf.shape[0] // top_k                       # 2I
        n_inner = n_exp_rows // 2                                 # I
        nb_d = d_model // 32
        nb_i = n_inner // 32
        ng_d = (nb_d + 3) // 4
        for t in prange(n_threads):
            if not rendezvous(sync, n_threads):
                continue
            gen = 0
            h = np.empty((1, d_model), np.float32)                              # [1,D] normed x
            he = np.empty(d_model // 2, np.float32)
            ho = np.empty(d_model // 2, np.float32)
            oe = np.empty(n_q // 2, np.float32)
            oo = np.empty(n_q // 2, np.float32)
            hq = np.empty(d_model, np.int8)                                     # Q8 input of q|k|v
            hs = np.empty(nb_d, np.float32)
            hc = np.empty(nb_d, np.float32)
            oq = np.empty(n_q, np.int8)                                         # Q8 input of wo
            os_ = np.empty(n_q // 32, np.float32)
            oc = np.empty(n_q // 32, np.float32)
            xqe = np.empty((1, 64 * ng_d), np.int8)                             # MXFP4 int8 input of gate_up
            xqo = np.empty((1, 64 * ng_d), np.int8)
            xsl = np.empty((1, 16 * ng_d), np.float32)
            xcorr = np.empty((1, 16 * ng_d), np.int32)
            xsb = np.empty((1, nb_d), np.float32)
            z = np.empty((1, rbias.shape[1]), np.float32)                       # [1,E] router logits
            rw = np.empty((1, top_k), np.float32)
            rid = np.empty((1, top_k), np.int64)
            scores = np.empty(pos + 1)                                          # [S] float64
            yb = np.empty((top_k, chunks[1]), np.float32)                        # down rows of a chunk
            x2 = x.reshape(1, d_model)
            g_lo, g_hi = n_kv * t // n_threads, n_kv * (t + 1) // n_threads
            for layer in range(n_layers):
                # q|k|v rows
                _rms_norm_rows(x2, ln1[layer], eps, offset, h)
                n_rows = n_q + 2 * n_kvd
                w = numba.carray(pointer_like(waddr[layer, 0], lm_head), (n_rows, d_model))
                ws = numba.carray(pointer_like(waddr[layer, 1], lm_head_s), (n_rows, nb_d if dense_q8 else 1))
                if dense_q8:
                    _gemv_q8.quantize_row(h[0], hq, hs, hc)
                else:
                    split_even_odd(h[0], he, ho)
                while True:
                    lo, hi = take_chunk(work, gen, n_rows, chunks[0])
                    if lo >= n_rows:
                        break
                    if dense_q8:
                        rows_q8(w, ws, hq, hs, hc, bqkv[layer], True, lo, hi, qkv, pick)
                    else:
                        rows_bf16(w, he, ho, bqkv[layer], True, lo, hi, qkv)
                gen += 1
                barrier(sync, n_threads, gen)
                # this thread's KV groups: RoPE, cache slot, attention
                n_slots = slots[layer]
                kc = numba.carray(pointer_like(kv_addr[layer, 0], x), n_slots * n_kvd)
                vc = numba.carray(pointer_like(kv_addr[layer, 1], x), n_slots * n_kvd)
                sp = numba.carray(pointer_like(kv_addr[layer, 2], windows), n_slots)
                slot = pos % n_slots
                n_used = min(pos + 1, n_slots)
                rope_heads(qkv, g_lo * group, g_hi * group, head_dim, cos, sin, interleaved)
                kview = qkv[n_q:n_q + n_kvd]
                rope_heads(kview, g_lo, g_hi, head_dim, cos, sin, interleaved)
                for j in range(g_lo * head_dim, g_hi * head_dim):
                    kc[slot * n_kvd + j] = qkv[n_q + j]
                    vc[slot * n_kvd + j] = qkv[n_q + n_kvd + j]
                attend_heads(qkv, g_lo * group, g_hi * group, kc, vc, sp, slot, pos, n_used, windows[layer],
                             sinks[layer], has_sinks, n_heads, n_kv, head_dim, scale, scores, o)
                gen += 1
                barrier(sync, n_threads, gen)
                # output projection, residual
                w = numba.carray(pointer_like(waddr[layer, 2], lm_head), (d_model, n_q))
                ws = numba.carray(pointer_like(waddr[layer, 3], lm_head_s), (d_model, n_q // 32 if dense_q8 else 1))
                if dense_q8:
                    _gemv_q8.quantize_row(o, oq, os_, oc)
                else:
                    split_even_odd(o, oe, oo)
                while True:
                    lo, hi = take_chunk(work, gen, d_model, chunks[1])
                    if lo >= d_model:
                        break
                    if dense_q8:
                        rows_q8(w, ws, oq, os_, oc, bo[layer], True, lo, hi, tmp, pick)
                    else:
                        rows_bf16(w, oe, oo, bo[layer], True, lo, hi, tmp)
                    for r in range(lo, hi):
                        x[r] += tmp[r]
                gen += 1
                barrier(sync, n_threads, gen)
                # every thread: norm, router, top-k; then gate_up rows of the chosen experts
                _rms_norm_rows(x2, ln2[layer], eps, offset, h)
                split_even_odd(h[0], he, ho)
                router = numba.carray(pointer_like(waddr[layer, 4], u16_like), (n_experts, d_model))
                rows_bf16(router, he, ho, rbias[layer], True, 0, n_experts, z[0])
                _route_kernel(z, top_k, softmax_first, renormalize, rw, rid)
                if moe_int8:
                    mg._quantize_rows(h, nb_d, xqe, xqo, xsl, xcorr, xsb)
                total = top_k * n_exp_rows
                blocks = numba.carray(pointer_like(waddr[layer, 5], u8_like), n_experts * n_exp_rows * nb_d * 16)
                sc = numba.carray(pointer_like(waddr[layer, 6], u8_like), n_experts * n_exp_rows * nb_d)
                while True:                                  # chunks of an even size: SwiGLU pairs stay whole
                    lo, hi = take_chunk(work, gen, total, chunks[2])
                    if lo >= total:
                        break
                    for f in range(lo, hi):
                        u = f // n_exp_rows
                        e = rid[0, u]
                        row = e * n_exp_rows + f % n_exp_rows
                        if moe_int8:
                            y = mg._row_int8(blocks, row * nb_d * 16, sc, row * nb_d, xqe, xqo, xsl, xcorr, xsb, 0,
                                             nb_d, const, True)
                        else:
                            y = mg._row_exact_avx512(blocks, row * nb_d * 16, sc, row * nb_d, he, 0, ho, nb_d,
                                                     table, powers)
                        hbuf[f] = y + gu_bias[layer, e, f % n_exp_rows] if has_expert_bias else y
                    for f in range(lo, hi, 2):
                        act[f // 2] = clamped_swiglu1(float(hbuf[f]), float(hbuf[f + 1]), alpha, limit)
                gen += 1
                barrier(sync, n_threads, gen)
                # the down projection's inputs, one expert row per thread in turn
                for u in range(t, top_k, n_threads):
                    a_u = act[u * n_inner:(u + 1) * n_inner]
                    if moe_int8:
                        mg._quantize_rows(a_u.reshape(1, n_inner), nb_i, aqe[u:u + 1], aqo[u:u + 1], asl[u:u + 1],
                                          acorr[u:u + 1], asb[u:u + 1])
                    else:
                        split_even_odd(a_u, ae[u * n_inner // 2:(u + 1) * n_inner // 2],
                                       ao[u * n_inner // 2:(u + 1) * n_inner // 2])
                gen += 1
                barrier(sync, n_threads, gen)
                # down rows of every chosen expert, weighted sum (slot order), residual
                blocks = numba.carray(pointer_like(waddr[layer, 7], u8_like), n_experts * d_model * nb_i * 16)
                sc = numba.carray(pointer_like(waddr[layer, 8], u8_like), n_experts * d_model * nb_i)
                while True:              # per chunk of output rows: each expert's rows in turn, then the sum
                    lo, hi = take_chunk(work, gen, d_model, chunks[1])
                    if lo >= d_model:
                        break
                    for u in range(top_k):
                        e = rid[0, u]
                        for r in range(lo, hi):
                            row = e * d_model + r
                            if moe_int8:
                                y = mg._row_int8(blocks, row * nb_i * 16, sc, row * nb_i, aqe, aqo, asl, acorr, asb,
                                                 u, nb_i, const, True)
                            else:
                                y = mg._row_exact_avx512(blocks, row * nb_i * 16, sc, row * nb_i, ae, u * nb_i * 16,
                                                         ao, nb_i, table, powers)
                            yb[u, r - lo] = y + dn_bias[layer, e, r] if has_expert_bias else y
                    for r in range(lo, hi):
                        acc = np.float32(0)
                        for u in range(top_k):
                            acc += rw[0, u] * yb[u, r - lo]
                        x[r] += acc
                gen += 1
                barrier(sync, n_threads, gen)
            # final norm and the output head
            _rms_norm_rows(x2, lnf, eps, offset, h)
            n_rows = logits.shape[0]
            if dense_q8:
                _gemv_q8.quantize_row(h[0], hq, hs, hc)
            else:
                split_even_odd(h[0], he, ho)
            while True:
                lo, hi = take_chunk(work, gen + 1, n_rows, chunks[3])
                if lo >= n_rows:
                    break
                if dense_q8:
                    rows_q8(lm_head, lm_head_s, hq, hs, hc, bo[0], False, lo, hi, logits, pick)
                else:
                    rows_bf16(lm_head, he, ho, bo[0], False, lo, hi, logits)

    step.__name__ = step.__qualname__ = f"fused_gptoss_{'q8' if dense_q8 else 'bf16'}_{'int8' if moe_int8 else 'exact'}"
    return numba.njit(parallel=True, **_OPTS)(step)


_KERNELS: dict = {}


def _kernel(dense_q8: bool, moe_int8: bool):
    key = (dense_q8, moe_int8)
    if key not in _KERNELS:
        _KERNELS[key] = _make(dense_q8, moe_int8)
    return _KERNELS[key]


# --- the plan -------------------------------------------------------------------------------------------


def _dense_kind(w):
    """"bf16", "q8" (the int8 mode's marked weights, rows the Q8 kernel takes), else None."""
    if isinstance(w, _gemv_q8.Q8Int8Weight):
        v = w.values
        ok = v.ndim == 2 and v.flags.c_contiguous and w.scales.flags.c_contiguous and _gemv_q8.supported(v.shape[1])
        return "q8" if ok else None
    return "bf16" if weight_kind(w) == "bf16" else None


def plan(config, weights):
    """A :class:`GptOssStep` for a model of the kind this module takes (module doc), else None."""
    from gptevo.backends.numba._simd import has_vnni
    from gptevo.backends.numba._weights import is_mxfp4
    from gptevo.model import mlp_kind

    c, w = config, weights
    if (c.norm != "rmsnorm" or c.block_order != "pre" or c.position != "rope" or c.qk_norm
            or c.embedding_scale != 1.0 or c.num_heads % c.num_kv_heads or c.expert_activation != "clamped_swiglu"
            or getattr(c, "attn_scale_inverse_layer", False)):
        return None
    if any(mlp_kind(c, i) != "moe" for i in range(c.num_layers)):
        return None
    D, H, G, Dh = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    L = w.layers
    dense = {_dense_kind(m) for m in [x.wqkv for x in L] + [x.wo for x in L] + [w.lm_head]}
    if len(dense) != 1 or None in dense or any(weight_kind(x.router) != "bf16" for x in L):
        return None
    gu, dn = [x.experts_gate_up for x in L], [x.experts_down for x in L]
    if not all(is_mxfp4(a) and is_mxfp4(b) for a, b in zip(gu, dn)):
        return None
    if not all(a.blocks.flags.c_contiguous and a.scales.flags.c_contiguous for a in gu + dn):
        return None                                   # the kernel addresses the stored arrays directly
    modes = {mg.weight_mode(a, b) for a, b in zip(gu, dn)}
    if len(modes) != 1:
        return None
    moe_int8 = modes.pop() == "int8"
    E = c.num_experts
    inner = gu[0].shape[1] // 2
    if any(a.shape != (E, 2 * inner, D) or b.shape != (E, D, inner) for a, b in zip(gu, dn)):
        return None
    if (D % 32 or inner % 32 or (H * Dh) % 32 or (moe_int8 and (D < 128 or inner < 128 or not has_vnni()))
            or w.lm_head.shape[1] != D):
        return None
    for x in L:
        fused = x.wqkv.values if isinstance(x.wqkv, _gemv_q8.Q8Int8Weight) else x.wqkv
        out = x.wo.values if isinstance(x.wo, _gemv_q8.Q8Int8Weight) else x.wo
        if fused.shape != ((H + 2 * G) * Dh, D) or out.shape != (D, H * Dh) or x.router.shape != (E, D):
            return None
        if (x.sinks is None) != (L[0].sinks is None):
            return None
    return GptOssStep(c, w, dense.pop() == "q8", moe_int8)


def _expert_arrays(wt):
    return wt.blocks, wt.scales


_U16 = np.zeros(1, np.uint16)        # dtype references for pointer_like
_U8 = np.zeros(1, np.uint8)


class GptOssStep(FusedDecode):
    """The fused gpt-oss step: arrays gathered once (per-layer tuples, small vectors stacked)."""

    allow_windows = True

    def __init__(self, config, weights, dense_q8: bool, moe_int8: bool):
        super().__init__(config, weights)
        c, w = config, weights
        L = w.layers
        D, H, G, Dh, E, k = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.num_experts, c.experts_per_token
        self.dense_q8, self.moe_int8 = dense_q8, moe_int8
        dummy = np.zeros((1, 1), np.uint16)

        def dense(m):
            return (m.values, m.scales.view(np.uint16)) if dense_q8 else (m.view(np.uint16), dummy)

        self.lm_head, self.lm_head_s = dense(w.lm_head)
        rows = []
        for x in L:
            rows.append([*dense(x.wqkv), *dense(x.wo), x.router.view(np.uint16), *_expert_arrays(x.experts_gate_up),
                         *_expert_arrays(x.experts_down)])
        self.keep = rows                                   # the arrays behind the addresses (all C-contiguous:
                                                           # plan() checked them)
        self.waddr = np.array([[a.ctypes.data for a in r] for r in rows], np.int64)          # [L,9]
        self.ln1 = np.stack([np.asarray(x.attn_norm, np.float64).reshape(D) for x in L])      # [L,D]
        self.ln2 = np.stack([np.asarray(x.mlp_norm, np.float64).reshape(D) for x in L])       # [L,D]
        self.lnf = np.asarray(w.final_norm, np.float64).reshape(D)                            # [D]
        n_qkv = (H + 2 * G) * Dh
        self.bqkv = np.stack([f32_vector(x.bqkv, n_qkv) for x in L])                          # [L,(H+2G)Dh]
        self.bo = np.stack([f32_vector(x.bo, D) for x in L])                                  # [L,D]
        self.rbias = np.stack([f32_vector(x.router_bias, E) for x in L])                      # [L,E]
        self.has_sinks = L[0].sinks is not None
        self.sinks = np.stack([np.asarray(x.sinks, np.float64).reshape(H) if self.has_sinks else np.zeros(H)
                               for x in L])                                                    # [L,H]
        inner = L[0].experts_gate_up.shape[1] // 2
        self.has_expert_bias = L[0].experts_gate_up_bias is not None and L[0].experts_down_bias is not None
        self.gu_bias = np.stack([np.asarray(x.experts_gate_up_bias, np.float32).reshape(E, 2 * inner)
                                 if self.has_expert_bias else np.zeros((E, 2 * inner), np.float32) for x in L])
        self.dn_bias = np.stack([np.asarray(x.experts_down_bias, np.float32).reshape(E, D)
                                 if self.has_expert_bias else np.zeros((E, D), np.float32) for x in L])
        self.windows = np.array([c.window_for_layer(i) or 0 for i in range(c.num_layers)], np.int64)
        self.scale = float(c.attn_scale) if c.attn_scale is not None else 1.0 / float(np.sqrt(Dh))
        self.qkv = np.empty(n_qkv, np.float32)
        self.o = np.empty(H * Dh, np.float32)
        self.hbuf = np.empty(k * 2 * inner, np.float32)
        self.act = np.empty(k * inner, np.float32)
        self.ae = np.empty(k * inner // 2, np.float32)
        self.ao = np.empty(k * inner // 2, np.float32)
        ng = (inner // 32 + 3) // 4
        self.aqe = np.empty((k, 64 * ng), np.int8)
        self.aqo = np.empty((k, 64 * ng), np.int8)
        self.asl = np.empty((k, 16 * ng), np.float32)
        self.acorr = np.empty((k, 16 * ng), np.int32)
        self.asb = np.empty((k, inner // 32), np.float32)
        self.tmp = np.empty(D, np.float32)
        self._rope_memo: dict = {}

    def _first_row(self, token, pos):
        return np.asarray(self.embed[token], np.float32)

    def _cos_sin(self, pos):
        """cos, sin [R/2] of position ``pos`` as the model's forward makes them (frequencies for a
        sequence ending at this position)."""
        from gptevo.backends.numba._attention import rope_cos_sin
        from gptevo.ops.rope import rope_frequencies

        c = self.config
        if pos + 1 not in self._rope_memo:
            if len(self._rope_memo) > 4096:
                self._rope_memo.clear()
            self._rope_memo[pos + 1] = rope_frequencies(head_dim=c.head_dim, theta=c.rope_theta,
                                                        rotary_dim=c.rotary_dim, scaling=c.scaling or None,
                                                        seq_len=pos + 1)
        inv_freq, factor = self._rope_memo[pos + 1]
        cos, sin = rope_cos_sin(np.array([pos], np.int64), inv_freq, factor)                   # [1,R/2] each
        return cos[0], sin[0]

    def _chunks(self, n_threads):
        """Rows per work chunk: q|k|v, D-row stages (o, down), gate_up pairs, the head."""
        c = self.config
        n_qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        return np.array([chunk_size(n_qkv, n_threads), chunk_size(c.hidden_size, n_threads),
                         chunk_size(self.hbuf.shape[0], n_threads, 2), chunk_size(self.n_vocab, n_threads)], np.int64)

    def _launch(self, x, pos, cache, logits, sync):
        c = self.config
        n_threads = numba.get_num_threads()
        cos, sin = self._cos_sin(pos)
        _kernel(self.dense_q8, self.moe_int8)(
            x, pos, self.waddr, self.lm_head, self.lm_head_s, _U16, _U8, self.ln1, self.ln2, self.lnf,
            self.bqkv, self.bo, self.rbias, self.sinks, self.has_sinks, self.gu_bias, self.dn_bias,
            self.has_expert_bias, kv_addresses(cache), np.array([p.shape[0] for p in cache.positions], np.int64),
            self.windows, cos, sin, bool(c.rope_interleaved), float(c.norm_eps),
            float(c.norm_offset), self.scale, c.num_heads, c.num_kv_heads, c.head_dim, c.experts_per_token,
            c.router_order == "softmax_topk", bool(c.norm_topk_prob), float(c.swiglu_alpha), float(c.swiglu_limit),
            self.qkv, self.o, self.hbuf, self.act, self.ae, self.ao, self.aqe, self.aqo, self.asl, self.acorr,
            self.asb,
            self.tmp, logits, mg.VALUES_F32, mg.POWERS_F32, mg.INT8_CONST, _gemv_q8.PICK, sync,
            np.zeros(6 * c.num_layers + 2, np.int64), self._chunks(n_threads), n_threads)

    def _rows_ok(self):
        """The batched region has two forms: bf16 dense with exact experts, and the int8 mode."""
        return self.dense_q8 == self.moe_int8

    def _launch_rows(self, xb, pos, caches, logits, sync):
        from gptevo.backends.numba import _fused_gptoss_rows, _moe_region

        c = self.config
        rope = [self._cos_sin(int(p)) for p in pos]
        cos = np.ascontiguousarray(np.stack([a for a, _ in rope]))                            # [B,R/2]
        sin = np.ascontiguousarray(np.stack([b for _, b in rope]))                            # [B,R/2]
        n_b, k = len(caches), c.experts_per_token
        inner = self.act.shape[0] // k
        n_p = n_b * k if self.moe_int8 else 1                           # the down inputs, int8 mode
        ng = (inner // 32 + 3) // 4
        _fused_gptoss_rows.kernel(self.moe_int8)(
            xb, pos, self.waddr, self.lm_head, self.lm_head_s, _U16, _U8, self.ln1, self.ln2, self.lnf, self.bqkv,
            self.bo, self.rbias, self.sinks, self.has_sinks, self.gu_bias, self.dn_bias, self.has_expert_bias,
            np.stack([kv_addresses(cache) for cache in caches]),
            np.array([[p.shape[0] for p in cache.positions] for cache in caches], np.int64), self.windows,
            cos, sin, bool(c.rope_interleaved), float(c.norm_eps), float(c.norm_offset), self.scale,
            c.num_heads, c.num_kv_heads, c.head_dim, k, c.router_order == "softmax_topk",
            bool(c.norm_topk_prob), float(c.swiglu_alpha), float(c.swiglu_limit), _moe_region.MIN_ROWS_PER_ITEM,
            np.empty((n_b, self.qkv.shape[0]), np.float32), np.empty((n_b, self.o.shape[0]), np.float32),
            np.empty((n_b, c.hidden_size), np.float32), np.empty((n_b, c.num_experts), np.float32),
            np.empty((n_b * k, 2 * inner), np.float32), np.empty((n_b * k, inner), np.float32),
            np.empty((n_b * k, c.hidden_size), np.float32),
            np.empty((n_p, 64 * ng), np.int8), np.empty((n_p, 64 * ng), np.int8),
            np.empty((n_p, 16 * ng), np.float32), np.empty((n_p, 16 * ng), np.int32),
            np.empty((n_p, inner // 32), np.float32),
            logits, mg.VALUES_F32, mg.POWERS_F32, mg.INT8_CONST, _gemv_q8.PICK, sync,
            np.zeros(2 * c.num_layers, np.int64), numba.get_num_threads())
