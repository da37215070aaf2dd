"""attention and attention_mask against a naive per-head float64 loop written from the equations."""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from gptevo.errors import RequestError
from gptevo.ops.attention import attention
from gptevo.ops.masks import attention_mask


def naive_attention(q, k, v, qpos=None, kpos=None, window=None, sinks=None, scale=None, slopes=None):
    """One query head and one query at a time, float64, plain Python sums."""
    T, H, Dh = q.shape
    S, G, Dv = v.shape
    qpos = list(range(S - T, S)) if qpos is None else list(qpos)
    kpos = list(range(S)) if kpos is None else list(kpos)
    scale = 1 / math.sqrt(Dh) if scale is None else scale
    per_kv = H // G
    out = np.zeros((T, H, Dv))
    for h in range(H):
        g = h // per_kv                                     # consecutive query heads share a KV head
        for t in range(T):
            logits = []
            for s in range(S):
                i, j = qpos[t], kpos[s]
                seen = 0 <= j <= i and (window is None or j > i - window)
                if seen:
                    score = scale * math.fsum(float(q[t, h, d]) * float(k[s, g, d]) for d in range(Dh))
                    if slopes is not None:
                        score -= float(slopes[h]) * (i - j)
                    logits.append((s, score))
            if not logits:
                continue
            top = max([sc for _, sc in logits] + ([float(sinks[h])] if sinks is not None else []))
            weights = [(s, math.exp(sc - top)) for s, sc in logits]
            denom = math.fsum(w for _, w in weights) + (math.exp(float(sinks[h]) - top) if sinks is not None else 0)
            for s, w in weights:
                out[t, h] += (w / denom) * v[s, g].astype(np.float64)
    return out


def qkv(rng, T, S, H, G, Dh, Dv=None, dtype=np.float64):
    Dv = Dh if Dv is None else Dv
    return (rng.standard_normal((T, H, Dh)).astype(dtype), rng.standard_normal((S, G, Dh)).astype(dtype),
            rng.standard_normal((S, G, Dv)).astype(dtype))


# ---------------------------------------------------------------------------- masks
@pytest.mark.parametrize("T,W", [(9, 1), (9, 3), (9, 9), (5, 128), (12, 4)])
def test_window_query_sees_exactly_keys_i_minus_w_plus_1_to_i(T, W):
    pos = np.arange(T)
    visible = attention_mask(pos, pos, window=W)
    for i in range(T):
        assert set(np.flatnonzero(visible[i])) == set(range(max(0, i - W + 1), i + 1))
        assert visible[i].sum() == min(i + 1, W)


def test_causal_mask_and_empty_slots():
    visible = attention_mask(np.arange(4), np.array([0, 1, -1, 3, 2]))
    expected = np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 1], [1, 1, 0, 1, 1]], bool)
    np.testing.assert_array_equal(visible, expected)
    assert visible.dtype == bool and visible.shape == (4, 5)


def test_mask_rejects_bad_windows_and_positions():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(RequestError, match="window"):
            attention_mask(np.arange(3), np.arange(3), window=bad)
    with pytest.raises(RequestError, match="q_positions"):
        attention_mask(np.zeros((2, 2), int), np.arange(3))
    with pytest.raises(RequestError, match="k_positions"):
        attention_mask(np.arange(3), np.arange(3.0))


# ---------------------------------------------------------------------------- attention vs naive
@pytest.mark.parametrize("H,G", [(4, 4), (6, 6), (4, 1), (5, 1), (4, 2), (8, 2), (8, 4), (6, 3)])
def test_mha_mqa_gqa_equal_the_naive_loop(H, G):
    rng = np.random.default_rng(H * 10 + G)
    q, k, v = qkv(rng, 5, 5, H, G, 8, 6)
    np.testing.assert_allclose(attention(q, k, v), naive_attention(q, k, v), rtol=1e-12, atol=1e-12)


@given(T=st.integers(1, 6), extra=st.integers(0, 5), G=st.sampled_from([1, 2, 3]), ratio=st.sampled_from([1, 2, 4]),
       Dh=st.sampled_from([1, 3, 4, 8]), window=st.sampled_from([None, 1, 2, 3, 7]), sinks=st.booleans(),
       alibi=st.booleans(), seed=st.integers(0, 2**16))
def test_general_case_equals_the_naive_loop(T, extra, G, ratio, Dh, window, sinks, alibi, seed):
    rng = np.random.default_rng(seed)
    H, S = G * ratio, T + extra
    q, k, v = qkv(rng, T, S, H, G, Dh, Dh + 1)
    s = 2 * rng.standard_normal(H) if sinks else None
    slopes = 2.0 ** -np.arange(1, H + 1) if alibi else None
    got = attention(q, k, v, window=window, sinks=s, alibi_slopes=slopes)
    np.testing.assert_allclose(got, naive_attention(q, k, v, window=window, sinks=s, slopes=slopes),
                               rtol=1e-11, atol=1e-12)


