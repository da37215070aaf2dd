"""MoE routing, experts, combine and the load-balancing loss, against hand computations."""
import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from gptevo.errors import RequestError
from gptevo.ops import REGISTRY
from gptevo.ops.moe import moe_aux_loss, moe_combine, moe_experts, moe_route
from gptevo.ops.mxfp4 import Mxfp4Weight, mxfp4_encode


def softmax_py(values):
    m = max(values)
    e = [math.exp(v - m) for v in values]
    return [v / sum(e) for v in e]


def naive_expert(x, w_gu, b_gu, w_dn, b_dn, activation, alpha=1.702, limit=7.0):
    """One expert on one token, float64, written from the equations with Python loops."""
    two_i, d = w_gu.shape
    h = [sum(float(w_gu[r, c]) * float(x[c]) for c in range(d)) + (float(b_gu[r]) if b_gu is not None else 0.0)
         for r in range(two_i)]
    i = two_i // 2
    if activation == "swiglu":
        a = [h[j] / (1 + math.exp(-h[j])) * h[i + j] for j in range(i)]
    else:
        a = []
        for j in range(i):
            g, lin = min(h[2 * j], limit), max(min(h[2 * j + 1], limit), -limit)
            a.append(g / (1 + math.exp(-alpha * g)) * (lin + 1))
    return np.array([sum(float(w_dn[r, c]) * a[c] for c in range(i)) + (float(b_dn[r]) if b_dn is not None else 0.0)
                     for r in range(w_dn.shape[0])])


def random_experts(rng, e, d, i, dtype=np.float64, scale=0.5):
    return ((scale * rng.standard_normal((e, 2 * i, d))).astype(dtype),
            (scale * rng.standard_normal((e, 2 * i))).astype(dtype),
            (scale * rng.standard_normal((e, d, i))).astype(dtype),
            (scale * rng.standard_normal((e, d))).astype(dtype))


def test_registered():
    for name in ("moe_route", "moe_combine", "moe_experts"):
        assert REGISTRY[name].backend_op
    assert not REGISTRY["moe_aux_loss"].backend_op


@pytest.mark.parametrize("activation", ["swiglu", "clamped_swiglu"])
def test_k_equals_e_is_the_dense_mixture(activation):
    rng = np.random.default_rng(0)
    t, e, d, i = 3, 4, 6, 5
    x = 2 * rng.standard_normal((t, d))
    logits = rng.standard_normal((t, e))
    w_gu, b_gu, w_dn, b_dn = random_experts(rng, e, d, i, scale=1.0)
    weights, ids = moe_route(logits=logits, k=e, order="softmax_topk")
    out = moe_experts(x=x, weights=weights, ids=ids, w_gate_up=w_gu, b_gate_up=b_gu, w_down=w_dn,
                      b_down=b_dn, activation=activation)
    for tok in range(t):
        p = softmax_py([float(v) for v in logits[tok]])
        dense = sum(p[j] * naive_expert(x[tok], w_gu[j], b_gu[j], w_dn[j], b_dn[j], activation) for j in range(e))
        np.testing.assert_allclose(out[tok], dense, rtol=1e-12, atol=1e-12)


def test_topk_softmax_picks_largest_logits_and_sums_to_one():
    rng = np.random.default_rng(1)
    logits = (3 * rng.standard_normal((6, 10))).astype(np.float32)
    weights, ids = moe_route(logits=logits, k=4, order="topk_softmax")
    assert weights.dtype == np.float32 and ids.dtype == np.int64 and weights.shape == (6, 4)
    for tok in range(6):
        row = [float(v) for v in logits[tok]]
        want = sorted(range(10), key=lambda j: -row[j])[:4]
        assert ids[tok].tolist() == want
        np.testing.assert_allclose(weights[tok], softmax_py([row[j] for j in want]), rtol=1e-6)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("renormalize", [False, True])
def test_softmax_topk_renormalization_both_ways(renormalize):
    # Qwen3-MoE norm_topk_prob=false keeps the raw top-k probabilities; true (and Mixtral) divides
    # them by their sum.
    logits = np.array([[0.1, 2.0, -1.0, 1.5, 0.3], [3.0, 0.0, 0.0, -2.0, 2.9]])
    weights, ids = moe_route(logits=logits, k=2, order="softmax_topk", renormalize=renormalize)
    assert ids.tolist() == [[1, 3], [0, 4]]
    for tok in range(2):
        p = softmax_py(logits[tok].tolist())
        kept = [p[j] for j in ids[tok]]
        want = [v / sum(kept) for v in kept] if renormalize else kept
        np.testing.assert_allclose(weights[tok], want, rtol=1e-14)
    assert (abs(weights.sum(axis=1) - 1) < 1e-14).all() == renormalize


def test_rows_sorted_by_weight_and_ties_take_lower_index():
    logits = np.array([[1.0, 5.0, 5.0, 0.0, 5.0]], np.float32)
    for order in ("softmax_topk", "topk_softmax"):
        weights, ids = moe_route(logits=logits, k=3, order=order)
        assert ids.tolist() == [[1, 2, 4]]
        assert (np.diff(weights[0]) <= 0).all()


