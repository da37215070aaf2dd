"""BLAS products of the numba backend's many-row paths, split over the backend's own threads.

OpenBLAS's worker threads keep spinning for a while after each multi-threaded call (about 2**28
cycles by default), and a numba parallel region that starts in that time shares the cores with
them: GPT-2 prefill attention (512 tokens) took 10-11 ms per layer right after BLAS calls against
5.3 ms with BLAS on one thread (measured in the model, 2 cores). So this module never lets BLAS
start its own threads: each product runs with BLAS limited to one thread (through threadpoolctl;
the user's setting is restored after the call) and is cut into one part per numba thread (by
output columns), which
run on a small pool of Python threads (NumPy releases the GIL inside BLAS, and the widening
kernel here is compiled ``nogil``). Results are those of ``x @ w.T`` on each part: the same
products and sums as one BLAS call, up to BLAS's own blocking.

Without threadpoolctl (or without a BLAS it can control) products run as plain NumPy calls.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from gptevo.backends.numba._gemv import FASTMATH, half_to_float

WIDEN_ROWS = 512            # weight rows widened to float32 at a time (512 x 3072 x 4 B = 6 MB)

_lock = threading.Lock()
_state: dict = {}


def _blas_controllers() -> list:
    """threadpoolctl's controllers of the loaded BLAS libraries (found once), or []."""
    if "blas" not in _state:
        try:
            from threadpoolctl import ThreadpoolController
            _state["blas"] = list(ThreadpoolController().select(user_api="blas").lib_controllers)
        except Exception:              # no threadpoolctl, or a BLAS it cannot drive: plain calls
            _state["blas"] = []
    return _state["blas"]


def _pool(workers: int) -> ThreadPoolExecutor | None:
    """The helper threads (one fewer than the parts: the calling thread computes one part)."""
    if workers <= 0:
        return None
    pool = _state.get("pool")
    if pool is not None and _state.get("pid") != os.getpid():      # a forked child: the threads stayed behind
        pool = None
    if pool is None or _state.get("workers") != workers:
        if pool is not None:
            pool.shutdown(wait=True)
        pool = _state["pool"] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gptevo-blas")
        _state["workers"] = workers
        _state["pid"] = os.getpid()
    return pool


def run_parts(tasks: list) -> None:
    """Run the callables ``tasks`` at once (the first on this thread) with BLAS on one thread each;
    re-raise the first exception after all have finished."""
    with _lock:                     # one split product at a time: the BLAS setting is process-wide
        libs = _blas_controllers()
        saved = [lib.get_num_threads() for lib in libs]
        for lib in libs:
            lib.set_num_threads(1)
        try:
            pool = _pool(len(tasks) - 1)
            futures = [pool.submit(t) for t in tasks[1:]] if pool is not None else []
            error = None
            try:
                tasks[0]()
            except BaseException as exc:        # wait for the others before raising
                error = exc
            for f in futures:
                try:
                    f.result()
                except BaseException as exc:
                    error = error or exc
            if error is not None:
                raise error
        finally:
            for lib, n in zip(libs, saved):
                lib.set_num_threads(n)


def _ranges(n: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering 0..n (boundaries multiples of ``align``), none empty."""
    step = -(-n // parts)
    step = -(-step // align) * align
    return [(a, min(n, a + step)) for a in range(0, n, step)]


def matmul_nt(x: np.ndarray, w: np.ndarray, threads: int, bias: np.ndarray | None = None) -> np.ndarray:
    """``x @ w.T (+ bias)``: x [M,K], w [N,K] float (same dtype), bias [N] -> [M,N], split over
    ``threads`` by output columns (each part multiplies all rows by its share of w's rows and adds
    its share of the bias). Cutting by rows instead measured slower: with ``np.matmul(..., out=)``
    (which NumPy does not hand to BLAS) 100-118 GFLOP/s against 172-199 for column parts on GPT-2's
    512-row products; without ``out=`` rows matched columns at 512 rows and lost at 128."""
    m, n = x.shape[0], w.shape[0]
    out = np.empty((m, n), np.result_type(x, w))                              # [M,N]

    def part(a, b):
        def go():
            out[:, a:b] = x @ w[a:b].T if bias is None else x @ w[a:b].T + bias[a:b]
        return go
    run_parts([part(a, b) for a, b in _ranges(n, threads, 16)])
    return out


@numba.njit(cache=True, fastmath=FASTMATH, error_model="numpy", nogil=True)
def widen_rows(w, r0, out, is_bf16):
    """out[i] = float32 of 16-bit float row r0 + i of w [N,K] uint16 (exact), i < out.shape[0].
    ``nogil``: the parts of :func:`widened_matmul_nt` widen their tiles at the same time."""
    for i in range(out.shape[0]):
        row = w[r0 + i]
        dst = out[i]
        for j in range(row.shape[0]):
            dst[j] = half_to_float(row[j], is_bf16)


def tiled_matmul_nt(x: np.ndarray, n: int, fill_tile, threads: int, bias: np.ndarray | None = None) -> np.ndarray:
    """``x @ w.T (+ bias [N])`` for float32 x [M,K] and a weight w [N,K] that exists only tile by tile:
    ``fill_tile(r0, tile)`` writes float32 rows r0 .. r0 + len(tile) of w into ``tile``
    [rows,K] (it must release the GIL to overlap: a ``nogil`` kernel or NumPy). w is cut into
    equal tiles of at most ``WIDEN_ROWS`` rows, as many as a multiple of the parts (768 rows on two
    parts: two tiles of 384, not 512 + 256); each part fills its share into its own buffer and
    multiplies them by BLAS, so no float32 copy of w exists."""
    m, k = x.shape
    out = np.empty((m, n), np.float32)                                         # [M,N]
    n_tiles = threads * -(-n // (threads * WIDEN_ROWS))        # a multiple of the parts: no idle part
    rows = -(-n // n_tiles)                                    # <= WIDEN_ROWS rows per tile
    tiles = list(range(0, n, rows))

    def part(mine):
        def go():
            buf = np.empty((min(rows, n), k), np.float32)                     # [rows,K]
            for r0 in mine:
                tile = buf[:min(rows, n - r0)]                                 # [rows,K]
                fill_tile(r0, tile)
                y = out[:, r0:r0 + tile.shape[0]]                              # [M,rows]
                y[...] = x @ tile.T if bias is None else x @ tile.T + bias[r0:r0 + tile.shape[0]]
        return go
    shares = [tiles[i::threads] for i in range(threads)]
    run_parts([part(s) for s in shares if s])
    return out
