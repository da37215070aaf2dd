"""Inverted dropout and pre-/post-norm residual blocks."""
import numpy as np
import pytest

from gptevo.errors import RequestError
from gptevo.ops import REGISTRY
from gptevo.ops.blocks import residual_block
from gptevo.ops.dropout import dropout


def test_dropout_cases_are_well_formed():
    cases = list(REGISTRY["dropout"].cases(np.random.default_rng(0)))
    assert 4 <= len(cases) <= 10 and len({c.label for c in cases}) == len(cases)
    for c in cases:
        assert dropout(**c.kwargs).shape == c.kwargs["x"].shape


def test_dropout_is_identity_at_inference_and_at_p0():
    x = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    np.testing.assert_array_equal(dropout(x=x, p=0.5, seed=3), x)
    np.testing.assert_array_equal(dropout(x=x, p=0.5, seed=3, training=False), x)
    np.testing.assert_array_equal(dropout(x=x, p=0.0, seed=3, training=True), x)
    assert dropout(x=x, p=0.5, seed=3).dtype == np.float32
    assert dropout(x=x.astype(np.float64), p=0.5, seed=3, training=True).dtype == np.float64


def test_dropout_zeroes_or_scales_each_element():
    x = np.random.default_rng(2).uniform(1, 2, size=(50, 40))
    out = dropout(x=x, p=0.25, seed=0, training=True)
    kept = out != 0
    np.testing.assert_allclose(out[kept], x[kept] / 0.75, rtol=1e-15)
    assert 0 < kept.sum() < x.size


def test_dropout_mask_is_the_documented_generator_draw():
    x = np.ones((3, 5))
    u = np.random.default_rng(42).random((3, 5))
    np.testing.assert_array_equal(dropout(x=x, p=0.4, seed=42, training=True) != 0, u >= 0.4)


def test_dropout_same_seed_same_mask_different_seed_different_mask():
    x = np.ones((32, 32), np.float32)
    a = dropout(x=x, p=0.5, seed=7, training=True)
    b = dropout(x=x, p=0.5, seed=7, training=True)
    c = dropout(x=x, p=0.5, seed=8, training=True)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a != 0, c != 0)


def test_dropout_preserves_the_mean_and_drops_p():
    # n = 400k, fixed seed: the sample mean of x/(1-p)*Bernoulli(1-p) has std sqrt(p/((1-p) n)) ~ 1e-3,
    # so a 1e-2 tolerance is ~10 standard deviations (and the seed is fixed, so it cannot flake).
    n, p = 400_000, 0.3
    out = dropout(x=np.ones(n), p=p, seed=123, training=True)
    assert abs(out.mean() - 1.0) < 1e-2
    assert abs((out == 0).mean() - p) < 1e-2


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, float("nan"), True, "0.1"])
def test_dropout_rejects_bad_p(p):
    with pytest.raises(RequestError, match="p must be a probability"):
        dropout(x=np.ones(3), p=p, seed=0, training=True)


@pytest.mark.parametrize("seed", [-1, 1.5, None])
def test_dropout_rejects_bad_seed(seed):
    with pytest.raises(RequestError, match="seed"):
        dropout(x=np.ones(3), p=0.1, seed=seed, training=True)


# --- residual blocks ----------------------------------------------------------------------------

def _setup():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((4, 6)) * 3 + 1
    w = rng.standard_normal((6, 6)) * 0.5

    def norm(h):
        mu = h.mean(-1, keepdims=True)
        return (h - mu) / np.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-5)

    def sublayer(h):
        return np.tanh(h @ w.T)

    return x, norm, sublayer, w


def test_pre_norm_block_is_x_plus_sublayer_of_norm():
    x, norm, sublayer, w = _setup()
    mu = x.mean(-1, keepdims=True)
    n = (x - mu) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(residual_block(x=x, sublayer=sublayer, norm=norm, order="pre"),
                               x + np.tanh(n @ w.T), rtol=1e-13)
    # the default order is pre
    np.testing.assert_array_equal(residual_block(x=x, sublayer=sublayer, norm=norm),
                                  residual_block(x=x, sublayer=sublayer, norm=norm, order="pre"))


def test_post_norm_block_is_norm_of_x_plus_sublayer():
    x, norm, sublayer, w = _setup()
    s = x + np.tanh(x @ w.T)
    want = (s - s.mean(-1, keepdims=True)) / np.sqrt(s.var(-1, keepdims=True) + 1e-5)
    out = residual_block(x=x, sublayer=sublayer, norm=norm, order="post")
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-13)
    # post-norm output is normalised; pre-norm output is not
    np.testing.assert_allclose(out.mean(-1), 0, atol=1e-12)
    pre = residual_block(x=x, sublayer=sublayer, norm=norm, order="pre")
    assert not np.allclose(pre, out)
    assert np.abs(pre.mean(-1)).max() > 0.1


def test_residual_block_rejects_bad_order_and_non_callables():
    x, norm, sublayer, _ = _setup()
    with pytest.raises(RequestError, match="order"):
        residual_block(x=x, sublayer=sublayer, norm=norm, order="sandwich")
    with pytest.raises(RequestError, match="sublayer must be callable"):
        residual_block(x=x, sublayer=np.ones(3), norm=norm)


def test_residual_block_is_registered_as_non_backend_op():
    spec = REGISTRY["residual_block"]
    assert spec.backend_op is False
    assert list(spec.cases(np.random.default_rng(0))) == []
