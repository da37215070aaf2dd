"""Scaled dot-product attention: MHA, MQA and GQA, causal / sliding-window masks, sinks, ALiBi.

Written spec: ``spec/ops/attention.md``. Sources: the seed's attention equation and
"6. Grouped-Query Attention (GQA)" (head i uses KV group floor(i*G/H)); the GQA paper
(Ainslie et al., 2023) and MQA (Shazeer, 2019); the official gpt-oss ``sdpa`` for sinks and the
window; ALiBi (Press et al., 2022) for the linear bias.
"""
from __future__ import annotations

import math

import numpy as np

from gptevo.errors import RequestError
from gptevo.ops import checks
from gptevo.ops.masks import attention_mask, check_window
from gptevo.ops.softmax import softmax
from gptevo.ops.spec import Case, compute_dtype, op, unchecked

# The bodies attention composes: its arguments are checked once, by check_attention_args.
_attention_mask, _softmax = unchecked(attention_mask), unchecked(softmax)


def _cases(rng):
    """Prefill and decode, MHA/GQA 2 and 4/MQA, windows, sinks, ALiBi, odd sizes, f32 and f64."""
    specs = [
        # label,                           T, S, H, G, Dh, Dv, W,    sinks, alibi, dtype
        ("T=8,S=8,H=4,G=4,Dh=16",          8, 8, 4, 4, 16, 16, None, False, False, np.float32),
        ("T=1,S=9,H=4,G=2,W=3,sinks",      1, 9, 4, 2, 8, 8, 3, True, False, np.float32),
        ("T=7,S=7,H=8,G=2,Dh=5,W=3",       7, 7, 8, 2, 5, 5, 3, False, False, np.float32),
        ("T=5,S=5,H=3,G=1,MQA,f64",        5, 5, 3, 1, 4, 6, None, False, False, np.float64),
        ("T=3,S=11,H=8,G=2,offset,sinks",  3, 11, 8, 2, 16, 16, None, True, False, np.float32),
        ("T=6,S=6,H=4,G=1,W=2,sinks,f64",  6, 6, 4, 1, 8, 8, 2, True, False, np.float64),
        ("T=1,S=1,H=2,G=2,Dh=3",           1, 1, 2, 2, 3, 3, None, False, False, np.float32),
        ("T=9,S=9,H=4,G=4,alibi",          9, 9, 4, 4, 8, 8, None, False, True, np.float32),
        ("T=1,S=33,H=8,G=1,W=128,MQA",     1, 33, 8, 1, 32, 32, 128, False, False, np.float32),
        ("T=4,S=4,H=6,G=3,Dv=7,sinks",     4, 4, 6, 3, 8, 7, None, True, False, np.float32),
    ]
    for label, T, S, H, G, Dh, Dv, W, sinks, alibi, dtype in specs:
        kwargs = {"q": rng.standard_normal((T, H, Dh)).astype(dtype),
                  "k": rng.standard_normal((S, G, Dh)).astype(dtype),
                  "v": rng.standard_normal((S, G, Dv)).astype(dtype),
                  "window": W}
        if T < S:
            kwargs["q_positions"] = np.arange(S - T, S, dtype=np.int64)
            kwargs["k_positions"] = np.arange(S, dtype=np.int64)
        if sinks:
            kwargs["sinks"] = rng.standard_normal(H).astype(dtype)
        if alibi:
            kwargs["alibi_slopes"] = (2.0 ** (-8.0 * np.arange(1, H + 1) / H)).astype(dtype)
        yield Case(label, kwargs)


def _flops(q, k, v, **_):
    T, H, Dh = np.shape(q)
    S, Dv = np.shape(k)[0], np.shape(v)[2]
    return 2 * H * T * S * (Dh + Dv)