@given(hnp.arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(2, 9)),
                  elements=st.floats(-30, 30)),
       st.data())
def test_route_properties(logits, data):
    e = logits.shape[1]
    k = data.draw(st.integers(1, e))
    order = data.draw(st.sampled_from(["softmax_topk", "topk_softmax"]))
    weights, ids = moe_route(logits=logits, k=k, order=order)
    for tok in range(logits.shape[0]):
        assert len(set(ids[tok].tolist())) == k
        kept_min = min(logits[tok, ids[tok]])
        dropped = np.delete(logits[tok], ids[tok])
        assert (dropped <= kept_min).all()
        assert (np.diff(weights[tok]) <= 1e-15).all()
    if order == "topk_softmax":
        np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-12)


def test_route_accepts_bf16_logits():
    logits = np.array([[0.5, -1.0, 2.0]], ml_dtypes.bfloat16)
    weights, ids = moe_route(logits=logits, k=2)
    assert weights.dtype == np.float32 and ids.tolist() == [[2, 0]]


@pytest.mark.parametrize("kwargs", [dict(k=0), dict(k=5), dict(k=2.0), dict(k=True), dict(k=2, order="topk")])
def test_route_rejects(kwargs):
    with pytest.raises(RequestError):
        moe_route(logits=np.zeros((2, 4), np.float32), **kwargs)


def test_combine_is_the_weighted_sum():
    rng = np.random.default_rng(2)
    y, w = rng.standard_normal((3, 2, 5)), rng.random((3, 2))
    out = moe_combine(expert_out=y, weights=w)
    for t in range(3):
        np.testing.assert_allclose(out[t], w[t, 0] * y[t, 0] + w[t, 1] * y[t, 1], rtol=1e-14)
    with pytest.raises(RequestError):
        moe_combine(expert_out=y, weights=w[:, :1])


@pytest.mark.parametrize("activation", ["swiglu", "clamped_swiglu"])
def test_down_bias_is_added_before_weighting(activation):
    # Zero weights: every expert outputs exactly its b_down, so out[t] = sum_j w_j * b_down[ids[t, j]].
    # Weights deliberately do not sum to 1, so "bias once after the sum" would differ.
    e, d, i = 4, 3, 2
    b_down = np.array([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0], [100.0, 0.0, 0.0], [0.0, 0.0, 7.0]])
    weights = np.array([[0.3, 0.2], [0.5, 0.25]])
    ids = np.array([[1, 3], [0, 2]])
    out = moe_experts(x=np.ones((2, d)), weights=weights, ids=ids,
                      w_gate_up=np.zeros((e, 2 * i, d)), b_gate_up=None, w_down=np.zeros((e, d, i)),
                      b_down=b_down, activation=activation)
    np.testing.assert_allclose(out, [[3.0, 6.0, 10.4], [25.5, 1.0, 1.5]], rtol=1e-15)


@pytest.mark.parametrize("activation", ["swiglu", "clamped_swiglu"])
def test_gate_up_row_layout(activation):
    # w_gate_up = 0 and w_down = identity expose the activation of h = b_gate_up directly.
    h = np.array([10.0, -9.0, -1.0, 0.5, 2.0, 8.0])                  # 2I = 6
    i = 3
    out = moe_experts(x=np.zeros((1, i)), weights=np.ones((1, 1)), ids=np.zeros((1, 1), np.int64),
                      w_gate_up=np.zeros((1, 2 * i, i)), b_gate_up=h[None], w_down=np.eye(i)[None],
                      b_down=None, activation=activation, alpha=1.702, limit=7.0)
    if activation == "swiglu":          # gate rows [0:I], up rows [I:2I]
        want = [h[j] / (1 + math.exp(-h[j])) * h[i + j] for j in range(i)]
    else:                               # gate = even rows (clamped above), linear = odd rows (clamped)
        want = [7.0 / (1 + math.exp(-1.702 * 7.0)) * (-7.0 + 1),
                -1.0 / (1 + math.exp(1.702)) * (0.5 + 1),
                2.0 / (1 + math.exp(-1.702 * 2.0)) * (7.0 + 1)]
    np.testing.assert_allclose(out[0], want, rtol=1e-14)


def test_mxfp4_weights_equal_decoded_float32_weights():
    rng = np.random.default_rng(3)
    t, e, k, d, i = 5, 4, 2, 64, 32
    w_gu, b_gu, w_dn, b_dn = random_experts(rng, e, d, i, dtype=np.float32)
    gu = Mxfp4Weight(*mxfp4_encode(w_gu))
    dn = Mxfp4Weight(*mxfp4_encode(w_dn))
    x = rng.standard_normal((t, d)).astype(np.float32)
    weights, ids = moe_route(logits=rng.standard_normal((t, e)).astype(np.float32), k=k, order="topk_softmax")
    for activation in ("swiglu", "clamped_swiglu"):
        packed = moe_experts(x=x, weights=weights, ids=ids, w_gate_up=gu, b_gate_up=b_gu, w_down=dn,
                             b_down=b_dn, activation=activation)
        dense = moe_experts(x=x, weights=weights, ids=ids, w_gate_up=gu.decode("float32"), b_gate_up=b_gu,
                            w_down=dn.decode("float32"), b_down=b_dn, activation=activation)
        assert packed.dtype == np.float32
        np.testing.assert_array_equal(packed, dense)


