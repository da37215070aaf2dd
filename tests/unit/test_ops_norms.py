"""LayerNorm and RMSNorm: properties, float64 re-derivations, dtype rules, errors."""
import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gptevo.errors import RequestError
from gptevo.ops import REGISTRY
from gptevo.ops.norms import layer_norm, rms_norm


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
def test_cases_are_well_formed(name):
    spec = REGISTRY[name]
    cases = list(spec.cases(np.random.default_rng(0)))
    assert 4 <= len(cases) <= 10 and len({c.label for c in cases}) == len(cases)
    for c in cases:
        out = spec.reference(**c.kwargs)
        assert out.shape == np.shape(c.kwargs["x"]) and np.all(np.isfinite(out))


rows = hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=9),
                  elements=st.floats(-100, 100, allow_nan=False, allow_subnormal=False))


@given(x=rows, c=st.floats(1e-3, 1e3))
def test_rms_norm_is_invariant_to_positive_scaling(x, c):
    # Only exact with eps = 0, and only for rows that are not all (near) zero.
    x = x[np.abs(x).max(axis=-1) > 1e-3] if x.ndim > 1 else (x if np.abs(x).max() > 1e-3 else x + 1.0)
    if x.size == 0:
        return
    w = np.linspace(0.5, 1.5, x.shape[-1])
    np.testing.assert_allclose(rms_norm(x=c * x, weight=w, eps=0.0), rms_norm(x=x, weight=w, eps=0.0),
                               rtol=1e-12, atol=1e-12)


def test_rms_norm_is_not_scale_invariant_with_large_eps():
    x = np.array([[0.01, -0.02, 0.03]])
    w = np.ones(3)
    assert not np.allclose(rms_norm(x=x, weight=w, eps=1e-2), rms_norm(x=10 * x, weight=w, eps=1e-2))


def test_rms_norm_offset_one_equals_weight_plus_one():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 7)).astype(np.float32)
    w = (0.1 * rng.standard_normal(7)).astype(np.float32)
    np.testing.assert_array_equal(rms_norm(x=x, weight=w, eps=1e-6, offset=1.0),
                                  rms_norm(x=x, weight=w + np.float32(1), eps=1e-6))
    assert not np.allclose(rms_norm(x=x, weight=w, eps=1e-6, offset=1.0), rms_norm(x=x, weight=w, eps=1e-6))


def test_rms_norm_matches_float64_loop():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 5))
    w = rng.standard_normal(5)
    out = rms_norm(x=x, weight=w, eps=1e-5)
    for r in range(3):
        rms = math.sqrt(sum(v * v for v in x[r]) / 5 + 1e-5)
        for d in range(5):
            assert out[r, d] == pytest.approx(x[r, d] / rms * w[d], rel=1e-13, abs=1e-15)


def test_layer_norm_standardises_before_affine():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 33)) * 7.0 + 3.0  # float64
    out = layer_norm(x=x, weight=np.ones(33), bias=np.zeros(33), eps=0.0)
    np.testing.assert_allclose(out.mean(axis=-1), 0.0, atol=1e-14)
    np.testing.assert_allclose(out.var(axis=-1), 1.0, rtol=1e-13)  # biased variance
    # eps inside the sqrt: the variance becomes var / (var + eps)
    eps = 0.5
    var = x.var(axis=-1)
    out = layer_norm(x=x, weight=np.ones(33), bias=None, eps=eps)
    np.testing.assert_allclose(out.var(axis=-1), var / (var + eps), rtol=1e-12)


def test_layer_norm_matches_float64_loop_with_affine():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 4))
    w, b = rng.standard_normal(4), rng.standard_normal(4)
    out = layer_norm(x=x, weight=w, bias=b, eps=1e-5)
    for r in range(2):
        mu = sum(x[r]) / 4
        var = sum((v - mu) ** 2 for v in x[r]) / 4  # biased: divide by D, not D-1
        for d in range(4):
            want = (x[r, d] - mu) / math.sqrt(var + 1e-5) * w[d] + b[d]
            assert out[r, d] == pytest.approx(want, rel=1e-12, abs=1e-14)


def test_layer_norm_float32_is_stable_for_a_large_mean():
    # A one-pass E[x^2] - E[x]^2 in float32 loses everything here; the two-pass form does not.
    rng = np.random.default_rng(7)
    x64 = 1e4 + rng.standard_normal((4, 64))
    ref = layer_norm(x=x64, weight=np.ones(64), bias=None, eps=1e-5)
    out = layer_norm(x=x64.astype(np.float32), weight=np.ones(64, np.float32), bias=None, eps=1e-5)
    assert np.abs(out - ref).max() < 1e-2


@pytest.mark.parametrize("wdt", [np.float16, ml_dtypes.bfloat16])
def test_half_weights_are_widened_exactly(wdt):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 6)).astype(np.float32)
    w = rng.standard_normal(6).astype(wdt)
    b = rng.standard_normal(6).astype(wdt)
    np.testing.assert_array_equal(rms_norm(x=x, weight=w, eps=1e-5),
                                  rms_norm(x=x, weight=w.astype(np.float32), eps=1e-5))
    np.testing.assert_array_equal(layer_norm(x=x, weight=w, bias=b, eps=1e-5),
                                  layer_norm(x=x, weight=w.astype(np.float32), bias=b.astype(np.float32), eps=1e-5))


def test_output_dtypes():
    w = np.ones(4, np.float32)
    assert rms_norm(x=np.ones((2, 4), np.float32), weight=w, eps=1e-5).dtype == np.float32
    assert rms_norm(x=np.ones((2, 4)), weight=w, eps=1e-5).dtype == np.float64
    assert rms_norm(x=np.ones((2, 4), ml_dtypes.bfloat16), weight=w, eps=1e-5).dtype == np.float32
    assert layer_norm(x=np.ones((2, 4), np.float16), weight=w, bias=None, eps=1e-5).dtype == np.float32


def test_bad_arguments_raise_request_error():
    x = np.ones((2, 4), np.float32)
    with pytest.raises(RequestError, match=r"weight must have shape \(4,\)"):
        rms_norm(x=x, weight=np.ones(3), eps=1e-5)
    with pytest.raises(RequestError, match=r"bias must have shape \(4,\)"):
        layer_norm(x=x, weight=np.ones(4), bias=np.ones(5), eps=1e-5)
    with pytest.raises(RequestError, match="eps"):
        rms_norm(x=x, weight=np.ones(4), eps=-1.0)
    with pytest.raises(RequestError, match="last axis"):
        layer_norm(x=np.ones((2, 0)), weight=np.ones(0), bias=None, eps=1e-5)
