"""One decode step of a whole GPT-2-style model in a single numba parallel region.

Decode (one new token) through the op registry calls ~8 kernels per layer, each its own parallel
region, and each call costs ~40 us beyond its work on the project's 2-core machine (Python, argument
unboxing, the region's fork and join): 4-5 ms of a 10-14 ms GPT-2 token. Here the ``n`` threads
enter one ``prange(n)`` region once per token and meet at spin barriers (``_atomics.barrier``)
where a step needs every thread's output: per layer, after q|k|v, after attention, after the output
projection, after fc and after proj. Between barriers each thread works on its own share: rows
``[t N / n, (t + 1) N / n)`` of a weight, heads ``[t H / n, (t + 1) H / n)`` of attention; the norms
are small and every thread computes them itself (identical results, no barrier).

Model kinds taken (:func:`plan` returns None for anything else, and the model runs its ops):
pre-norm LayerNorm blocks, learned positions, fused q|k|v (gptevo.prepare), full causal attention
(no window, sinks or ALiBi; GQA allowed), the GELU fc/proj MLP, float32 compute, weights float32
or bfloat16 with K % 16 == 0 (GPT-2 and its relatives), a host KV cache.

Each step computes what the ops compute, with the same kernels' arithmetic: LayerNorm statistics in
float64 (``_layer_norm_rows``), products in float32 with vectorized partial sums, GELU in float64
(``tanh64`` / ``erfc``), attention scores in float32 scaled and exponentiated in float64; only
summation order differs from the op path (spec/backends.md, "Fused decode"). If the iterations of
the region do not run at once (``_atomics.rendezvous``), nothing is computed and the caller falls
back to the ops for good.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

from gptevo.backends.numba._atomics import SYNC_SIZE, VERDICT, barrier, rendezvous
from gptevo.backends.numba._elementwise import _gelu_flat, _layer_norm_rows
from gptevo.backends.numba._simd import (bits_to_f32, f32x16_zero, has_avx512, hsum, i32x16_bcast, iand, isll,
                                         load_f32x16, load_i32x16, vadd, vfma)

_OPTS = dict(cache=True, fastmath=False, error_model="numpy", nogil=True)


# --- row ranges of a product, float32 or bfloat16 weights -------------------------------------------


@numba.njit(**_OPTS)
def _rows_f32(w, x, bias, has_bias, lo, hi, out):
    """out[r] = w[r] . x (+ bias[r]) for r in [lo, hi); w [N,K] float32, K % 16 == 0."""
    k = w.shape[1]
    for r in range(lo, hi):
        base = r * k
        a0 = f32x16_zero()
        a1 = f32x16_zero()
        a2 = f32x16_zero()
        a3 = f32x16_zero()
        j = 0
        while j + 64 <= k:
            a0 = vfma(load_f32x16(w, base + j), load_f32x16(x, j), a0)
            a1 = vfma(load_f32x16(w, base + j + 16), load_f32x16(x, j + 16), a1)
            a2 = vfma(load_f32x16(w, base + j + 32), load_f32x16(x, j + 32), a2)
            a3 = vfma(load_f32x16(w, base + j + 48), load_f32x16(x, j + 48), a3)
            j += 64
        while j < k:
            a0 = vfma(load_f32x16(w, base + j), load_f32x16(x, j), a0)
            j += 16
        y = hsum(vadd(vadd(a0, a1), vadd(a2, a3)))
        out[r] = y + bias[r] if has_bias else y


@numba.njit(**_OPTS)
def _rows_bf16(w, xe, xo, bias, has_bias, lo, hi, out):
    """``_rows_f32`` for bfloat16 bits w [N,K] uint16 (K % 32 == 0) with x given as its even and odd
    elements (xe, xo [K/2]): a 64-byte load holds 16 (even, odd) pairs, widened by a shift and a mask."""
    k = w.shape[1]
    n_vec = k // 32
    high = i32x16_bcast(np.int32(-65536))
    for r in range(lo, hi):
        base = r * k * 2
        a0 = f32x16_zero()
        a1 = f32x16_zero()
        a2 = f32x16_zero()
        a3 = f32x16_zero()
        b = 0
        while b + 2 <= n_vec:
            v = load_i32x16(w, base + 64 * b)
            a0 = vfma(bits_to_f32(isll(v, 16)), load_f32x16(xe, 16 * b), a0)
            a1 = vfma(bits_to_f32(iand(v, high)), load_f32x16(xo, 16 * b), a1)
            v = load_i32x16(w, base + 64 * b + 64)
            a2 = vfma(bits_to_f32(isll(v, 16)), load_f32x16(xe, 16 * b + 16), a2)
            a3 = vfma(bits_to_f32(iand(v, high)), load_f32x16(xo, 16 * b + 16), a3)
            b += 2
        if b < n_vec:
            v = load_i32x16(w, base + 64 * b)
            a0 = vfma(bits_to_f32(isll(v, 16)), load_f32x16(xe, 16 * b), a0)
            a1 = vfma(bits_to_f32(iand(v, high)), load_f32x16(xo, 16 * b), a1)
        y = hsum(vadd(vadd(a0, a1), vadd(a2, a3)))
        out[r] = y + bias[r] if has_bias else y


@numba.njit(**_OPTS)
def _split_even_odd(x, xe, xo):
    for j in range(xe.shape[0]):
        xe[j] = x[2 * j]
        xo[j] = x[2 * j + 1]


# --- attention of one query per head against the cache ----------------------------------------------


@numba.njit(**_OPTS)
def _attend_heads(qkv, keys, values, n_keys, n_heads, n_kv, head_dim, scale, h_lo, h_hi, scores, out):
    """out[h*Dh:(h+1)*Dh] for heads h in [h_lo, h_hi): softmax over keys 0..n_keys-1 of
    scale * q_h . k_j (scores float32, then float64), weights rounded to float32 in the value sum.
    qkv [(H+2G)*Dh] (q first); keys / values [slots*G*Dh] float32 (flat views); scores float64 [>= n_keys]."""
    group = n_heads // n_kv
    simd = head_dim % 16 == 0
    for h in range(h_lo, h_hi):
        g = h // group
        q0 = h * head_dim
        m = -np.inf
        for j in range(n_keys):
            kb = (j * n_kv + g) * head_dim
            if simd:
                acc = f32x16_zero()
                for d in range(0, head_dim, 16):
                    acc = vfma(load_f32x16(qkv, q0 + d), load_f32x16(keys, kb + d), acc)
                s = float(hsum(acc)) * scale
            else:
                sf = np.float32(0)
                for d in range(head_dim):
                    sf += qkv[q0 + d] * keys[kb + d]
                s = float(sf) * scale
            scores[j] = s
            m = max(m, s)
        m = m if math.isfinite(m) else 0.0
        den = 0.0
        o0 = h * head_dim
        for d in range(head_dim):
            out[o0 + d] = 0.0
        for j in range(n_keys):
            e = math.exp(scores[j] - m)
            den += e
            ew = np.float32(e)
            vb = (j * n_kv + g) * head_dim
            for d in range(head_dim):
                out[o0 + d] += ew * values[vb + d]
        for d in range(head_dim):
            out[o0 + d] = out[o0 + d] / den if den > 0 else 0.0


# --- the step ---------------------------------------------------------------------------------------


def _make(is_bf16: bool):
    """The step kernel for float32 weights or bfloat16 bits (a compile-time constant)."""

    def step(x, pos, wqkv, wo, wfc, wproj, ln1, ln2, lnf, bqkv, bo, bfc, bproj, has_bias, lm_head,
             keys, values, scales, eps, tanh_gelu, n_heads, n_kv, head_dim,
             qkv, o, f, tmp, logits, sync, n_threads):
        """x [D] float32: the token's embedding + position, updated in place to the last hidden state;
        per layer: wqkv, wo, wfc, wproj tuples of [N,K] weights; ln1, ln2 [L,2,D] and lnf [2,D] float64
        (weight, bias); bqkv [L,(H+2G)Dh], bo [L,D], bfc [L,I], bproj [L,D] float32; keys / values
        tuples of the cache's float32 buffers as flat views [slots*G*Dh] (position pos is written here); scales [L].
        qkv, o, f, tmp: shared float32 scratch; logits [V] out; sync int64 [SYNC_SIZE] zeroed.
        Returns nothing; sync[VERDICT] == 1 afterwards when the step ran (see _atomics.rendezvous)."""
        d_model = x.shape[0]
        n_layers = len(wqkv)
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
            x2 = x.reshape(1, d_model)
            for layer in range(n_layers):
                # q|k|v of this thread's rows; k and v go straight into the cache slot `pos`
                _layer_norm_rows(x2, ln1[layer, 0], ln1[layer, 1], True, eps, h)
                w = wqkv[layer]
                n_rows = w.shape[0]
                lo, hi = n_rows * t // n_threads, n_rows * (t + 1) // n_threads
                if is_bf16:
                    _split_even_odd(h[0], he, ho)
                    _rows_bf16(w, he, ho, bqkv[layer], has_bias, lo, hi, qkv)
                else:
                    _rows_f32(w, h[0], bqkv[layer], has_bias, lo, hi, qkv)
                kc = keys[layer]
                vc = values[layer]
                for r in range(max(lo, n_q), hi):
                    if r < n_q + n_kvd:
                        kc[pos * n_kvd + r - n_q] = qkv[r]
                    else:
                        vc[pos * n_kvd + r - n_q - n_kvd] = qkv[r]
                gen += 1
                barrier(sync, n_threads, gen)
                # attention: this thread's heads
                _attend_heads(qkv, kc, vc, pos + 1, n_heads, n_kv, head_dim, scales[layer],
                              n_heads * t // n_threads, n_heads * (t + 1) // n_threads, scores, o)
                gen += 1
                barrier(sync, n_threads, gen)
                # output projection, residual
                w = wo[layer]
                lo, hi = d_model * t // n_threads, d_model * (t + 1) // n_threads
                if is_bf16:
                    _split_even_odd(o, oe, oo)
                    _rows_bf16(w, oe, oo, bo[layer], has_bias, lo, hi, tmp)
                else:
                    _rows_f32(w, o, bo[layer], has_bias, lo, hi, tmp)
                for r in range(lo, hi):
                    x[r] += tmp[r]
                gen += 1
                barrier(sync, n_threads, gen)
                # MLP: fc + GELU on this thread's rows
                _layer_norm_rows(x2, ln2[layer, 0], ln2[layer, 1], True, eps, h)
                w = wfc[layer]
                lo, hi = n_inner * t // n_threads, n_inner * (t + 1) // n_threads
                if is_bf16:
                    _split_even_odd(h[0], he, ho)
                    _rows_bf16(w, he, ho, bfc[layer], has_bias, lo, hi, tmp)
                else:
                    _rows_f32(w, h[0], bfc[layer], has_bias, lo, hi, tmp)
                _gelu_flat(tmp[lo:hi], tanh_gelu, f[lo:hi])
                gen += 1
                barrier(sync, n_threads, gen)
                # proj, residual
                w = wproj[layer]
                lo, hi = d_model * t // n_threads, d_model * (t + 1) // n_threads
                if is_bf16:
                    _split_even_odd(f, fe, fo)
                    _rows_bf16(w, fe, fo, bproj[layer], has_bias, lo, hi, tmp)
                else:
                    _rows_f32(w, f, bproj[layer], has_bias, lo, hi, tmp)
                for r in range(lo, hi):
                    x[r] += tmp[r]
                gen += 1
                barrier(sync, n_threads, gen)
            # final norm and the output head
            _layer_norm_rows(x2, lnf[0], lnf[1], True, eps, h)
            n_rows = lm_head.shape[0]
            lo, hi = n_rows * t // n_threads, n_rows * (t + 1) // n_threads
            if is_bf16:
                _split_even_odd(h[0], he, ho)
                _rows_bf16(lm_head, he, ho, bo[0], False, lo, hi, logits)
            else:
                _rows_f32(lm_head, h[0], bo[0], False, lo, hi, logits)

    step.__name__ = step.__qualname__ = f"fused_decode_{'bf16' if is_bf16 else 'f32'}"
    return numba.njit(parallel=True, **_OPTS)(step)


_KERNELS: dict = {}


def _kernel(is_bf16: bool):
    if is_bf16 not in _KERNELS:
        _KERNELS[is_bf16] = _make(is_bf16)
    return _KERNELS[is_bf16]


# --- the plan: which models, and the arrays the kernel takes ----------------------------------------


def _weight_kind(w, k_multiple: int = 32):
    """"f32" / "bf16" for a C-contiguous 2-D weight the row kernels stream, else None."""
    if not isinstance(w, np.ndarray) or w.ndim != 2 or not w.flags.c_contiguous or w.shape[1] % k_multiple:
        return None
    if w.dtype == np.float32:
        return "f32"
    return "bf16" if w.dtype.name == "bfloat16" else None


def _norm_pair(weight, bias, n):
    """[2, n] float64: a LayerNorm's weight and bias (zeros when it has none)."""
    return np.stack([np.asarray(weight, np.float64).reshape(n),
                     np.zeros(n) if bias is None else np.asarray(bias, np.float64).reshape(n)])


