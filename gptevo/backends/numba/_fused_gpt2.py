"""The fused decode step of GPT-2-style models (see ``_fused_decode`` for the scheme).

Taken (:func:`plan` returns None for anything else): pre-norm LayerNorm blocks, learned positions,
fused q|k|v (gptevo.prepare), full causal attention (no window, sinks or ALiBi; GQA allowed), the
GELU fc/proj MLP, weights float32 or bfloat16 with K % 32 == 0. Per layer five barriers: after
q|k|v (whose k and v rows go straight into the cache slot), after attention (heads split over the
threads), after the output projection (rows split, residual added), after fc + GELU, after proj.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

from gptevo.backends.numba._atomics import barrier, rendezvous
from gptevo.backends.numba._elementwise import _gelu_flat, _layer_norm_rows
from gptevo.backends.numba._fused_decode import FusedDecode, f32_vector, kv_addresses, weight_kind
from gptevo.backends.numba._fused_rows import attend_heads, rows_bf16, rows_f32, split_even_odd
from gptevo.backends.numba._fused_tiles import add_columns, tile_share
from gptevo.backends.numba._simd import pointer_like

_OPTS = dict(cache=True, fastmath=False, error_model="numpy", nogil=True)


# --- the step ---------------------------------------------------------------------------------------


def _make(is_bf16: bool):
    """The step kernel for float32 weights or bfloat16 bits (a compile-time constant)."""

    def step(x, pos, waddr, ln1, ln2, lnf, bqkv, bo, bfc, bproj, has_bias, lm_head,
             kv_addr, slots, scales, eps, tanh_gelu, n_heads, n_kv, head_dim,
             qkv, o, f, tmp, logits, sync, n_threads):
        """x [D] float32: the token's embedding + position, updated in place to the last hidden state.
        waddr [L,4] int64: per layer the data addresses of wqkv, wo, w_fc, w_proj (lm_head's dtype);
        ln1, ln2 [L,2,D] and lnf [2,D] float64 (weight, bias); bqkv [L,(H+2G)Dh], bo [L,D], bfc [L,I],
        bproj [L,D] float32; kv_addr [L,3]: addresses of each layer's cache keys and values (float32
        [slots,G,Dh]; position pos is written here) and slot positions (int64); scales [L]. qkv, o,
        f, tmp: shared float32 scratch; logits [V] out; sync int64 [SYNC_SIZE] zeroed. Returns
        nothing; sync[VERDICT] == 1 afterwards when the step ran (see _atomics.rendezvous)."""
        d_model = x.shape[0]
        n_layers = waddr.shape[0]
        n_qkv = qkv.shape[0]
        n_q = n_heads * head_dim
        n_kvd = n_kv * head_dim
        n_inner = f.shape[0]
        for t in prange(n_threads):
            if not rendezvous(sync, n_threads):
                continue
            gen = 0
            h = np.empty((1, d_model), np.float32)                          # [1,D] normed x, own copy
            he = np.empty(d_model // 2, np.float32)
            ho = np.empty(d_model // 2, np.float32)
            fe = np.empty(n_inner // 2, np.float32)
            fo = np.empty(n_inner // 2, np.float32)
            oe = np.empty(n_q // 2, np.float32)
            oo = np.empty(n_q // 2, np.float32)
            scores = np.empty(pos + 1)                                      # [S] float64
            no_sinks = np.zeros(1)
            x2 = x.reshape(1, d_model)
            for layer in range(n_layers):
                # q|k|v of this thread's rows; k and v go straight into the cache slot `pos`
                _layer_norm_rows(x2, ln1[layer, 0], ln1[layer, 1], True, eps, h)
                w = numba.carray(pointer_like(waddr[layer, 0], lm_head), (n_qkv, d_model))
                n_rows = n_qkv
                lo, hi = n_rows * t // n_threads, n_rows * (t + 1) // n_threads
                if is_bf16:
                    split_even_odd(h[0], he, ho)
                    rows_bf16(w, he, ho, bqkv[layer], has_bias, lo, hi, qkv)
                else:
                    rows_f32(w, h[0], bqkv[layer], has_bias, lo, hi, qkv)
                kc = numba.carray(pointer_like(kv_addr[layer, 0], x), slots * n_kvd)
                vc = numba.carray(pointer_like(kv_addr[layer, 1], x), slots * n_kvd)
                for r in range(max(lo, n_q), hi):
                    if r < n_q + n_kvd:
                        kc[pos * n_kvd + r - n_q] = qkv[r]
                    else:
                        vc[pos * n_kvd + r - n_q - n_kvd] = qkv[r]
                gen += 1
                barrier(sync, n_threads, gen)
                # attention: this thread's heads
                sp = numba.carray(pointer_like(kv_addr[layer, 2], kv_addr), slots)
                attend_heads(qkv, n_heads * t // n_threads, n_heads * (t + 1) // n_threads, kc, vc, sp,
                             pos, pos, pos + 1, 0, no_sinks, False, n_heads, n_kv, head_dim, scales[layer], scores, o)
                gen += 1
                barrier(sync, n_threads, gen)
                # output projection, residual
                w = numba.carray(pointer_like(waddr[layer, 1], lm_head), (d_model, n_q))
                lo, hi = d_model * t // n_threads, d_model * (t + 1) // n_threads
                if is_bf16:
                    split_even_odd(o, oe, oo)
                    rows_bf16(w, oe, oo, bo[layer], has_bias, lo, hi, tmp)
                else:
                    rows_f32(w, o, bo[layer], has_bias, lo, hi, tmp)
                for r in range(lo, hi):
                    x[r] += tmp[r]
                gen += 1
                barrier(sync, n_threads, gen)
                # MLP: fc + GELU on this thread's rows
                _layer_norm_rows(x2, ln2[layer, 0], ln2[layer, 1], True, eps, h)
                w = numba.carray(pointer_like(waddr[layer, 2], lm_head), (n_inner, d_model))
                lo, hi = n_inner * t // n_threads, n_inner * (t + 1) // n_threads
                if is_bf16:
                    split_even_odd(h[0], he, ho)
                    rows_bf16(w, he, ho, bfc[layer], has_bias, lo, hi, tmp)
                else:
                    rows_f32(w, h[0], bfc[layer], has_bias, lo, hi, tmp)
                _gelu_flat(tmp[lo:hi], tanh_gelu, f[lo:hi])
                gen += 1
                barrier(sync, n_threads, gen)
                # proj, residual
                w = numba.carray(pointer_like(waddr[layer, 3], lm_head), (d_model, n_inner))
                lo, hi = d_model * t // n_threads, d_model * (t + 1) // n_threads
                if is_bf16:
                    split_even_odd(f, fe, fo)
                    rows_bf16(w, fe, fo, bproj[layer], has_bias, lo, hi, tmp)
                else:
                    rows_f32(w, f, bproj[layer], has_bias, lo, hi, tmp)
                for r in range(lo, hi):
                    x[r] += tmp[r]
                gen += 1
                barrier(sync, n_threads, gen)
            # final norm and the output head
            _layer_norm_rows(x2, lnf[0], lnf[1], True, eps, h)
            n_rows = lm_head.shape[0]
            lo, hi = n_rows * t // n_threads, n_rows * (t + 1) // n_threads
            if is_bf16:
                split_even_odd(h[0], he, ho)
                rows_bf16(lm_head, he, ho, bo[0], False, lo, hi, logits)
            else:
                rows_f32(lm_head, h[0], bo[0], False, lo, hi, logits)

    step.__name__ = step.__qualname__ = f"fused_decode_{'bf16' if is_bf16 else 'f32'}"
    return numba.njit(parallel=True, **_OPTS)(step)


_KERNELS: dict = {}


def _kernel(is_bf16: bool):
    if is_bf16 not in _KERNELS:
        _KERNELS[is_bf16] = _make(is_bf16)
    return _KERNELS[is_bf16]




def _make_rows(is_bf16: bool):
    """The batched step: B sequences, one new token each, in one region (see ``Gpt2Step.rows``)."""

    def step_rows(xb, pos, waddr, ln1, ln2, lnf, bqkv, bo, bfc, bproj, has_bias, lm_head,
                  kv_addr, slots, scales, eps, tanh_gelu, n_heads, n_kv, head_dim,
                  qkv, o, f, tmp, logits, sync, n_threads):
        """xb [B,D] float32: row b the embedding + position of sequence b's token (updated in place);
        pos [B]; kv_addr [B,L,3] each sequence's cache keys, values, slot positions with slots [B];
        qkv [B,(H+2G)Dh], o [B,H*Dh], f [B,I], tmp [B,max(I,D)] shared scratch; logits [B,V] out.
        Weight rows are split over the threads in groups of four (the register tiles of
        ``_gemm_tiles``: every input row times four weight rows per pass); attention items are
        (sequence, head) pairs. Other arguments as the one-token step."""
        n_b, d_model = xb.shape
        n_layers = waddr.shape[0]
        n_qkv = qkv.shape[1]
        n_q = n_heads * head_dim
        n_kvd = n_kv * head_dim
        n_inner = f.shape[1]
        max_pos = pos.max()
        for t in prange(n_threads):
            if not rendezvous(sync, n_threads):
                continue
            gen = 0
            h = np.empty((n_b, d_model), np.float32)                       # normed rows
            hp = np.empty((n_b, d_model), np.float32)                      # the tiles' input layout
            op = np.empty((n_b, n_q), np.float32)
            fp = np.empty((n_b, n_inner), np.float32)
            scores = np.empty(max_pos + 1)                                 # [S] float64
            no_sinks = np.zeros(1)
            for layer in range(n_layers):
                _layer_norm_rows(xb, ln1[layer, 0], ln1[layer, 1], True, eps, h)
                w = numba.carray(pointer_like(waddr[layer, 0], lm_head), (n_qkv, d_model))
                lo, hi = tile_share(is_bf16, w, h, hp, bqkv[layer], has_bias, t, n_threads, qkv)
                for b in range(n_b):                         # k, v rows into each sequence's slot
                    kc = numba.carray(pointer_like(kv_addr[b, layer, 0], xb), slots[b] * n_kvd)
                    vc = numba.carray(pointer_like(kv_addr[b, layer, 1], xb), slots[b] * n_kvd)
                    for r in range(max(lo, n_q), hi):
                        if r < n_q + n_kvd:
                            kc[pos[b] * n_kvd + r - n_q] = qkv[b, r]
                        else:
                            vc[pos[b] * n_kvd + r - n_q - n_kvd] = qkv[b, r]
                gen += 1
                barrier(sync, n_threads, gen)
                n_items = n_b * n_heads
                for item in range(n_items * t // n_threads, n_items * (t + 1) // n_threads):
                    b = item // n_heads
                    hd = item % n_heads
                    kc = numba.carray(pointer_like(kv_addr[b, layer, 0], xb), slots[b] * n_kvd)
                    vc = numba.carray(pointer_like(kv_addr[b, layer, 1], xb), slots[b] * n_kvd)
                    sp = numba.carray(pointer_like(kv_addr[b, layer, 2], kv_addr), slots[b])
                    attend_heads(qkv[b], hd, hd + 1, kc, vc, sp, pos[b], pos[b], pos[b] + 1, 0, no_sinks, False,
                                 n_heads, n_kv, head_dim, scales[layer], scores, o[b])
                gen += 1
                barrier(sync, n_threads, gen)
                w = numba.carray(pointer_like(waddr[layer, 1], lm_head), (d_model, n_q))
                lo, hi = tile_share(is_bf16, w, o, op, bo[layer], has_bias, t, n_threads, tmp)
                add_columns(xb, tmp, lo, hi)
                gen += 1
                barrier(sync, n_threads, gen)
                _layer_norm_rows(xb, ln2[layer, 0], ln2[layer, 1], True, eps, h)
                w = numba.carray(pointer_like(waddr[layer, 2], lm_head), (n_inner, d_model))
                lo, hi = tile_share(is_bf16, w, h, hp, bfc[layer], has_bias, t, n_threads, tmp)
                for b in range(n_b):
                    _gelu_flat(tmp[b, lo:hi], tanh_gelu, f[b, lo:hi])
                gen += 1
                barrier(sync, n_threads, gen)
                w = numba.carray(pointer_like(waddr[layer, 3], lm_head), (d_model, n_inner))
                lo, hi = tile_share(is_bf16, w, f, fp, bproj[layer], has_bias, t, n_threads, tmp)
                add_columns(xb, tmp, lo, hi)
                gen += 1
                barrier(sync, n_threads, gen)
            _layer_norm_rows(xb, lnf[0], lnf[1], True, eps, h)
            tile_share(is_bf16, lm_head, h, hp, bo[0], False, t, n_threads, logits)

    step_rows.__name__ = step_rows.__qualname__ = f"fused_rows_{'bf16' if is_bf16 else 'f32'}"
    return numba.njit(parallel=True, **_OPTS)(step_rows)


_ROW_KERNELS: dict = {}


def _rows_kernel(is_bf16: bool):
    if is_bf16 not in _ROW_KERNELS:
        _ROW_KERNELS[is_bf16] = _make_rows(is_bf16)
    return _ROW_KERNELS[is_bf16]


def plan(config, weights):
    """A :class:`Gpt2Step` for a model of the kind this module takes (module doc), else None."""
    from gptevo.model import gelu_approximate, mlp_kind

    c, w = config, weights
    if (c.norm != "layernorm" or c.block_order != "pre" or c.position != "learned" or c.qk_norm
            or c.embedding_scale != 1.0 or c.attention_sinks or c.num_heads % c.num_kv_heads):
        return None
    if any(c.window_for_layer(i) is not None or mlp_kind(c, i) != "gelu" for i in range(c.num_layers)):
        return None
    if w.pos_embed is None or any(getattr(L, "sinks", None) is not None for L in w.layers):
        return None
    mats = [getattr(L, n) for L in w.layers for n in ("wqkv", "wo", "w_fc", "w_proj")] + [w.lm_head]
    kinds = {weight_kind(m) for m in mats}
    if len(kinds) != 1 or None in kinds:
        return None
    D, H, G, Dh = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    inner = w.layers[0].w_fc.shape[0]
    if (any(L.wqkv.shape != ((H + 2 * G) * Dh, D) or L.wo.shape != (D, H * Dh) or L.w_fc.shape != (inner, D)
            or L.w_proj.shape != (D, inner) for L in w.layers)
            or w.lm_head.shape[1] != D or (H * Dh) % 32 or D % 32 or inner % 32):
        return None
    return Gpt2Step(c, w, kinds.pop() == "bf16", gelu_approximate(c) == "tanh")


def _norm_pair(weight, bias, n):
    """[2, n] float64: a LayerNorm's weight and bias (zeros when it has none)."""
    return np.stack([np.asarray(weight, np.float64).reshape(n),
                     np.zeros(n) if bias is None else np.asarray(bias, np.float64).reshape(n)])


