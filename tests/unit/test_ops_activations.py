"""GELU (both forms), SiLU, SwiGLU and gpt-oss's clamped SwiGLU against independent formulas."""
import math
import warnings

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gptevo.errors import RequestError
from gptevo.ops import REGISTRY
from gptevo.ops.activations import clamped_swiglu, gelu, silu, swiglu


@pytest.mark.parametrize("name", ["gelu", "silu", "swiglu", "clamped_swiglu"])
def test_cases_are_well_formed(name):
    spec = REGISTRY[name]
    cases = list(spec.cases(np.random.default_rng(0)))
    assert 4 <= len(cases) <= 14 and len({c.label for c in cases}) == len(cases)
    for c in cases:
        assert np.all(np.isfinite(spec.reference(**c.kwargs)))


XS = [-40.0, -7.5, -3.0, -1.0, -0.3, -1e-8, 0.0, 1e-8, 0.5, 1.0, 2.7, 6.0, 40.0]


def test_gelu_erf_form_matches_math_erf():
    out = gelu(x=np.array(XS), approximate="none")
    assert out.dtype == np.float64
    for x, y in zip(XS, out):
        # 1 + erf(.) cancels in the left tail, so this formula is only good to ~|x| * 1e-16 absolute.
        want = x * 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))
        assert y == pytest.approx(want, rel=1e-14, abs=1e-15 * max(1.0, abs(x)))


def test_gelu_known_values():
    assert gelu(x=np.array([1.0]))[0] == pytest.approx(0.8413447460685429, rel=1e-15)
    assert gelu(x=np.array([-1.0]))[0] == pytest.approx(-0.15865525393145707, rel=1e-14)
    assert gelu(x=np.array([0.0]))[0] == 0.0


def test_gelu_left_tail_keeps_relative_accuracy():
    # x Phi(x) at x = -10: Phi(-10) = 7.619853024160527e-24 (published normal-table value).
    assert gelu(x=np.array([-10.0]))[0] == pytest.approx(-10 * 7.619853024160527e-24, rel=1e-12)


def test_gelu_tanh_form_matches_its_formula():
    out = gelu(x=np.array(XS), approximate="tanh")
    c = math.sqrt(2.0 / math.pi)
    for x, y in zip(XS, out):
        assert y == pytest.approx(0.5 * x * (1.0 + math.tanh(c * (x + 0.044715 * x ** 3))), rel=1e-14, abs=1e-300)
    # the two forms are close but not the same function
    diff = np.abs(gelu(x=np.linspace(-4, 4, 801), approximate="tanh") - gelu(x=np.linspace(-4, 4, 801)))
    assert 1e-4 < diff.max() < 1e-3


def test_gelu_float32_is_rounded_once():
    x = np.linspace(-8, 8, 1001).astype(np.float32)
    for approximate in ("none", "tanh"):
        out = gelu(x=x, approximate=approximate)
        ref = gelu(x=x.astype(np.float64), approximate=approximate)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, ref.astype(np.float32))


def test_gelu_rejects_unknown_approximation():
    with pytest.raises(RequestError, match="approximate"):
        gelu(x=np.ones(2), approximate="sigmoid")


@given(hnp.arrays(np.float64, st.integers(1, 20), elements=st.floats(-30, 30)))
def test_silu_is_x_times_sigmoid(x):
    out = silu(x=x)
    for xi, yi in zip(x, out):
        assert yi == pytest.approx(xi / (1.0 + math.exp(-xi)), rel=1e-14, abs=1e-300)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_silu_and_gates_have_no_overflow_at_extremes(dtype):
    x = np.array([-1000.0, -100.0, 0.0, 100.0, 1000.0], dtype=dtype)
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        out = silu(x=x)
        sw = swiglu(gate=x, up=np.ones_like(x))
        g = gelu(x=x)
        gt = gelu(x=x, approximate="tanh")
        cs = clamped_swiglu(h=np.stack([x, x], axis=-1).reshape(-1))
    for arr in (out, sw, g, gt, cs):
        assert np.all(np.isfinite(arr))
    np.testing.assert_allclose(out, [0.0, -100 * math.exp(-100), 0.0, 100.0, 1000.0], rtol=1e-6, atol=1e-30)


