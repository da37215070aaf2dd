"""Blockwise int8 weights (spec/ops/int8.md): quantize, decode, error bound, refusals, and the
reference and numba linear on Int8Weight."""
import ml_dtypes
import numpy as np
import pytest

from gptevo import backends
from gptevo.errors import CheckpointError
from gptevo.ops.int8 import INT8_BLOCK, Int8Weight, quantize_int8


def _rng_weight(seed, n=37, k=96, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, k)) * rng.uniform(0.01, 3, (n, 1))).astype(dtype)


def test_error_within_half_a_step_per_block():
    w = _rng_weight(0)
    q = quantize_int8(w)
    assert q.scales.dtype == np.float16 and q.values.dtype == np.int8
    blocks = np.abs(w.reshape(w.shape[0], -1, INT8_BLOCK)).max(axis=2)           # [N,K/32]
    err = np.abs(q.decode("float64") - w).reshape(w.shape[0], -1, INT8_BLOCK).max(axis=2)
    s = q.scales.astype(np.float64)                                               # [N,K/32]
    assert (err <= s / 2).all()
    assert (s <= blocks / 127 * (1 + 2.0 ** -10)).all()                           # one float16 step at most
    assert np.abs(q.values).max() == 127


def test_scale_is_the_smallest_float16_at_or_above_max_over_127():
    w = _rng_weight(3, n=64, k=256)
    q = quantize_int8(w)
    want = (np.abs(w.reshape(64, -1, INT8_BLOCK)).max(axis=2) / np.float32(127)).astype(np.float32)
    s = q.scales.astype(np.float32)
    below = np.nextafter(q.scales, np.float16(0)).astype(np.float32)
    assert (s >= want).all() and (below < want).all()


def test_block_max_within_half_a_step_and_zero_blocks_stay_zero():
    w = np.zeros((2, 64), np.float32)
    w[0, 5], w[1, 40] = -3.5, 0.25
    q = quantize_int8(w)
    d = q.decode()
    assert abs(d[0, 5] + 3.5) <= float(q.scales[0, 0]) / 2 and abs(d[1, 40] - 0.25) <= float(q.scales[1, 1]) / 2
    assert np.count_nonzero(d) == 2 and q.scales[0, 1] == 0 and q.scales[1, 0] == 0


def test_tiny_blocks_keep_a_nonzero_scale_and_huge_ones_are_refused():
    w = np.zeros((3, 32), np.float32)
    w[0, :] = 1e-9                                           # max / 127 below float16's smallest subnormal
    q = quantize_int8(w[:1])
    assert q.scales[0, 0] > 0 and np.abs(q.decode() - w[:1]).max() <= float(q.scales[0, 0]) / 2
    w[2, 7] = 1e7                                            # 1e7 / 127 > 65504
    with pytest.raises(CheckpointError, match=r"wo: row 2 .*float16 scale"):
        quantize_int8(w, name="wo")


def test_bf16_and_float16_inputs():
    w = _rng_weight(1)
    for dt in (ml_dtypes.bfloat16, np.float16):
        q = quantize_int8(w.astype(dt))
        assert np.abs(q.decode() - w.astype(dt).astype(np.float32)).max() <= np.abs(w).max() / 254 * 1.01


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_are_refused_with_the_name(bad):
    w = _rng_weight(2)
    w[7, 3] = bad
    with pytest.raises(CheckpointError, match=r"wq: row 7"):
        quantize_int8(w, name="wq")


def test_k_not_divisible_by_32_is_refused():
    with pytest.raises(CheckpointError, match="divisible by 32"):
        quantize_int8(np.ones((4, 48), np.float32), name="w")


def test_shape_mismatch_and_float32_scales_are_refused():
    with pytest.raises(Exception, match="do not match"):
        Int8Weight(np.zeros((4, 64), np.int8), np.zeros((4, 3), np.float16))
    with pytest.raises(Exception, match="float16 scales"):
        Int8Weight(np.zeros((4, 64), np.int8), np.zeros((4, 2), np.float32))


@pytest.mark.parametrize("backend", [b for b in ("reference", "numba") if b in backends.available()])
@pytest.mark.parametrize("rows", [1, 3, 700])
def test_linear_on_int8_weight_equals_decoded_weight(backend, rows):
    rng = np.random.default_rng(rows)
    w = quantize_int8(_rng_weight(3, n=1100, k=128))
    x = rng.standard_normal((rows, 128)).astype(np.float32)
    b = rng.standard_normal(1100).astype(np.float32)
    got = backends.get(backend).linear(x=x, weight=w, bias=b)
    want = x.astype(np.float64) @ w.decode("float64").T + b
    assert got.dtype == np.float32 and got.shape == (rows, 1100)
    assert np.abs(got - want).max() / np.abs(want).max() < 2e-6
