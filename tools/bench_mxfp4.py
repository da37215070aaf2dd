"""Microbenchmark: MXFP4 decode GEMV on the numba backend, GB/s of packed bytes (blocks + scales).

    python tools/bench_mxfp4.py [--shape gate_up|down] [--experts 4] [--threads 2] [--reps 30]

Default shape: gpt-oss gate_up decode, 4 selected experts x 5760 rows x 2880 inputs (35 MB of
packed bytes per call, more than any L2; the table E = 8 experts, so the selected 4 are not all
resident in cache between calls). Kernels: the old per-row ``dot_mxfp4`` (``_weights.py``, via
``grouped_gemm``) and every variant of ``_mxfp4_gemv.mxfp4_gemv`` this host can run. Best of
``--reps`` calls each; also the normalized error vs the float64 reference decode + matmul.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=("gate_up", "down"), default="gate_up")
    ap.add_argument("--experts", type=int, default=4, help="selected experts per call (default 4)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--skip-old", action="store_true", help="do not time the old dot_mxfp4 path")
    args = ap.parse_args()

    import numba

    from gptevo.backends.numba import _mxfp4_gemv as mg
    from gptevo.backends.numba._linear import grouped_gemm
    from gptevo.backends.numba._weights import SCALE_TABLE, VALUE_TABLE, dot_mxfp4, row_mxfp4
    from gptevo.ops.mxfp4 import mxfp4_decode

    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    n_rows, k = (5760, 2880) if args.shape == "gate_up" else (2880, 2880)
    n_e, g = 8, k // 32
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (n_e, n_rows, g, 16), dtype=np.uint8)
    scales = rng.integers(118, 128, (n_e, n_rows, g), dtype=np.uint8)
    experts = rng.choice(n_e, args.experts, replace=False).astype(np.int64)
    x = rng.standard_normal((1, k)).astype(np.float32)
    nbytes = args.experts * n_rows * g * 17
    ref = np.stack([mxfp4_decode(blocks[e], scales[e], "float64") @ x[0].astype(np.float64) for e in experts])

    def timeit(fn):
        t0 = time.perf_counter()
        out = fn()
        first = time.perf_counter() - t0
        best = float("inf")
        for _ in range(args.reps):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        return best, first, err

    rows = []
    if not args.skip_old:
        wt = (blocks, scales, VALUE_TABLE[np.dtype(np.float32)], SCALE_TABLE[np.dtype(np.float32)])
        out_old = np.empty((args.experts, n_rows), np.float32)
        starts = np.arange(args.experts + 1, dtype=np.int64)
        tok = np.zeros(args.experts, np.int64)
        bias = np.zeros((1, 1), np.float32)

        def old():
            grouped_gemm(x, tok, starts, experts, wt, row_mxfp4, dot_mxfp4, bias, False, out_old, 64, np.float32(0))
            return out_old
        rows.append(("old dot_mxfp4 (grouped_gemm)", *timeit(old)))
    out = np.empty((args.experts, n_rows), np.float32)
    for mode in mg.MODES:
        variants = mg.host_variants(mode)
        for var in variants:
            rows.append((f"{mode} / {var}", *timeit(lambda: mg.mxfp4_gemv(blocks, scales, experts, x, out, mode=mode,
                                                                          variant=var))))
    print(f"{args.shape}: {args.experts} experts x {n_rows} x {k}, {nbytes / 1e6:.1f} MB packed per call, "
          f"{numba.get_num_threads()} threads, best of {args.reps}")
    print(f"{'kernel':32s} {'GB/s':>7s} {'ms':>8s} {'first call s':>12s} {'norm. error':>12s}")
    for name, best, first, err in rows:
        print(f"{name:32s} {nbytes / best / 1e9:7.1f} {best * 1e3:8.2f} {first:12.2f} {err:12.2e}")


if __name__ == "__main__":
    main()
