"""The numba backend's split BLAS products (gptevo/backends/numba/_blas.py): every split gives
``x @ w.T (+ bias)``, the BLAS thread setting is restored after each call, errors in a part
propagate."""
import numpy as np
import pytest

pytest.importorskip("numba")
from gptevo.backends.numba import _blas  # noqa: E402


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("m,n", [(5, 7), (40, 300), (200, 33), (257, 1030)])
def test_matmul_nt_equals_numpy(threads, m, n):
    rng = np.random.default_rng(m * n + threads)
    x = rng.standard_normal((m, 48)).astype(np.float32)
    w = rng.standard_normal((n, 48)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    np.testing.assert_allclose(_blas.matmul_nt(x, w, threads), x @ w.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_blas.matmul_nt(x, w, threads, bias), x @ w.T + bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("is_bf16", [True, False])
def test_widened_tiles_equal_the_float32_product(threads, is_bf16):
    import ml_dtypes
    rng = np.random.default_rng(threads)
    n = 2 * _blas.WIDEN_ROWS + 37                       # three tiles, the last one partial
    w = rng.standard_normal((n, 24)).astype(ml_dtypes.bfloat16 if is_bf16 else np.float16)
    x = rng.standard_normal((19, 24)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    y = _blas.tiled_matmul_nt(x, n, lambda r0, t: _blas.widen_rows(w.view(np.uint16), r0, t, is_bf16),
                              threads, bias)
    np.testing.assert_allclose(y, x @ w.astype(np.float32).T + bias, rtol=1e-5, atol=1e-5)


def test_blas_thread_setting_is_restored():
    controllers = _blas._blas_controllers()
    if not controllers:
        pytest.skip("threadpoolctl found no BLAS library it can control")
    before = [c.get_num_threads() for c in controllers]
    seen = []
    _blas.run_parts([lambda: seen.append([c.get_num_threads() for c in controllers]), lambda: None])
    assert seen == [[1] * len(controllers)]             # one BLAS thread while the parts run
    assert [c.get_num_threads() for c in controllers] == before


def test_an_error_in_a_part_propagates_after_all_parts_finish():
    done = []

    def slow():
        import time
        time.sleep(0.05)
        done.append(True)

    def bad():
        raise ValueError("part failed")
    with pytest.raises(ValueError, match="part failed"):
        _blas.run_parts([bad, slow])
    assert done == [True]


def test_a_forked_child_gets_its_own_pool():
    """The parent's pool threads do not exist in a fork; the child must not wait on them."""
    import os
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    x = np.ones((4, 8), np.float32)
    w = np.ones((40, 8), np.float32)
    _blas.matmul_nt(x, w, 2)                        # the parent's pool exists now
    pid = os.fork()
    if pid == 0:                                    # child: exit 0 only if the product completes
        ok = False
        try:
            import signal
            signal.alarm(30)                        # a hang ends the child by SIGALRM: the test fails
            ok = np.array_equal(_blas.matmul_nt(x, w, 2), np.full((4, 40), 8, np.float32))
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
