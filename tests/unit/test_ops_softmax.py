"""softmax: normalisation, stability, masked rows, and gpt-oss attention sinks."""
import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from gptevo.errors import RequestError
from gptevo.ops.softmax import softmax

finite = st.floats(-30, 30, allow_nan=False, width=64)
rows = hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=9), elements=finite)


def naive(row, sink=None):
    """float64 softmax of one row, straight from the definition (no max shift, |x| <= 30)."""
    e = [math.exp(v) if v != -math.inf else 0.0 for v in row]
    denom = math.fsum(e) + (math.exp(sink) if sink is not None else 0.0)
    return np.array([v / denom for v in e])


@given(x=rows)
def test_rows_sum_to_one_and_match_the_definition(x):
    p = softmax(x)
    assert p.shape == x.shape and p.dtype == np.float64
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=1e-12)
    flat, pflat = x.reshape(-1, x.shape[-1]), p.reshape(-1, x.shape[-1])
    for row, prow in zip(flat, pflat):
        np.testing.assert_allclose(prow, naive(row), rtol=1e-12, atol=1e-300)


@given(x=rows, data=st.data())
def test_a_sink_only_removes_mass_by_a_constant_ratio_per_row(x, data):
    sinks = data.draw(hnp.arrays(np.float64, x.shape[:-1], elements=finite))
    p0, p1 = softmax(x), softmax(x, sinks=sinks)
    assert np.all(p1 <= p0 * (1 + 1e-12))
    flat0, flat1 = p0.reshape(-1, x.shape[-1]), p1.reshape(-1, x.shape[-1])
    for row, r0, r1, s in zip(x.reshape(-1, x.shape[-1]), flat0, flat1, np.ravel(sinks)):
        ratio = r1 / r0
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-10)
        # the ratio is exactly the non-sink share of the mass
        expected = math.fsum(math.exp(v) for v in row) / (math.fsum(math.exp(v) for v in row) + math.exp(s))
        assert ratio[0] == pytest.approx(expected, rel=1e-10)
        np.testing.assert_allclose(r1, naive(row, s), rtol=1e-12, atol=1e-300)


def test_masked_entries_get_zero_and_huge_logits_do_not_overflow():
    x = np.array([[1000.0, 999.0, -np.inf], [-1000.0, -np.inf, -1001.0]], np.float32)
    with np.errstate(all="raise"):
        p = softmax(x)
    e = math.exp(-1)
    np.testing.assert_allclose(p, [[1 / (1 + e), e / (1 + e), 0], [1 / (1 + e), 0, e / (1 + e)]], rtol=1e-6)
    assert p.dtype == np.float32


def test_fully_masked_rows_are_zero_without_nan_or_warning():
    x = np.full((2, 3, 5), -np.inf, np.float32)
    x[0, 1] = [0.0, 1.0, 2.0, -np.inf, 3.0]
    with np.errstate(all="raise"):
        p = softmax(x)                                         # no sink
        ps = softmax(x, sinks=np.array([0.5, -2.0], np.float32)[:, None])
        pn = softmax(x, sinks=np.float32(-np.inf))             # a -inf sink is no sink
    for out in (p, ps, pn):
        assert not np.isnan(out).any()
        assert np.all(out[1] == 0) and np.all(out[0, 0] == 0) and np.all(out[0, 2] == 0)
    assert p[0, 1].sum() == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_array_equal(pn, p)
    assert ps[0, 1].sum() < 1


def test_sink_equal_to_minus_infinity_is_no_sink_and_large_sink_takes_the_mass():
    x = np.random.default_rng(0).standard_normal((4, 6))
    np.testing.assert_array_equal(softmax(x, sinks=np.full(4, -np.inf)), softmax(x))
    assert softmax(x, sinks=np.full(4, 200.0)).max() < 1e-80


def test_sinks_broadcast_and_bad_shapes_raise():
    x = np.zeros((3, 2, 4))
    np.testing.assert_allclose(softmax(x, sinks=0.0), 1 / 5)               # scalar sink
    np.testing.assert_allclose(softmax(x, sinks=np.zeros((3, 1))), 1 / 5)  # per leading row
    with pytest.raises(RequestError, match="sinks"):
        softmax(x, sinks=np.zeros(3))                   # (3,) does not broadcast to (3, 2)
    with pytest.raises(RequestError):
        softmax(np.float32(1.0))


def test_dtypes_follow_the_compute_dtype():
    x16 = np.array([[0.5, 1.5]], dtype=ml_dtypes.bfloat16)
    assert softmax(x16).dtype == np.float32
    assert softmax(x16.astype(np.float64)).dtype == np.float64
    sink = np.array([0.25], dtype=ml_dtypes.bfloat16)
    assert softmax(np.zeros((1, 3), np.float32), sinks=sink).dtype == np.float32