def test_gqa_uses_repeat_interleave_not_tile():
    # two KV heads with very different values: query heads 0,1 must read KV head 0 and 2,3 KV head 1
    q = np.zeros((1, 4, 2))
    k = np.zeros((1, 2, 2))
    v = np.array([[[1.0], [-1.0]]])                                    # [S=1, G=2, Dv=1]
    np.testing.assert_array_equal(attention(q, k, v)[0, :, 0], [1.0, 1.0, -1.0, -1.0])


def test_window_at_least_t_equals_plain_causal():
    rng = np.random.default_rng(1)
    q, k, v = qkv(rng, 7, 7, 4, 2, 8)
    causal = attention(q, k, v)
    for W in (7, 8, 128):
        np.testing.assert_array_equal(attention(q, k, v, window=W), causal)
    assert not np.allclose(attention(q, k, v, window=6), causal)


@pytest.mark.parametrize("window,sinks", [(None, False), (3, False), (None, True), (4, True)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_decode_with_offset_equals_last_row_of_full_attention(window, sinks, dtype):
    rng = np.random.default_rng(7)
    S, H, G = 9, 8, 2
    q, k, v = qkv(rng, S, S, H, G, 16, dtype=dtype)
    s = rng.standard_normal(H).astype(dtype) if sinks else None
    full = attention(q, k, v, window=window, sinks=s)                   # prefill, T = S
    last = attention(q[-1:], k, v, window=window, sinks=s)              # decode, T=1 at position S-1
    explicit = attention(q[-1:], k, v, q_positions=np.array([S - 1]), k_positions=np.arange(S),
                         window=window, sinks=s)
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(last[0], full[-1], rtol=tol, atol=tol)
    np.testing.assert_array_equal(explicit, last)
    # two queries at offset 7: rows 7 and 8 of the full result
    np.testing.assert_allclose(attention(q[-2:], k, v, window=window, sinks=s), full[-2:], rtol=tol, atol=tol)


def test_ring_buffer_positions_give_the_same_answer_as_ordered_keys():
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng, 1, 6, 4, 2, 8)
    order = np.array([3, 4, 5, 0, 1, 2])                                # slots hold positions 3,4,5,0,1,2
    ref = attention(q, k, v, window=4)
    got = attention(q, k[order], v[order], q_positions=np.array([5]), k_positions=order, window=4)
    np.testing.assert_allclose(got, ref, rtol=1e-13)


def test_no_visible_key_gives_zeros_and_sinks_shrink_the_output():
    rng = np.random.default_rng(4)
    q, k, v = qkv(rng, 2, 3, 2, 1, 4)
    with np.errstate(all="raise"):
        out = attention(q, k, v, q_positions=np.array([0, 1]), k_positions=np.array([-1, -1, 1]))
    np.testing.assert_array_equal(out[0], 0.0)
    np.testing.assert_allclose(out[1], np.repeat(v[2], 2, axis=0))    # only key at position 1
    big = attention(q, k, v, sinks=np.array([50.0, 50.0]))
    assert np.abs(big).max() < 1e-15


def test_default_scale_and_explicit_scale():
    rng = np.random.default_rng(5)
    q, k, v = qkv(rng, 4, 4, 2, 2, 9)
    np.testing.assert_allclose(attention(q, k, v), attention(q, k, v, scale=1 / 3), rtol=1e-15)
    np.testing.assert_allclose(attention(q, k, v, scale=0.7), naive_attention(q, k, v, scale=0.7), rtol=1e-12)


def test_output_dtype_and_errors():
    rng = np.random.default_rng(6)
    q, k, v = qkv(rng, 3, 3, 4, 2, 8, dtype=np.float32)
    assert attention(q, k, v).dtype == np.float32
    assert attention(q.astype(np.float64), k, v).dtype == np.float64
    with pytest.raises(RequestError, match="multiple"):
        attention(q, k[:, :1].repeat(3, axis=1), v[:, :1].repeat(3, axis=1))     # H=4, G=3
    with pytest.raises(RequestError, match="disagree"):
        attention(q, k[..., :4], v)
    with pytest.raises(RequestError, match="disagree"):
        attention(q, k, v[:2])
    with pytest.raises(RequestError, match="q_positions"):
        attention(np.zeros((4, 4, 8), np.float32), k, v)                          # T > S
    with pytest.raises(RequestError, match="sinks"):
        attention(q, k, v, sinks=np.zeros(2))
    with pytest.raises(RequestError, match="k_positions"):
        attention(q, k, v, k_positions=np.arange(2))
    with pytest.raises(RequestError, match="window"):
        attention(q, k, v, window=0)