class Gpt2Step(FusedDecode):
    """The fused GPT-2 step: arrays gathered once (weights as tuples per layer, small vectors stacked)."""

    def __init__(self, config, weights, is_bf16: bool, tanh_gelu: bool):
        super().__init__(config, weights)
        c, w = config, weights
        L = w.layers
        n = len(L)
        as_bits = (lambda a: a.view(np.uint16)) if is_bf16 else (lambda a: a)
        self.is_bf16, self.tanh_gelu = is_bf16, tanh_gelu
        self.pos_embed = w.pos_embed
        self.keep = [as_bits(getattr(x, n)) for x in L for n in ("wqkv", "wo", "w_fc", "w_proj")]
        self.waddr = np.array([a.ctypes.data for a in self.keep], np.int64).reshape(n, 4)   # [L,4]
        self.lm_head = as_bits(w.lm_head)
        D = c.hidden_size
        self.ln1 = np.stack([_norm_pair(x.attn_norm, x.attn_norm_bias, D) for x in L])      # [L,2,D]
        self.ln2 = np.stack([_norm_pair(x.mlp_norm, x.mlp_norm_bias, D) for x in L])        # [L,2,D]
        self.lnf = _norm_pair(w.final_norm, w.final_norm_bias, D)                          # [2,D]
        n_qkv, inner = L[0].wqkv.shape[0], L[0].w_fc.shape[0]
        self.bqkv = np.stack([f32_vector(x.bqkv, n_qkv) for x in L])                       # [L,(H+2G)Dh]
        self.bo = np.stack([f32_vector(x.bo, D) for x in L])                               # [L,D]
        self.bfc = np.stack([f32_vector(x.b_fc, inner) for x in L])                        # [L,I]
        self.bproj = np.stack([f32_vector(x.b_proj, D) for x in L])                        # [L,D]
        base = c.attn_scale if c.attn_scale is not None else 1.0 / math.sqrt(c.head_dim)
        self.scales = np.array([base / (i + 1) if c.attn_scale_inverse_layer else base for i in range(n)])
        self.qkv = np.empty(n_qkv, np.float32)
        self.o = np.empty(c.num_heads * c.head_dim, np.float32)
        self.f = np.empty(inner, np.float32)
        self.tmp = np.empty(max(inner, D), np.float32)

    def _first_row(self, token, pos):
        return np.asarray(self.embed[token], np.float32) + np.asarray(self.pos_embed[pos], np.float32)

    def _launch(self, x, pos, cache, logits, sync):
        c = self.config
        _kernel(self.is_bf16)(
            x, pos, self.waddr, self.ln1, self.ln2, self.lnf,
            self.bqkv, self.bo, self.bfc, self.bproj, True, self.lm_head, kv_addresses(cache), cache.max_tokens,
            self.scales, float(c.norm_eps), self.tanh_gelu, c.num_heads, c.num_kv_heads, c.head_dim,
            self.qkv, self.o, self.f, self.tmp, logits, sync, numba.get_num_threads())

    def _launch_rows(self, xb, pos, caches, logits, sync):
        c = self.config
        n_b, inner = len(caches), self.f.shape[0]
        _rows_kernel(self.is_bf16)(
            xb, pos, self.waddr, self.ln1, self.ln2, self.lnf, self.bqkv, self.bo, self.bfc, self.bproj, True,
            self.lm_head, np.stack([kv_addresses(cache) for cache in caches]),
            np.array([cache.max_tokens for cache in caches], np.int64), self.scales, float(c.norm_eps),
            self.tanh_gelu, c.num_heads, c.num_kv_heads, c.head_dim,
            np.empty((n_b, self.qkv.shape[0]), np.float32), np.empty((n_b, self.o.shape[0]), np.float32),
            np.empty((n_b, inner), np.float32), np.empty((n_b, max(inner, c.hidden_size)), np.float32),
            logits, sync, numba.get_num_threads())