def _f32(a, n):
    return np.zeros(n, np.float32) if a is None else np.asarray(a, np.float32).reshape(n)


def plan(config, weights, dtype=np.float32):
    """A :class:`FusedDecode` for this model, or None when it is not a kind the fused step takes
    (see the module doc) or the host has no AVX-512 (the row kernels use it)."""
    from gptevo.model import gelu_approximate, mlp_kind

    c, w = config, weights
    if np.dtype(dtype) != np.float32 or not has_avx512():
        return None
    if (c.norm != "layernorm" or c.block_order != "pre" or c.position != "learned" or c.qk_norm
            or c.embedding_scale != 1.0 or c.attention_sinks or c.num_heads % c.num_kv_heads):
        return None
    if any(c.window_for_layer(i) is not None or mlp_kind(c, i) != "gelu" for i in range(c.num_layers)):
        return None
    if w.pos_embed is None or w.lm_head is None or not w.layers:
        return None
    mats = [getattr(L, n) for L in w.layers for n in ("wqkv", "wo", "w_fc", "w_proj")] + [w.lm_head]
    kinds = {_weight_kind(m) for m in mats}
    if len(kinds) != 1 or None in kinds or any(getattr(L, "sinks", None) is not None for L in w.layers):
        return None
    D, H, G, Dh = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    inner = w.layers[0].w_fc.shape[0]
    shapes = {(m.shape[0], m.shape[1]) for L in w.layers for m in (L.w_fc,)}
    if (shapes != {(inner, D)} or any(L.wqkv.shape != ((H + 2 * G) * Dh, D) or L.wo.shape != (D, H * Dh)
                                      or L.w_proj.shape != (D, inner) for L in w.layers)
            or w.lm_head.shape[1] != D or (H * Dh) % 32 or D % 32 or inner % 32):
        return None
    return FusedDecode(c, w, kinds.pop() == "bf16", gelu_approximate(c) == "tanh")