def test_swiglu_is_silu_gate_times_up():
    rng = np.random.default_rng(1)
    gate, up = rng.standard_normal((3, 5)), rng.standard_normal((3, 5))
    want = gate / (1.0 + np.exp(-gate)) * up
    np.testing.assert_allclose(swiglu(gate=gate, up=up), want, rtol=1e-14)
    with pytest.raises(RequestError, match="gate has shape"):
        swiglu(gate=gate, up=up[:, :4])


def test_swiglu_dtype_rules():
    g32 = np.ones(3, np.float32)
    assert swiglu(gate=g32, up=g32).dtype == np.float32
    assert swiglu(gate=g32, up=np.ones(3)).dtype == np.float64
    assert silu(x=np.ones(3, ml_dtypes.bfloat16)).dtype == np.float32


def _clamped_swiglu_loop(h, alpha=1.702, limit=7.0):
    out = []
    for row in h:
        r = []
        for k in range(len(row) // 2):
            g = min(float(row[2 * k]), limit)
            lin = max(-limit, min(float(row[2 * k + 1]), limit))
            r.append(g / (1.0 + math.exp(-alpha * g)) * (lin + 1.0))
        out.append(r)
    return np.array(out)


def test_clamped_swiglu_matches_a_loop():
    h = np.array([[0.5, -1.0, 2.0, 3.0, -0.7, 0.1], [9.0, 8.0, -9.0, -8.0, 7.0, -7.0]])
    np.testing.assert_allclose(clamped_swiglu(h=h), _clamped_swiglu_loop(h), rtol=1e-14, atol=1e-300)
    np.testing.assert_allclose(clamped_swiglu(h=h, alpha=1.0, limit=2.5), _clamped_swiglu_loop(h, 1.0, 2.5),
                               rtol=1e-14, atol=1e-300)


def test_clamped_swiglu_clamps():
    sig = lambda z: 1.0 / (1.0 + math.exp(-z))  # noqa: E731
    # gate 100 -> 7 (from above)
    assert clamped_swiglu(h=np.array([100.0, 0.0]))[0] == pytest.approx(7.0 * sig(1.702 * 7.0), rel=1e-14)
    # linear +-100 -> +-7
    assert clamped_swiglu(h=np.array([1.0, 100.0]))[0] == pytest.approx(sig(1.702) * 8.0, rel=1e-14)
    assert clamped_swiglu(h=np.array([1.0, -100.0]))[0] == pytest.approx(sig(1.702) * -6.0, rel=1e-14)
    # the gate is NOT clamped from below: -100 stays -100
    low = clamped_swiglu(h=np.array([-100.0, 0.0]))[0]
    assert low == pytest.approx(-100.0 * math.exp(-170.2), rel=1e-12)
    assert low != pytest.approx(-7.0 * sig(-1.702 * 7.0))


def test_clamped_swiglu_uses_even_columns_as_gate():
    h = np.array([2.0, 0.0])  # gate 2, lin 0
    swapped = np.array([0.0, 2.0])  # gate 0 -> output 0
    assert clamped_swiglu(h=h)[0] == pytest.approx(2.0 / (1.0 + math.exp(-3.404)), rel=1e-14)
    assert clamped_swiglu(h=swapped)[0] == 0.0


def test_clamped_swiglu_rejects_odd_width():
    with pytest.raises(RequestError, match="even last axis"):
        clamped_swiglu(h=np.ones((2, 5)))
    with pytest.raises(RequestError, match="limit"):
        clamped_swiglu(h=np.ones((2, 4)), limit=float("nan"))
