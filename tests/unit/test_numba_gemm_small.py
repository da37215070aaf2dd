"""numba's few-rows product (gptevo/backends/numba/_gemm_small.py): 2-16 input rows, each weight row
read once, against float64 products computed here; and the numba linear op on those shapes."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from gptevo import backends

if "numba" not in backends.available():
    pytest.skip("numba backend not available", allow_module_level=True)

import ml_dtypes  # noqa: E402

from gptevo.backends.numba import _gemm_small as S  # noqa: E402
from gptevo.ops.int8 import quantize_int8  # noqa: E402

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


@settings(max_examples=25, deadline=None)
@given(m=st.integers(2, 16), n=st.integers(1, 37), k=st.integers(1, 80), dtype=st.sampled_from(sorted(DTYPES)),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_small_rows_equal_the_float64_product(m, n, k, dtype, bias, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(DTYPES[dtype])
    x = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    got = S.small_rows(x, w, b, 2)
    want = x.astype(np.float64) @ w.astype(np.float64).T + (b if bias else 0)
    assert got.shape == (m, n) and got.dtype == np.float32
    scale = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T + 1
    assert np.all(np.abs(got - want) <= 1e-6 * k * scale)


def test_other_shapes_and_dtypes_are_declined():
    x = np.ones((4, 8), np.float32)
    assert S.small_rows(np.ones((1, 8), np.float32), np.ones((3, 8), np.float32), None, 1) is None
    assert S.small_rows(np.ones((17, 8), np.float32), np.ones((3, 8), np.float32), None, 1) is None
    assert S.small_rows(x, np.ones((3, 8), np.float64), None, 1) is None
    assert S.small_rows(x, np.ones((8, 3), np.float32).T, None, 1) is None           # not C-contiguous


@pytest.mark.parametrize("dtype", sorted(DTYPES) + ["int8"])
@pytest.mark.parametrize("rows", [2, 7, 16])
def test_numba_linear_on_a_few_rows_matches_the_reference(dtype, rows):
    rng = np.random.default_rng(rows)
    w32 = rng.standard_normal((70, 96)).astype(np.float32)
    w = quantize_int8(w32) if dtype == "int8" else w32.astype(DTYPES[dtype])
    x = rng.standard_normal((rows, 96)).astype(np.float32)
    b = rng.standard_normal(70).astype(np.float32)
    got = backends.get("numba").linear(x=x, weight=w, bias=b)
    want = backends.get("reference").linear(x=x, weight=w, bias=b)
    assert got.shape == want.shape == (rows, 70)
    assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n,k,m", [(37, 64, 5), (8, 32, 7), (300, 96, 16), (5, 768, 9), (1, 32, 6), (6, 64, 13)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_register_tiles_equal_the_widened_product(dtype, n, k, m, with_bias):
    """``_gemm_tiles`` (AVX-512 batched decode, 5-16 rows) for every tail of weight and input rows."""
    import ml_dtypes
    from gptevo.backends.numba import _gemm_tiles
    rng = np.random.default_rng(n * k + m)
    w = rng.standard_normal((n, k)).astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32) if with_bias else None
    assert _gemm_tiles.supported(w, m)
    got = _gemm_tiles.tiles_rows(x, w, bias, 8)
    want = x.astype(np.float64) @ w.astype(np.float64).T + (0 if bias is None else bias)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.sqrt(k))
