"""The numba backend's many-row kernels against their alternatives, in one process (a study, not a test).

    python tools/bench_prefill_kernels.py [--rounds 3] [--only attention,blas,moe,stream]

Prints, per kernel and shape, each round's rate for our kernel and for what it replaced or competes
with, measured alternately in the same process so the machine's drift hits both alike:

- attention: ``_attention_flash.attention_flash`` at GPT-2 (T = S = 512, 12 heads) and gpt-oss-like
  (64 heads, 8 KV heads, window 128) prefill shapes, in GFMA/s of the products the causal mask
  leaves (there is no other attention kernel left in the backend to race; the reference's plain
  form is shown for scale);
- blas: ``_blas.matmul_nt`` (products split by output columns, one BLAS thread per part) against
  OpenBLAS's own threads (``x @ w.T``), GFLOP/s, GPT-2 and gpt-oss prefill shapes;
- moe: ``_moe_tiles.expert_tiles_gemm`` (AVX-512 register tiles) against the portable
  ``_moe_grouped.expert_rows_gemm`` for 4 / 16 / 64 rows of a 5760 x 2880 MXFP4 expert, GFLOP/s;
- stream: ``_moe_tiles.expert_rows_stream`` against one MXFP4 GEMV pass per row for 1-3 rows, ms.

Speed is measured, never asserted: nothing here fails on a slow number.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _time(fn, reps: int) -> float:
    """Seconds per call: ``reps`` calls after one untimed call."""
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def _race(label: str, variants: dict, rounds: int, reps: int, scale: float, unit: str) -> None:
    """Alternate the variants ``rounds`` times; print scale / seconds per call for each round.

    A pause before each variant lets thread pools that spin after their last call (OpenBLAS's
    workers spin ~2**28 cycles) go idle, so no variant starts beside the previous one's spinners."""
    rates = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            time.sleep(0.5)
            rates[name].append(scale / _time(fn, reps))
    cells = "  ".join(f"{name} " + " ".join(f"{v:.1f}" for v in vs) for name, vs in rates.items())
    print(f"  {label}: {cells} {unit}")


def bench_attention(rounds: int) -> None:
    from gptevo.backends.numba._attention_flash import attention_flash
    from gptevo.ops.attention import attention as reference
    print("attention (GFMA/s of the visible products)")
    rng = np.random.default_rng(0)
    for t, h, g, w in [(512, 12, 12, 0), (512, 64, 8, 128)]:
        q = rng.standard_normal((t, h, 64)).astype(np.float32)
        k = rng.standard_normal((t, g, 64)).astype(np.float32)
        v = rng.standard_normal((t, g, 64)).astype(np.float32)
        pos = np.arange(t)
        out = np.empty_like(q)
        visible = sum(min(i + 1, w or i + 1) for i in range(t))
        fma = h * visible * 128 / 1e9
        _race(f"T=S={t} H={h} G={g} window={w or '-'}", {
            "flash": lambda: attention_flash(q, k, v, pos, pos, w, None, None, 0.125, out),
            "reference": lambda: reference(q, k, v, window=w or None, scale=0.125),
        }, rounds, 2, fma, "GFMA/s")


def bench_blas(rounds: int) -> None:
    import numba

    from gptevo.backends.numba import _blas
    print("prefill products (GFLOP/s)")
    rng = np.random.default_rng(0)
    threads = numba.get_num_threads()
    for m, k, n in [(512, 768, 3072), (512, 3072, 768), (512, 768, 2304), (128, 2880, 5120)]:
        x = rng.standard_normal((m, k)).astype(np.float32)
        w = rng.standard_normal((n, k)).astype(np.float32)
        _race(f"{m} x {k} x {n}", {
            "split": lambda: _blas.matmul_nt(x, w, threads),
            "openblas-threads": lambda: x @ w.T,
        }, rounds, 5, 2 * m * n * k / 1e9, "GFLOP/s")


def _expert_setup(what: str, seed: int):
    """A random 4-expert 5760 x 2880 MXFP4 weight and the decode tables, or None (with a line
    saying so) on a host without AVX-512, where the register-tile kernels do not run."""
    from gptevo.backends.numba import _moe_grouped, _simd
    from gptevo.ops.mxfp4 import FP4_VALUES
    if not _simd.has_avx512():
        print(f"{what}: no AVX-512 on this host (the register-tile kernels do not run here)")
        return None
    rng = np.random.default_rng(seed)
    n, k = 5760, 2880
    blocks = rng.integers(0, 256, (4, n, k // 32, 16), dtype=np.uint8)     # [E,N,K/32,16]
    scales = rng.integers(118, 130, (4, n, k // 32), dtype=np.uint8)        # [E,N,K/32]
    return rng, blocks, scales, FP4_VALUES.astype(np.float32), _moe_grouped._powers(), n, k


def bench_moe(rounds: int) -> None:
    import numba

    from gptevo.backends.numba import _moe_grouped, _moe_tiles
    setup = _expert_setup("moe", 0)
    if setup is None:
        return
    rng, blocks, scales, values, powers, n, k = setup
    print("grouped MXFP4 expert, 5760 x 2880 (GFLOP/s)")
    chunk = 4 * max(2, -(-n // (32 * numba.get_num_threads())))
    for g in (4, 16, 64):
        x = rng.standard_normal((g, k)).astype(np.float32)
        out = np.empty((g, n), np.float32)
        _race(f"{g} rows", {
            "tiles": lambda: _moe_tiles.expert_tiles_gemm(blocks, scales, 1, _moe_tiles.permute_rows(x), values,
                                                          powers, out, chunk),
            "portable": lambda: _moe_grouped.expert_rows_gemm(blocks, scales, 1, x, values, powers, out, chunk),
        }, rounds, 3, 2 * g * n * k / 1e9, "GFLOP/s")


def bench_stream(rounds: int) -> None:
    import numba

    from gptevo.backends.numba import _moe_tiles, _mxfp4_gemv
    setup = _expert_setup("stream", 1)
    if setup is None:
        return
    rng, blocks, scales, values, powers, n, k = setup
    print("small groups of one MXFP4 expert, 5760 x 2880 (calls per second; higher is faster)")
    chunk = max(16, -(-n // (8 * numba.get_num_threads())))
    for g in (1, 2, 3):
        x = rng.standard_normal((g, k)).astype(np.float32)
        out = np.empty((g, n), np.float32)
        xp = _moe_tiles.permute_rows(x)
        _race(f"{g} rows", {
            "stream": lambda: _moe_tiles.expert_rows_stream(blocks, scales, 1, xp, values, powers, out, chunk),
            "gemv-per-row": lambda: _mxfp4_gemv.mxfp4_gemv(blocks, scales, np.full(g, 1, np.int64), x, mode="exact"),
        }, rounds, 5, 1.0, "calls/s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per comparison (default 3)")
    ap.add_argument("--only", default="attention,blas,moe,stream", help="comma-separated subset")
    args = ap.parse_args(argv)
    benches = {"attention": bench_attention, "blas": bench_blas, "moe": bench_moe, "stream": bench_stream}
    names = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(names) - set(benches))
    if unknown or not names:
        ap.error(f"--only: unknown or empty {unknown or args.only!r}; choose from {', '.join(benches)}")
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    import numba
    print(f"numba {numba.__version__}, {numba.get_num_threads()} threads")
    for name in names:
        benches[name](args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
