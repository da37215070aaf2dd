"""Row ranges and head ranges: the pieces the fused decode steps (``_fused_decode``, ``_fused_gptoss``)
run between two barriers, each on one thread's share.

Every helper does for ``[lo, hi)`` exactly what one of the backend's decode kernels does for all
rows: ``rows_f32`` / ``rows_bf16`` the float GEMVs (explicit 512-bit vectors, partial sums in four
registers), ``rows_q8`` the int8 mode's Q8 x Q8 rows (the body of ``_gemv_q8.gemv_q8``, which calls
it per chunk, so both give the same bits), ``rope_heads`` the ``apply_rope`` arithmetic, and
``attend_heads`` decode attention (scores in float32, scaled and exponentiated in float64 with the
ops' ``exp64``, sinks as the initial running maximum, softmax weights rounded to float32 in the
value sum).
Called once per range, never per element: a numba call with array arguments costs reference counts.
"""
from __future__ import annotations

import math

import numba
import numpy as np

from gptevo.backends.numba._simd import (bits_to_f32, dpbusd_x86, f16_to_f32, f32x16_bcast, f32x16_zero, hsum,
                                         i32_to_f32, i32x16_bcast, i32x16_zero, iand, isll, ixor, lane_f32,
                                         load_f16x16_f32, load_f32x16, load_i32x16, permps, vadd, vfma, vmul)
from gptevo.backends.numba._vmath import exp64

_OPTS = dict(cache=True, fastmath=False, error_model="numpy", nogil=True)
kjit = numba.njit(**_OPTS)
Q8_FLIP = np.int32(-0x7F7F7F80)          # 0x80808080: xor turns int8 q into unsigned q + 128


@kjit
def rows_f32(w, x, bias, has_bias, lo, hi, out):
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


