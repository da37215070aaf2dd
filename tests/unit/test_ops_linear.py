"""linear and the two dense MLPs: widened weights, optional biases, decode objects, errors."""
import math

import ml_dtypes
import numpy as np
import pytest

from gptevo.errors import RequestError
from gptevo.ops import REGISTRY
from gptevo.ops.linear import gelu_mlp, linear, swiglu_mlp


@pytest.mark.parametrize("name", ["linear", "gelu_mlp", "swiglu_mlp"])
def test_cases_are_well_formed(name):
    spec = REGISTRY[name]
    cases = list(spec.cases(np.random.default_rng(0)))
    assert 4 <= len(cases) <= 10 and len({c.label for c in cases}) == len(cases)
    for c in cases:
        assert np.all(np.isfinite(spec.reference(**c.kwargs)))
    assert spec.flops is not None and spec.flops(**cases[0].kwargs) > 0


def test_linear_matches_a_float64_loop():
    rng = np.random.default_rng(1)
    x, w, b = rng.standard_normal((2, 3)), rng.standard_normal((4, 3)), rng.standard_normal(4)
    out = linear(x=x, weight=w, bias=b)
    assert out.shape == (2, 4) and out.dtype == np.float64
    for t in range(2):
        for o in range(4):
            assert out[t, o] == pytest.approx(math.fsum(x[t, i] * w[o, i] for i in range(3)) + b[o], rel=1e-13)


@pytest.mark.parametrize("wdt", [ml_dtypes.bfloat16, np.float16])
def test_half_weight_equals_float32_matmul_of_widened_weight(wdt):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 16)).astype(np.float32)
    w = rng.standard_normal((7, 16)).astype(wdt)
    widened = np.array([[float(v) for v in row] for row in w], dtype=np.float32)  # exact element by element
    out = linear(x=x, weight=w)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, x @ widened.T, rtol=1e-6, atol=1e-6)
    # and it is the narrow weight that is used, not some f32 original
    assert not np.allclose(out, x @ rng.standard_normal((7, 16)).astype(np.float32).T)


def test_bias_is_optional_and_added_once():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    w = rng.standard_normal((2, 4)).astype(np.float32)
    b = np.array([10.0, -1.0], ml_dtypes.bfloat16)
    np.testing.assert_allclose(linear(x=x, weight=w, bias=b) - linear(x=x, weight=w), [[10.0, -1.0]] * 3,
                               rtol=0, atol=1e-5)
    assert np.array_equal(linear(x=x, weight=w), linear(x=x, weight=w, bias=None))


def test_linear_keeps_leading_axes():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 5)).astype(np.float32)
    w = rng.standard_normal((4, 5)).astype(np.float32)
    out = linear(x=x, weight=w)
    assert out.shape == (2, 3, 4)
    np.testing.assert_allclose(out[1, 2], w @ x[1, 2], rtol=1e-5)


class _Packed:
    """Stands in for Mxfp4Weight: its logical shape (read by the argument check) and decode(dtype)."""

    def __init__(self, w):
        self.w, self.asked, self.shape = w, [], w.shape

    def decode(self, dtype):
        self.asked.append(np.dtype(dtype))
        return self.w.astype(dtype)


def test_objects_with_decode_are_decoded_to_the_compute_dtype():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((3, 4))
    packed = _Packed(w)
    x = rng.standard_normal((2, 4)).astype(np.float32)
    out = linear(x=x, weight=packed)
    assert packed.asked == [np.dtype(np.float32)]
    np.testing.assert_allclose(out, x @ w.astype(np.float32).T, rtol=1e-6)
    linear(x=x.astype(np.float64), weight=packed)
    assert packed.asked[-1] == np.dtype(np.float64)


def test_linear_errors_name_the_shapes():
    x = np.ones((2, 4), np.float32)
    with pytest.raises(RequestError, match="4 input features .* expects 5"):
        linear(x=x, weight=np.ones((3, 5), np.float32))
    with pytest.raises(RequestError, match="2-D"):
        linear(x=x, weight=np.ones(4, np.float32))
    with pytest.raises(RequestError, match=r"bias has shape \(2,\), expected \(3,\)"):
        linear(x=x, weight=np.ones((3, 4), np.float32), bias=np.ones(2))


def test_gelu_mlp_matches_hand_written_gpt2_ffn():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 6))
    w_fc, b_fc = rng.standard_normal((10, 6)), rng.standard_normal(10)
    w_proj, b_proj = rng.standard_normal((6, 10)), rng.standard_normal(6)
    h = x @ w_fc.T + b_fc
    tanh_gelu = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
    erf_gelu = h * 0.5 * (1 + np.vectorize(math.erf)(h / np.sqrt(2)))
    out_tanh = gelu_mlp(x=x, w_fc=w_fc, b_fc=b_fc, w_proj=w_proj, b_proj=b_proj, approximate="tanh")
    out_erf = gelu_mlp(x=x, w_fc=w_fc, b_fc=b_fc, w_proj=w_proj, b_proj=b_proj, approximate="none")
    np.testing.assert_allclose(out_tanh, tanh_gelu @ w_proj.T + b_proj, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out_erf, erf_gelu @ w_proj.T + b_proj, rtol=1e-12, atol=1e-12)
    no_bias = gelu_mlp(x=x, w_fc=w_fc, b_fc=None, w_proj=w_proj, b_proj=None, approximate="none")
    np.testing.assert_allclose(no_bias, (x @ w_fc.T) * 0.5 * (1 + np.vectorize(math.erf)((x @ w_fc.T) / np.sqrt(2)))
                               @ w_proj.T, rtol=1e-12, atol=1e-12)


def test_swiglu_mlp_matches_hand_written_llama_mlp():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 5)).astype(np.float32)
    w_gate = rng.standard_normal((9, 5)).astype(ml_dtypes.bfloat16)
    w_up = rng.standard_normal((9, 5)).astype(ml_dtypes.bfloat16)
    w_down = rng.standard_normal((5, 9)).astype(ml_dtypes.bfloat16)
    x64 = x.astype(np.float64)
    g, u = x64 @ w_gate.astype(np.float64).T, x64 @ w_up.astype(np.float64).T
    want = (g / (1 + np.exp(-g)) * u) @ w_down.astype(np.float64).T
    out = swiglu_mlp(x=x, w_gate=w_gate, w_up=w_up, w_down=w_down)
    assert out.dtype == np.float32 and out.shape == (4, 5)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
    # gate and up are not interchangeable
    assert not np.allclose(swiglu_mlp(x=x, w_gate=w_up, w_up=w_gate, w_down=w_down), out)
    b = np.ones(9, np.float32)
    with_bias = swiglu_mlp(x=x, w_gate=w_gate, w_up=w_up, w_down=w_down, b_gate=b, b_up=b, b_down=np.ones(5))
    want_b = ((g + 1) / (1 + np.exp(-(g + 1))) * (u + 1)) @ w_down.astype(np.float64).T + 1
    np.testing.assert_allclose(with_bias, want_b, rtol=1e-4, atol=1e-4)