def test_unused_experts_are_never_decoded():
    # Expert 1 has NaN scales (0xFF): if it were decoded and used, the output would be NaN.
    rng = np.random.default_rng(4)
    d, i = 32, 32
    gu_blocks, gu_scales = mxfp4_encode(rng.standard_normal((2, 2 * i, d)))
    dn_blocks, dn_scales = mxfp4_encode(rng.standard_normal((2, d, i)))
    gu_scales[1] = 255
    dn_scales[1] = 255
    out = moe_experts(x=rng.standard_normal((3, d)).astype(np.float32), weights=np.ones((3, 1), np.float32),
                      ids=np.zeros((3, 1), np.int64), w_gate_up=Mxfp4Weight(gu_blocks, gu_scales), b_gate_up=None,
                      w_down=Mxfp4Weight(dn_blocks, dn_scales), b_down=None, activation="clamped_swiglu")
    assert np.isfinite(out).all()


def test_bf16_weights_equal_their_float32_widening():
    rng = np.random.default_rng(5)
    w_gu, b_gu, w_dn, b_dn = random_experts(rng, 3, 8, 4, dtype=ml_dtypes.bfloat16)
    x = rng.standard_normal((2, 8)).astype(np.float32)
    weights, ids = np.array([[0.7, 0.3], [0.6, 0.4]], np.float32), np.array([[2, 0], [1, 2]])
    a = moe_experts(x=x, weights=weights, ids=ids, w_gate_up=w_gu, b_gate_up=b_gu, w_down=w_dn, b_down=b_dn)
    b = moe_experts(x=x, weights=weights, ids=ids, w_gate_up=w_gu.astype(np.float32),
                    b_gate_up=b_gu.astype(np.float32), w_down=w_dn.astype(np.float32),
                    b_down=b_dn.astype(np.float32))
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("change", ["ids_range", "activation", "w_down_shape", "bias_shape", "x_width"])
def test_experts_reject(change):
    e, d, i = 2, 4, 3
    kw = dict(x=np.zeros((1, d)), weights=np.ones((1, 1)), ids=np.zeros((1, 1), np.int64),
              w_gate_up=np.zeros((e, 2 * i, d)), b_gate_up=None, w_down=np.zeros((e, d, i)), b_down=None)
    if change == "ids_range":
        kw["ids"] = np.full((1, 1), e)
    elif change == "activation":
        kw["activation"] = "gelu"
    elif change == "w_down_shape":
        kw["w_down"] = np.zeros((e, i, d))
    elif change == "bias_shape":
        kw["b_down"] = np.zeros((e, d + 1))
    else:
        kw["x"] = np.zeros((1, d + 1))
    with pytest.raises(RequestError):
        moe_experts(**kw)


def aux_loss_by_hand(probs, ids):
    t, e = probs.shape
    k = ids.shape[1]
    f = [sum(1 for tok in range(t) for j in range(k) if ids[tok, j] == i) / (t * k) for i in range(e)]
    p = [sum(float(probs[tok, i]) for tok in range(t)) / t for i in range(e)]
    return e * sum(f[i] * p[i] for i in range(e))


@given(st.integers(1, 6), st.integers(2, 6), st.data())
def test_aux_loss_matches_its_equation(t, e, data):
    k = data.draw(st.integers(1, e))
    logits = data.draw(hnp.arrays(np.float64, (t, e), elements=st.floats(-5, 5)))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    ids = np.array([data.draw(st.permutations(range(e)))[:k] for _ in range(t)])
    assert moe_aux_loss(router_probs=probs, ids=ids) == pytest.approx(aux_loss_by_hand(probs, ids), rel=1e-12)


def test_aux_loss_is_one_for_uniform_routing_and_e_for_collapse():
    e = 4
    probs = np.full((8, e), 1 / e)
    ids = np.array([[(2 * t) % e, (2 * t + 1) % e] for t in range(8)])    # top-2: each expert 4 of 16 slots
    assert moe_aux_loss(router_probs=probs, ids=ids) == pytest.approx(1.0, rel=1e-15)
    collapsed = np.zeros((8, e))
    collapsed[:, 2] = 1.0
    assert moe_aux_loss(router_probs=collapsed, ids=np.full((8, 1), 2)) == pytest.approx(e, rel=1e-15)
    # Balanced assignments (f_i = 1/E) give 1 whatever the probabilities, since sum_i P_i = 1.
    rng = np.random.default_rng(6)
    p = rng.dirichlet(np.ones(e), size=8)
    assert moe_aux_loss(router_probs=p, ids=ids) == pytest.approx(1.0, rel=1e-12)


def test_aux_loss_rejects_bad_ids():
    with pytest.raises(RequestError):
        moe_aux_loss(router_probs=np.full((2, 3), 1 / 3), ids=np.array([[0], [3]]))
