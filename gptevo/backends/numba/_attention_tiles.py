"""Prefill attention in float32 with explicit SIMD tiles (the many-query path of ``_attention_flash``).

The same items, key tiles and online softmax as :func:`_attention_flash._flash_items` (see that
module), with the two products written as register-blocked vector code, because LLVM left the
loop form of them at 3-13 GFMA/s here (measured on one Zen 4 core) against 36 for this tiling:

- scores: 4 rows x 64 keys per pass, 16 vector accumulators; per d, four 16-key loads from the
  keys transposed per KV head (``kt`` [G, Dh, S_pad]) and one broadcast of q per row;
- values: 4 rows x 32 value dims per pass, 8 accumulators; per key, two 16-wide loads of the
  value row (``vt`` [G, S_pad, Dv_pad]) and one broadcast of each row's weight.

The wrapper pads keys to whole tiles (padded slots get position -1: never visible, value 0) and Dv
to a multiple of 32, and tells the kernel per tile the range of its key positions, so a tile whose
every key is visible to a row is scaled without a per-key mask test, and a tile that no row of the
block can see is skipped. Rows are padded to a multiple of 4 (the extra rows repeat the last one
and are never written out).
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from gptevo.backends.numba._simd import f32x16_bcast, f32x16_zero, load_f32x16, store_f32x16, vfma
from gptevo.backends.numba._vmath import exp32, exp64

KEY_BLOCK = 64            # keys per tile: four 16-lane vectors
_FAST = {"reassoc", "contract", "nsz", "arcp"}


@numba.njit(cache=True, error_model="numpy")
def item_queries(item, n_kv, q_block, n_q, qpos):
    """The parallel item ``item`` (KV head fastest) as (g, t0, tb, qmin, qmax): its KV head, first
    query, query count and the range of its query positions (which key tiles it can see)."""
    g = item % n_kv
    t0 = (item // n_kv) * q_block
    tb = min(n_q, t0 + q_block) - t0
    qmin = qpos[t0]
    qmax = qpos[t0]
    for t in range(t0, t0 + tb):
        qmin = min(qmin, qpos[t])
        qmax = max(qmax, qpos[t])
    return g, t0, tb, qmin, qmax


@numba.njit(cache=True, fastmath=_FAST, error_model="numpy")
def _scores(q, kt, g, s0, t0, tb, group, rows, sc):
    """sc[r, j] = q[row r] . k[s0 + j] for r < rows (padded to 4), j < 64; kt [G, Dh, S_pad]."""
    head_dim = kt.shape[1]
    s_pad = kt.shape[2]
    base_g = g * head_dim * s_pad
    for r in range(0, rows, 4):
        h0 = g * group + min(r, rows - 1) // tb
        h1 = g * group + min(r + 1, rows - 1) // tb
        h2 = g * group + min(r + 2, rows - 1) // tb
        h3 = g * group + min(r + 3, rows - 1) // tb
        u0 = t0 + min(r, rows - 1) % tb
        u1 = t0 + min(r + 1, rows - 1) % tb
        u2 = t0 + min(r + 2, rows - 1) % tb
        u3 = t0 + min(r + 3, rows - 1) % tb
        a0 = f32x16_zero(); a1 = f32x16_zero(); a2 = f32x16_zero(); a3 = f32x16_zero()      # noqa: E702
        b0 = f32x16_zero(); b1 = f32x16_zero(); b2 = f32x16_zero(); b3 = f32x16_zero()      # noqa: E702
        c0 = f32x16_zero(); c1 = f32x16_zero(); c2 = f32x16_zero(); c3 = f32x16_zero()      # noqa: E702
        e0 = f32x16_zero(); e1 = f32x16_zero(); e2 = f32x16_zero(); e3 = f32x16_zero()      # noqa: E702
        for d in range(head_dim):
            off = base_g + d * s_pad + s0
            k0 = load_f32x16(kt, off)
            k1 = load_f32x16(kt, off + 16)
            k2 = load_f32x16(kt, off + 32)
            k3 = load_f32x16(kt, off + 48)
            x = f32x16_bcast(q[u0, h0, d])
            a0 = vfma(x, k0, a0); a1 = vfma(x, k1, a1); a2 = vfma(x, k2, a2); a3 = vfma(x, k3, a3)  # noqa: E702
            x = f32x16_bcast(q[u1, h1, d])
            b0 = vfma(x, k0, b0); b1 = vfma(x, k1, b1); b2 = vfma(x, k2, b2); b3 = vfma(x, k3, b3)  # noqa: E702
            x = f32x16_bcast(q[u2, h2, d])
            c0 = vfma(x, k0, c0); c1 = vfma(x, k1, c1); c2 = vfma(x, k2, c2); c3 = vfma(x, k3, c3)  # noqa: E702
            x = f32x16_bcast(q[u3, h3, d])
            e0 = vfma(x, k0, e0); e1 = vfma(x, k1, e1); e2 = vfma(x, k2, e2); e3 = vfma(x, k3, e3)  # noqa: E702
        o = r * KEY_BLOCK
        store_f32x16(sc, o, a0); store_f32x16(sc, o + 16, a1); store_f32x16(sc, o + 32, a2)        # noqa: E702
        store_f32x16(sc, o + 48, a3); store_f32x16(sc, o + 64, b0); store_f32x16(sc, o + 80, b1)    # noqa: E702
        store_f32x16(sc, o + 96, b2); store_f32x16(sc, o + 112, b3); store_f32x16(sc, o + 128, c0)  # noqa: E702
        store_f32x16(sc, o + 144, c1); store_f32x16(sc, o + 160, c2); store_f32x16(sc, o + 176, c3)  # noqa: E702
        store_f32x16(sc, o + 192, e0); store_f32x16(sc, o + 208, e1); store_f32x16(sc, o + 224, e2)  # noqa: E702
        store_f32x16(sc, o + 240, e3)


@numba.njit(cache=True, fastmath=_FAST, error_model="numpy")
def _weighted_values(vt, g, s0, n, rows, sc, acc):
    """acc[r, :] += sum_{j < n} sc[r, j] * v[s0 + j] for r < rows (padded to 4); vt [G, S_pad, Dv_pad]."""
    s_pad, dv_pad = vt.shape[1], vt.shape[2]
    base_g = g * s_pad * dv_pad
    for r in range(0, rows, 4):
        for e in range(0, dv_pad, 32):
            o0 = r * dv_pad + e
            o1 = o0 + dv_pad
            o2 = o1 + dv_pad
            o3 = o2 + dv_pad
            a0 = load_f32x16(acc, o0); a1 = load_f32x16(acc, o0 + 16)                    # noqa: E702
            b0 = load_f32x16(acc, o1); b1 = load_f32x16(acc, o1 + 16)                    # noqa: E702
            c0 = load_f32x16(acc, o2); c1 = load_f32x16(acc, o2 + 16)                    # noqa: E702
            d0 = load_f32x16(acc, o3); d1 = load_f32x16(acc, o3 + 16)                    # noqa: E702
            for j in range(n):
                off = base_g + (s0 + j) * dv_pad + e
                v0 = load_f32x16(vt, off)
                v1 = load_f32x16(vt, off + 16)
                x = f32x16_bcast(sc[r, j])
                a0 = vfma(x, v0, a0); a1 = vfma(x, v1, a1)                                # noqa: E702
                x = f32x16_bcast(sc[r + 1, j])
                b0 = vfma(x, v0, b0); b1 = vfma(x, v1, b1)                                # noqa: E702
                x = f32x16_bcast(sc[r + 2, j])
                c0 = vfma(x, v0, c0); c1 = vfma(x, v1, c1)                                # noqa: E702
                x = f32x16_bcast(sc[r + 3, j])
                d0 = vfma(x, v0, d0); d1 = vfma(x, v1, d1)                                # noqa: E702
            store_f32x16(acc, o0, a0); store_f32x16(acc, o0 + 16, a1)                    # noqa: E702
            store_f32x16(acc, o1, b0); store_f32x16(acc, o1 + 16, b1)                    # noqa: E702
            store_f32x16(acc, o2, c0); store_f32x16(acc, o2 + 16, c1)                    # noqa: E702
            store_f32x16(acc, o3, d0); store_f32x16(acc, o3 + 16, d1)                    # noqa: E702


@numba.njit(cache=True, fastmath=_FAST, error_model="numpy")
def _softmax_update(srow, qt, kpos, s0, full, window, scale, slope, has_alibi, m, den, acc_row):
    """Online softmax step of one row over one tile (float32; exp32): mask / scale / ALiBi the 64
    scores in ``srow``, rescale ``acc_row`` and ``den`` to the new maximum, turn the scores into
    weights (0 where masked); returns (new max, saw a NaN)."""
    top = np.float32(-np.inf)
    nan = False
    if full and not has_alibi:
        sc32 = np.float32(scale)
        for j in range(KEY_BLOCK):
            x = srow[j] * sc32
            srow[j] = x
            top = max(top, x)
            nan |= x != x
    else:
        for j in range(KEY_BLOCK):
            ks = kpos[s0 + j]
            if ks >= 0 and ks <= qt and (window <= 0 or ks > qt - window):
                x = float(srow[j]) * scale
                if has_alibi:
                    x -= slope * float(qt - ks)
                srow[j] = x
                if x != x:
                    nan = True
                elif x > top:
                    top = np.float32(x)
            else:
                srow[j] = -np.inf
    new_m = max(m, float(top))
    if new_m == -np.inf:          # nothing visible to this row yet: weights 0
        for j in range(KEY_BLOCK):
            srow[j] = 0
        return m, nan
    if m != new_m:
        alpha = exp64(m - new_m)
        den[0] *= alpha
        a32 = np.float32(alpha)
        for e in range(acc_row.shape[0]):
            acc_row[e] *= a32
    m32 = np.float32(new_m)
    total = np.float32(0)
    for j in range(KEY_BLOCK):
        p = exp32(srow[j] - m32)
        srow[j] = p
        total += p
    den[0] += float(total)
    return new_m, nan


@numba.njit(cache=True, fastmath=_FAST, error_model="numpy", parallel=True)
def flash_tiles(q, kt, vt, qpos, kpos, tile_min, tile_max, tile_full, window, sinks, has_sink, slopes, has_alibi,
                scale, order, q_block, out):
    """q [T,H,Dh] float32, kt [G,Dh,S_pad], vt [G,S_pad,Dv_pad], kpos [S_pad] (-1 padded); per tile:
    min / max valid key position (tile_min > tile_max: no valid key) and whether every slot is
    valid; out [T,H,Dv]. Items as in ``_attention_flash``."""
    n_q, n_heads, _ = q.shape
    n_kv, _, s_pad = kt.shape
    dv = out.shape[2]
    dv_pad = vt.shape[2]
    group = n_heads // n_kv
    for it in prange(order.shape[0]):
        g, t0, tb, qmin, qmax = item_queries(order[it], n_kv, q_block, n_q, qpos)
        rows = group * tb
        rows4 = (rows + 3) // 4 * 4
        m = np.empty(rows4)                                       # [rows4] float64 running max
        den = np.zeros((rows4, 1))                                # [rows4,1] float64 denominator
        nan_row = np.zeros(rows4, np.bool_)
        acc = np.zeros((rows4, dv_pad), np.float32)               # [rows4,Dv_pad]
        sc = np.empty((rows4, KEY_BLOCK), np.float32)             # [rows4,64] scores, then weights
        for r in range(rows4):
            h = g * group + min(r, rows - 1) // tb
            m[r] = sinks[h] if has_sink else -np.inf
            den[r, 0] = 1.0 if has_sink else 0.0
        for tile in range(s_pad // KEY_BLOCK):
            lo, hi = tile_min[tile], tile_max[tile]
            if lo > hi or lo > qmax or (window > 0 and hi <= qmin - window):
                continue
            s0 = tile * KEY_BLOCK
            _scores(q, kt, g, s0, t0, tb, group, rows4, sc)
            for r in range(rows4):
                rr = min(r, rows - 1)
                h = g * group + rr // tb
                qt = qpos[t0 + rr % tb]
                full = tile_full[tile] and hi <= qt and (window <= 0 or lo > qt - window)
                m[r], bad = _softmax_update(sc[r], qt, kpos, s0, full, window, scale,
                                            slopes[h] if has_alibi else 0.0, has_alibi, m[r], den[r], acc[r])
                if bad:
                    nan_row[r] = True
            _weighted_values(vt, g, s0, KEY_BLOCK, rows4, sc, acc)
        for r in range(rows):
            h = g * group + r // tb
            t = t0 + r % tb
            inv = 1.0 / den[r, 0] if den[r, 0] > 0 else 1.0
            for e in range(dv):
                out[t, h, e] = np.nan if nan_row[r] else acc[r, e] * inv


def attention_tiles(q, k, v, qpos, kpos, window, sinks, slopes, scale, out, order, q_block):
    """float32 q [T,H,Dh], k [S,G,Dh], v [S,G,Dv] (C-contiguous), positions int64; writes out."""
    n_k, n_kv, head_dim = k.shape
    dv = v.shape[2]
    s_pad = -(-n_k // KEY_BLOCK) * KEY_BLOCK
    dv_pad = -(-dv // 32) * 32
    kt = np.zeros((n_kv, head_dim, s_pad), np.float32)                        # [G,Dh,S_pad]
    kt[:, :, :n_k] = k.transpose(1, 2, 0)
    vt = np.zeros((n_kv, s_pad, dv_pad), np.float32)                          # [G,S_pad,Dv_pad]
    vt[:, :n_k, :dv] = v.transpose(1, 0, 2)
    kp = np.full(s_pad, -1, np.int64)                                         # [S_pad]
    kp[:n_k] = kpos
    tiles = kp.reshape(-1, KEY_BLOCK)                                         # [tiles,64]
    valid = tiles >= 0
    big = np.iinfo(np.int64).max
    tile_min = np.where(valid, tiles, big).min(axis=1)                        # [tiles]
    tile_max = np.where(valid, tiles, -1).max(axis=1)                         # [tiles]
    no_vec = np.zeros(1)
    flash_tiles(q, kt, vt, qpos, kp, tile_min, tile_max, valid.all(axis=1), window,
                no_vec if sinks is None else sinks, sinks is not None, no_vec if slopes is None else slopes,
                slopes is not None, scale, order, q_block, out)
