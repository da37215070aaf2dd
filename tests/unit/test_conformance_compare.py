"""The comparison used by the conformance suite must reject wrong outputs (else every test passes)."""
import numpy as np

from gptevo.conformance.compare import compare, normalized_error


def test_identical_passes():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert compare(a, a.copy(), 1e-6) is None


def test_shape_dtype_nan_inf_and_error_are_caught():
    a = np.ones((2, 3), np.float32)
    assert compare(a.reshape(3, 2), a, 1.0).what == "shape"
    assert compare(a.astype(np.float64), a, 1.0).what == "dtype"
    b = a.copy()
    b[0, 0] = np.nan
    assert compare(b, a, 1.0).what == "nan"
    c = a.copy()
    c[1, 1] = np.inf
    d = a.copy()
    d[1, 1] = -np.inf
    assert compare(c, d, 1.0).what == "inf"
    e = a.copy()
    e[0, 1] += 1e-3
    assert compare(e, a, 1e-4).what == "error"
    assert compare(e, a, 1e-2) is None


def test_exact_ops_must_match_bits():
    a = np.array([0.5, 1.0], np.float32)
    b = np.nextafter(a, np.float32(2))
    assert compare(b, a, 1.0, exact=True).what == "error"
    assert compare(np.array([1, 2]), np.array([1, 3]), 1.0).what == "error"


def test_normalized_error_scale():
    ref = np.array([100.0, -200.0])
    assert normalized_error(ref + 2.0, ref) == 2.0 / 200.0
    assert normalized_error(np.array([0.5]), np.array([0.0])) == 0.5
