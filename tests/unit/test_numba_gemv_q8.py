"""The numba int8 mode's dense decode kernel (gptevo/backends/numba/_gemv_q8.py): int8 weights times
an input row quantized per 32-value block, checked against float64 oracles written here."""
import numpy as np
import pytest

from gptevo import backends
from gptevo.ops.int8 import quantize_int8

if "numba" not in backends.available():
    pytest.skip("numba backend not available", allow_module_level=True)

from gptevo.backends.numba import _gemv_q8 as Q  # noqa: E402
from gptevo.backends.numba._simd import has_vnni  # noqa: E402

needs_vnni = pytest.mark.skipif(not has_vnni(), reason="needs AVX-512 VNNI")


def _quantized_x(x):
    """float64 oracle of the activation quantization: per block d = max|x| / 127, q = round_half_even(x / d)."""
    xb = x.reshape(-1, 32).astype(np.float64)                                   # [K/32,32]
    d = np.abs(xb).max(1).astype(np.float32).astype(np.float64) / 127           # [K/32]
    inv = np.where(d > 0, 1 / np.where(d > 0, d, 1), 0).astype(np.float32)
    q = np.round((xb.astype(np.float32) * inv[:, None]).astype(np.float32))      # [K/32,32]
    return q, d.astype(np.float32).astype(np.float64)


def test_quantize_row_matches_the_oracle():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(640) * 3).astype(np.float32)
    x[32:64] = 0                                                                 # an all-zero block
    xq = np.empty(640, np.int8)
    xs = np.empty(20, np.float32)
    corr = np.empty(20, np.float32)
    Q.quantize_row(x, xq, xs, corr)
    q, d = _quantized_x(x)
    assert np.array_equal(xq.reshape(-1, 32), q.astype(np.int8))
    assert np.allclose(xs, d, rtol=1e-7, atol=0)
    assert np.array_equal(corr, 128 * q.sum(1).astype(np.float32))
    assert np.all(xq[32:64] == 0) and xs[1] == 0


@needs_vnni
@pytest.mark.parametrize("n,k,bias", [(37, 512, True), (20, 768, False), (9, 2880, True), (16, 4096, False),
                                      (70, 3072, True)])
def test_equals_quantized_product_and_stays_within_the_rounding_bound(n, k, bias):
    rng = np.random.default_rng(n * k)
    w = quantize_int8(rng.standard_normal((n, k)).astype(np.float32))
    x = rng.standard_normal(k).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32) if bias else np.zeros(0, np.float32)
    got = Q.gemv_int8_q8(w, x, b, 8)
    wd = w.decode("float64")                                                     # [N,K]
    q, d = _quantized_x(x)
    xdeq = (q * d[:, None]).reshape(-1)                                          # [K]
    bias64 = b.astype(np.float64) if bias else 0.0
    want_q = wd @ xdeq + bias64                                                  # the quantized product
    scale = np.abs(wd) @ np.abs(xdeq) + 1.0
    assert np.all(np.abs(got - want_q) <= 1e-5 * scale)
    exact = wd @ x.astype(np.float64) + bias64
    bound = np.abs(wd) @ np.repeat(d / 2, 32)                                    # activation rounding
    assert np.all(np.abs(got - exact) <= bound + 1e-5 * scale)
    assert np.abs(got - exact).max() > 0                                         # it is the quantized path


def test_supported_shapes():
    assert not Q.supported(256) and not Q.supported(544)
    assert Q.supported(2880) == has_vnni()


@needs_vnni
def test_numba_linear_uses_it_only_for_marked_weights():
    rng = np.random.default_rng(5)
    w = quantize_int8(rng.standard_normal((48, 1024)).astype(np.float32))
    x = rng.standard_normal((1, 1024)).astype(np.float32)
    nb = backends.get("numba")
    plain = nb.linear(x=x, weight=w, bias=None)
    marked = nb.linear(x=x, weight=Q.mark(w), bias=None)
    exact = x.astype(np.float64) @ w.decode("float64").T
    assert np.abs(plain - exact).max() <= 2e-6 * np.abs(exact).max()            # float activations
    assert np.abs(marked - exact).max() > np.abs(plain - exact).max()
    assert np.array_equal(marked[0], Q.gemv_int8_q8(w, x[0], np.zeros(0, np.float32), 16))
    assert isinstance(Q.mark(w), type(w)) and Q.mark(Q.mark(w)).values is w.values


@needs_vnni
@pytest.mark.parametrize("n,k", [(37, 512), (300, 2880), (5, 4096), (64, 576)])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 11])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk", [16, 100])
def test_several_rows_are_bitwise_the_one_row_kernel(n, k, m, with_bias, chunk):
    """gemv_q8_rows (batched decode in int8 mode: blocks of weight rows, each read by every group
    of four input rows) gives every row exactly what gemv_q8 gives it alone, so a batched step
    equals single-sequence steps bit for bit (chunk 100: blocks of BLOCK_ROWS inside a chunk)."""
    rng = np.random.default_rng(n * k + m)
    w = Q.mark(quantize_int8(rng.standard_normal((n, k)).astype(np.float32)))
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32) if with_bias else np.zeros(0, np.float32)
    got = Q.gemv_int8_q8_rows(w, x, bias, chunk)
    want = np.stack([Q.gemv_int8_q8(w, x[r], bias, 16) for r in range(m)])
    assert got.dtype == np.float32 and np.array_equal(got, want)
