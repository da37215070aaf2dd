"""Thread shares of a weight times every row of a batch: the dense pieces of the batched fused steps
(``_fused_gpt2``'s and ``_fused_gptoss``'s ``rows``), run by each thread between two barriers.

A share is a range of weight rows split at multiples of four (whole register tiles of
``_gemm_tiles``); every input row is multiplied by the share's weight rows in those tiles, so a
share gives the same bits as the ``linear`` op's tiles for the same rows.
"""
from __future__ import annotations

import numba

from gptevo.backends.numba._fused_rows import permute_blocks
from gptevo.backends.numba._gemm_tiles import tile_rows_bf16, tile_rows_f32   # compiled into the callers' kernels

_OPTS = dict(cache=True, fastmath=False, error_model="numpy", nogil=True)


@numba.njit(**_OPTS)
def share(n, t, n_threads):
    """Thread t's rows of n, split at multiples of four (whole register tiles)."""
    lo = (n * t // n_threads) // 4 * 4
    hi = (n * (t + 1) // n_threads) // 4 * 4 if t + 1 < n_threads else n
    return lo, hi


@numba.njit(**_OPTS)
def tile_share(is_bf16, w, x, xp, bias, has_bias, t, n_threads, out):
    """Thread t's share of ``out = x @ w.T (+ bias)`` in the register tiles of ``_gemm_tiles``
    (bfloat16 bits take x permuted into xp); returns the share (lo, hi). The tile functions are
    named here, not held in a variable: numba caches a kernel only when the jitted functions it
    calls are globals."""
    lo, hi = share(w.shape[0], t, n_threads)
    if is_bf16:
        permute_blocks(x, xp)
        tile_rows_bf16(w, xp, bias, has_bias, lo, hi, out)
    else:
        tile_rows_f32(w, x, bias, has_bias, lo, hi, out)
    return lo, hi


@numba.njit(**_OPTS)
def add_columns(xb, tmp, lo, hi):
    """The residual add of one thread's share: xb[b, lo:hi] += tmp[b, lo:hi] for every row b."""
    for b in range(xb.shape[0]):
        for r in range(lo, hi):
            xb[b, r] += tmp[b, r]