@kjit
def rows_bf16(w, xe, xo, bias, has_bias, lo, hi, out):
    """``rows_f32`` for bfloat16 bits w [N,K] uint16 (K % 32 == 0) with x given as its even and odd
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


@kjit
def rows_q8(q, scales, xq, xs, corr, bias, has_bias, lo, hi, out, pick):
    """Rows [lo, hi) of the int8 mode's product (see ``_gemv_q8``): q [N,K] int8, scales [N,K/32]
    float16 as uint16 bits, xq/xs/corr from ``_gemv_q8.quantize_row``; K % 64 == 0, K >= 512;
    pick = ``_gemv_q8.PICK``."""
    k = q.shape[1]
    nb = k // 32
    n_sb = nb // 16
    flip = i32x16_bcast(Q8_FLIP)
    for n in range(lo, hi):
        base = n * k
        sbase = n * nb
        acc0 = f32x16_zero()
        acc1 = f32x16_zero()
        accc = f32x16_zero()
        for sb in range(n_sb):
            b0 = 16 * sb
            c16 = vmul(load_f16x16_f32(scales, sbase + b0), load_f32x16(xs, b0))     # [16] s * xs
            accc = vfma(c16, load_f32x16(corr, b0), accc)
            for p in range(0, 8, 2):
                o = 32 * (b0 + 2 * p)
                d0 = dpbusd_x86(i32x16_zero(), ixor(load_i32x16(q, base + o), flip), load_i32x16(xq, o))
                d1 = dpbusd_x86(i32x16_zero(), ixor(load_i32x16(q, base + o + 64), flip), load_i32x16(xq, o + 64))
                acc0 = vfma(i32_to_f32(d0), permps(c16, load_i32x16(pick, 64 * p)), acc0)
                acc1 = vfma(i32_to_f32(d1), permps(c16, load_i32x16(pick, 64 * p + 64)), acc1)
        tail = np.float32(0)
        t0 = 16 * n_sb
        if t0 < nb:                                   # the last nb % 16 blocks, in the window nb-16..nb
            w0 = nb - 16
            c16 = vmul(load_f16x16_f32(scales, sbase + w0), load_f32x16(xs, w0))
            for b in range(t0, nb, 2):
                o = 32 * b
                d0 = dpbusd_x86(i32x16_zero(), ixor(load_i32x16(q, base + o), flip), load_i32x16(xq, o))
                acc0 = vfma(i32_to_f32(d0), permps(c16, load_i32x16(pick, 32 * (b - w0))), acc0)
            for b in range(t0, nb):
                tail += f16_to_f32(scales[n, b]) * xs[b] * corr[b]
        y = hsum(vadd(acc0, acc1)) - hsum(accc) - tail
        out[n] = y + bias[n] if has_bias else y


@kjit
def split_even_odd(x, xe, xo):
    """xe[j] = x[2j], xo[j] = x[2j+1] (the input layout of rows_bf16 and the exact MXFP4 rows)."""
    for j in range(xe.shape[0]):
        xe[j] = x[2 * j]
        xo[j] = x[2 * j + 1]


@kjit
def permute_blocks(x, out):
    """Rows of x [M,K] (K % 32 == 0) into out [M,K] as ``_moe_tiles.permute_rows`` lays them out:
    per 32-value block its 16 even elements, then its 16 odd ones (the input of the bf16 tiles)."""
    for r in range(x.shape[0]):
        for b in range(x.shape[1] // 32):
            for i in range(16):
                out[r, 32 * b + i] = x[r, 32 * b + 2 * i]
                out[r, 32 * b + 16 + i] = x[r, 32 * b + 2 * i + 1]


@kjit
def rope_heads(v, h_lo, h_hi, head_dim, cos, sin, interleaved):
    """Rotate heads [h_lo, h_hi) of the flat [heads*Dh] vector v in place, as ``apply_rope``: pairs
    (a, b) of the first R = 2*len(cos) dims become (a cos - b sin, b cos + a sin)."""
    half = cos.shape[0]
    for h in range(h_lo, h_hi):
        o = h * head_dim
        for i in range(half):
            ia = o + (2 * i if interleaved else i)
            ib = o + (2 * i + 1 if interleaved else i + half)
            a = v[ia]
            b = v[ib]
            v[ia] = a * cos[i] - b * sin[i]
            v[ib] = b * cos[i] + a * sin[i]


@kjit
def attend_heads(q, h_lo, h_hi, keys, values, slot_pos, new_slot, pos, n_used, window, sinks, has_sink,
                 n_heads, n_kv, head_dim, scale, scores, out):
    """out[h*Dh:(h+1)*Dh] for query heads h in [h_lo, h_hi) of q [H*Dh] at position ``pos``, over
    cache slots 0..n_used-1 (keys / values flat [slots*G*Dh]; slot s holds position slot_pos[s], or
    ``pos`` for s == new_slot, whose key and value are already written). A key is visible when its
    position is in [0, pos] and, with window > 0, > pos - window. Sinks (float64 [H]) start the
    running maximum and the denominator (exp(0) = 1). Exponentials with ``exp64`` (as the ops);
    masked keys (weight exactly 0) are skipped in the value sum. Dh % 16 == 0 sums values in
    registers, 64 dims at a time. scores: float64 scratch [>= n_used]."""
    group = n_heads // n_kv
    simd = head_dim % 16 == 0
    for h in range(h_lo, h_hi):
        g = h // group
        q0 = h * head_dim
        m = sinks[h] if has_sink else -np.inf
        for s in range(n_used):
            kp = pos if s == new_slot else slot_pos[s]
            if kp < 0 or kp > pos or (window > 0 and kp <= pos - window):
                scores[s] = -np.inf
                continue
            kb = (s * n_kv + g) * head_dim
            if simd:
                acc = f32x16_zero()
                for d in range(0, head_dim, 16):
                    acc = vfma(load_f32x16(q, q0 + d), load_f32x16(keys, kb + d), acc)
                sc = float(hsum(acc)) * scale
            else:
                sf = np.float32(0)
                for d in range(head_dim):
                    sf += q[q0 + d] * keys[kb + d]
                sc = float(sf) * scale
            scores[s] = sc
            m = max(m, sc)
        m = m if math.isfinite(m) else 0.0
        den = exp64(sinks[h] - m) if has_sink else 0.0
        for s in range(n_used):
            e = exp64(scores[s] - m)
            scores[s] = e
            den += e
        if simd:
            for d0 in range(0, head_dim, 64):
                nv = min(4, (head_dim - d0) // 16)
                a0 = f32x16_zero()
                a1 = f32x16_zero()
                a2 = f32x16_zero()
                a3 = f32x16_zero()
                for s in range(n_used):
                    e = scores[s]
                    if e == 0.0:
                        continue
                    ew = f32x16_bcast(np.float32(e))
                    vb = (s * n_kv + g) * head_dim + d0
                    a0 = vfma(ew, load_f32x16(values, vb), a0)
                    if nv > 1:
                        a1 = vfma(ew, load_f32x16(values, vb + 16), a1)
                    if nv > 2:
                        a2 = vfma(ew, load_f32x16(values, vb + 32), a2)
                    if nv > 3:
                        a3 = vfma(ew, load_f32x16(values, vb + 48), a3)
                for i in range(nv):
                    a = a0 if i == 0 else (a1 if i == 1 else (a2 if i == 2 else a3))
                    for lane in range(16):
                        out[q0 + d0 + 16 * i + lane] = float(lane_f32(a, np.int32(lane))) / den if den > 0 else 0.0
        else:
            for d in range(head_dim):
                out[q0 + d] = 0.0
            for s in range(n_used):
                e = scores[s]
                if e == 0.0:
                    continue
                ew = np.float32(e)
                vb = (s * n_kv + g) * head_dim
                for d in range(head_dim):
                    out[q0 + d] += ew * values[vb + d]
            for d in range(head_dim):
                out[q0 + d] = out[q0 + d] / den if den > 0 else 0.0