def check_attention_args(q, k, v, q_positions=None, k_positions=None, window=None, sinks=None, scale=None,
                         alibi_slopes=None) -> dict:
    """``attention``'s arguments, checked and defaulted.

    q, k, v real [T,H,Dh], [S,G,Dh], [S,G,Dv] with H a multiple of G >= 1; positions 1-D integer
    arrays [T] and [S], defaulted to keys 0..S-1 and queries the last T of them (NumPy arrays);
    window None or an int >= 1; sinks and alibi_slopes None or [H]; scale a float, defaulted to
    1/sqrt(Dh). Raises RequestError naming the argument, what was found and what was expected.
    """
    q = checks.real_array(q, "attention: q")
    k = checks.real_array(k, "attention: k")
    v = checks.real_array(v, "attention: v")
    if len(q.shape) != 3 or len(k.shape) != 3 or len(v.shape) != 3:
        raise RequestError(f"attention: q, k, v must be [T,H,Dh], [S,G,Dh], [S,G,Dv]; got shapes "
                           f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    T, H, Dh = q.shape
    S, G, _ = k.shape
    if k.shape[2] != Dh or tuple(v.shape[:2]) != (S, G):
        raise RequestError(f"attention: shapes disagree: q {tuple(q.shape)} (T,H,Dh), k {tuple(k.shape)} (S,G,Dh), "
                           f"v {tuple(v.shape)} (S,G,Dv)")
    if G == 0 or H % G:
        raise RequestError(f"attention: query heads H={H} must be a multiple of KV heads G={G}")
    if q_positions is None and T > S:
        raise RequestError(f"attention: {T} queries but only {S} keys; pass q_positions explicitly")
    qpos = np.arange(S - T, S) if q_positions is None else checks.array(q_positions)
    kpos = np.arange(S) if k_positions is None else checks.array(k_positions)
    if tuple(qpos.shape) != (T,) or tuple(kpos.shape) != (S,):
        raise RequestError(f"attention: q_positions must have shape ({T},) and k_positions ({S},), got "
                           f"{tuple(qpos.shape)} and {tuple(kpos.shape)}")
    for name, pos in (("q_positions", qpos), ("k_positions", kpos)):
        if pos.dtype.kind not in "iu":
            raise RequestError(f"attention: {name} must be integers, got dtype {pos.dtype}")
    window = check_window(window)
    for name, per_head in (("sinks", sinks), ("alibi_slopes", alibi_slopes)):
        if per_head is not None and checks.shape_of(per_head) != (H,):
            raise RequestError(f"attention: {name} must have shape ({H},) (one per query head), got "
                               f"{checks.shape_of(per_head)}")
    scale = 1.0 / math.sqrt(Dh) if scale is None else checks.finite_real(scale, "attention: scale")
    return {"q": q, "k": k, "v": v, "q_positions": qpos, "k_positions": kpos, "window": window,
            "sinks": None if sinks is None else checks.array(sinks), "scale": scale,
            "alibi_slopes": None if alibi_slopes is None else checks.array(alibi_slopes)}


@op("attention",
    signature="attention(q[T,H,Dh], k[S,G,Dh], v[S,G,Dv], q_positions[T]=None, k_positions[S]=None, "
              "window=None, sinks[H]=None, scale=None, alibi_slopes[H]=None) -> [T,H,Dv]",
    dtypes="q, k, v: f32|f64 (k, v may be stored f16/bf16, widened); sinks, alibi_slopes: any float; "
           "out: q's compute dtype",
    tolerance={"float32": 1e-5, "float64": 1e-12}, cases=_cases,
    source="seed 'Mathematical Foundations' + '6. Grouped-Query Attention (GQA)' + 'Sliding Window "
           "Attention' (corrected); GQA paper; official gpt-oss sdpa (sinks); ALiBi paper",
    spec_file="spec/ops/attention.md", flops=_flops, check=check_attention_args)
def attention(q, k, v, q_positions=None, k_positions=None, window=None, sinks=None, scale=None,
              alibi_slopes=None):
    """Softmax attention of T queries over S keys; returns ``[T, H, Dv]``.

    ``score[h,t,s] = scale * q[t,h] . k[s,g(h)] - slope_h * (qpos_t - kpos_s)``, masked to -inf
    where ``attention_mask(qpos, kpos, window)`` is False, then ``p = softmax(score, sinks[h])``
    and ``out[t,h] = sum_s p[h,t,s] * v[s,g(h)]``.

    - GQA: H query heads share G KV heads, ``g(h) = h // (H/G)`` (consecutive query heads share a
      KV head: repeat-interleave, as HF ``repeat_kv`` and gpt-oss; not tiling). G = H is MHA,
      G = 1 is MQA.
    - Positions default to ``k_positions = 0..S-1`` and ``q_positions = S-T..S-1`` (the queries
      are the last T keys: prefill when T = S, decode with a KV cache when T < S).
    - ``scale`` defaults to ``1/sqrt(Dh)``. ``sinks[H]`` are raw logits (not scaled).
    - A query that sees no key (possible only with empty cache slots) outputs zeros.
    """
    qpos, kpos = q_positions, k_positions
    T, H, Dh = q.shape
    S, G, _ = k.shape
    dtype = compute_dtype(q)

    group = H // G                                                 # query heads per KV head
    q = q.astype(dtype, copy=False)
    k = np.repeat(k.astype(dtype, copy=False), group, axis=1)      # [S,H,Dh] head h -> KV head h//group
    v = np.repeat(v.astype(dtype, copy=False), group, axis=1)      # [S,H,Dv]

    scores = np.einsum("thd,shd->hts", q, k) * dtype.type(scale)   # [H,T,S]
    if alibi_slopes is not None:
        slopes = np.asarray(alibi_slopes).astype(dtype)            # [H]
        distance = (qpos[:, None] - kpos[None, :]).astype(dtype)   # [T,S]
        scores = scores - slopes[:, None, None] * distance         # [H,T,S]
    visible = _attention_mask(qpos, kpos, window)                  # [T,S]
    scores = np.where(visible[None], scores, dtype.type(-np.inf))  # [H,T,S]
    sink = None if sinks is None else np.asarray(sinks).astype(dtype)[:, None]   # [H,1] -> rows [H,T]
    probs = _softmax(scores, sinks=sink)                           # [H,T,S]
    return np.einsum("hts,shd->thd", probs, v).astype(dtype, copy=False)   # [T,H,Dv]