class FusedDecode:
    """Callable ``(token, cache) -> logits [1, V] float32``, or None when the step did not run (then
    nothing was written and this object is disabled: the caller runs the ops). Checks the cache:
    host buffers, full-attention layers, one length for every layer, room for one more position."""

    def __init__(self, config, weights, is_bf16: bool, tanh_gelu: bool):
        c, w = config, weights
        L = w.layers
        n = len(L)
        as_bits = (lambda a: a.view(np.uint16)) if is_bf16 else (lambda a: a)
        self.config, self.is_bf16, self.tanh_gelu, self.disabled = c, is_bf16, tanh_gelu, False
        self.embed, self.pos_embed = w.embed, w.pos_embed
        self.wqkv = tuple(as_bits(x.wqkv) for x in L)
        self.wo = tuple(as_bits(x.wo) for x in L)
        self.wfc = tuple(as_bits(x.w_fc) for x in L)
        self.wproj = tuple(as_bits(x.w_proj) for x in L)
        self.lm_head = as_bits(w.lm_head)
        D = c.hidden_size
        self.ln1 = np.stack([_norm_pair(x.attn_norm, x.attn_norm_bias, D) for x in L])      # [L,2,D]
        self.ln2 = np.stack([_norm_pair(x.mlp_norm, x.mlp_norm_bias, D) for x in L])        # [L,2,D]
        self.lnf = _norm_pair(w.final_norm, w.final_norm_bias, D)                          # [2,D]
        n_qkv, inner = L[0].wqkv.shape[0], L[0].w_fc.shape[0]
        self.bqkv = np.stack([_f32(x.bqkv, n_qkv) for x in L])                          # [L,(H+2G)Dh]
        self.bo = np.stack([_f32(x.bo, D) for x in L])                                  # [L,D]
        self.bfc = np.stack([_f32(x.b_fc, inner) for x in L])                           # [L,I]
        self.bproj = np.stack([_f32(x.b_proj, D) for x in L])                           # [L,D]
        base = c.attn_scale if c.attn_scale is not None else 1.0 / math.sqrt(c.head_dim)
        self.scales = np.array([base / (i + 1) if c.attn_scale_inverse_layer else base for i in range(n)])
        self.qkv = np.empty(n_qkv, np.float32)
        self.o = np.empty(c.num_heads * c.head_dim, np.float32)
        self.f = np.empty(inner, np.float32)
        self.tmp = np.empty(max(inner, D), np.float32)

    def _cache_ok(self, cache) -> bool:
        if cache.arrays is not None or cache.broken is not None or cache.dtype != np.float32:
            return False
        p = cache.length
        return (all(w is None for w in cache.windows) and all(n == p for n in cache._lengths)
                and p < cache.max_tokens and all(k.flags.c_contiguous for k in cache.keys)
                and all(v.flags.c_contiguous for v in cache.values))

    def __call__(self, token: int, cache):
        if self.disabled or not self._cache_ok(cache):
            return None
        p = cache.length
        x = (np.asarray(self.embed[token], np.float32) + np.asarray(self.pos_embed[p], np.float32))   # [D]
        x = np.ascontiguousarray(x, np.float32)
        logits = np.empty(self.lm_head.shape[0], np.float32)                                   # [V]
        sync = np.zeros(SYNC_SIZE, np.int64)
        c = self.config
        _kernel(self.is_bf16)(
            x, p, self.wqkv, self.wo, self.wfc, self.wproj, self.ln1, self.ln2, self.lnf,
            self.bqkv, self.bo, self.bfc, self.bproj, True, self.lm_head,
            tuple(k.reshape(-1) for k in cache.keys), tuple(v.reshape(-1) for v in cache.values),
            self.scales, float(c.norm_eps), self.tanh_gelu, c.num_heads, c.num_kv_heads, c.head_dim,
            self.qkv, self.o, self.f, self.tmp, logits, sync, numba.get_num_threads())
        if sync[VERDICT] != 1:
            self.disabled = True
            return None
        for i in range(len(cache.positions)):
            cache.positions[i][p] = p
            cache._lengths[i] = p + 1
        return logits.reshape(1, -1)
