"""The numba decode GEMV for bfloat16 weights (explicit AVX-512 kernel where the host has it, the
vectorized loop elsewhere) equals the exactly widened float32 product, bias and NaN included."""
import numpy as np
import pytest

pytest.importorskip("numba")
import ml_dtypes  # noqa: E402

from gptevo.backends.numba import _gemv  # noqa: E402


@pytest.mark.parametrize("n,k", [(1, 32), (7, 64), (37, 96), (300, 768), (5, 3072), (9, 40)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_gemv_equals_the_widened_product(n, k, with_bias):
    rng = np.random.default_rng(n * k)
    w = rng.standard_normal((n, k)).astype(ml_dtypes.bfloat16)
    x = rng.standard_normal(k).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32) if with_bias else None
    want = w.astype(np.float64) @ x.astype(np.float64) + (0 if bias is None else bias)
    for threads in (1, 2):
        got = _gemv.gemv(x, w, bias, threads)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.sqrt(k))


def test_a_nan_weight_poisons_exactly_its_row():
    w = np.ones((4, 64), ml_dtypes.bfloat16)
    w[2, 17] = np.nan
    got = _gemv.gemv(np.ones(64, np.float32), w, None, 2)
    assert np.isnan(got).tolist() == [False, False, True, False] and got[0] == 64
