"""Per-call overhead of calling ops through the backend registry (argument checks + dispatch).

    python tools/bench_op_overhead.py [--backends reference,numba] [--number 2000] [--repeat 7]

Decode on GPT-2 calls ops about a hundred times per token, so the fixed cost of one call matters.
For small decode-sized ops (GPT-2 widths, one token) this prints, per backend, the time per call
through the registry (``backend.ops[name]``, what the model calls: checks, then the backend's
implementation) and, where the backend exposes them, through its raw implementation
(``backend.impls[name]``: no registry check) and of the check alone (``OpSpec.check``). The
difference registry - raw is the validation layer's cost. Best of ``--repeat`` timeit runs of
``--number`` calls each. A tool, not a test: nothing here asserts on time.
"""
from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gptevo import backends  # noqa: E402
from gptevo.ops import REGISTRY  # noqa: E402


def decode_calls(rng) -> list[tuple[str, dict]]:
    """(op, kwargs) of one GPT-2-sized decode step's kinds of call (D=768, H=12, Dh=64, 32 cached keys)."""
    f32 = np.float32
    d, h, dh, s, v = 768, 12, 64, 32, 1000
    x = rng.standard_normal((1, d)).astype(f32)
    return [
        ("embedding", {"table": rng.standard_normal((v, d)).astype(f32), "ids": np.array([5])}),
        ("layer_norm", {"x": x, "weight": np.ones(d, f32), "bias": np.zeros(d, f32), "eps": 1e-5}),
        ("rms_norm", {"x": x, "weight": np.ones(d, f32), "eps": 1e-5}),
        ("linear", {"x": x, "weight": rng.standard_normal((64, d)).astype(f32), "bias": np.zeros(64, f32)}),
        ("gelu", {"x": rng.standard_normal((1, 4 * d)).astype(f32), "approximate": "tanh"}),
        ("swiglu", {"gate": x, "up": x}),
        ("apply_rope", {"x": rng.standard_normal((1, h, dh)).astype(f32),
                        "cos": np.ones((1, dh // 2), f32), "sin": np.zeros((1, dh // 2), f32)}),
        ("attention", {"q": rng.standard_normal((1, h, dh)).astype(f32),
                       "k": rng.standard_normal((s, h, dh)).astype(f32),
                       "v": rng.standard_normal((s, h, dh)).astype(f32),
                       "q_positions": np.array([s - 1]), "k_positions": np.arange(s), "scale": 0.125}),
        ("moe_route", {"logits": rng.standard_normal((1, 32)).astype(f32), "k": 4, "order": "topk_softmax"}),
    ]


def per_call_us(fn, number: int, repeat: int) -> float:
    fn()                                                   # warm-up (compiles numba kernels)
    return 1e6 * min(timeit.repeat(fn, number=number, repeat=repeat)) / number


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="reference,numba")
    ap.add_argument("--number", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args(argv)
    calls = decode_calls(np.random.default_rng(0))
    print(f"{'backend':10} {'op':12} {'registry us':>12} {'raw us':>8} {'check us':>9}")
    for name in args.backends.split(","):
        if name not in backends.available():
            print(f"{name:10} (unavailable: {backends.available().unavailable.get(name)})")
            continue
        be = backends.get(name)
        impls = getattr(be, "impls", None)
        for op, kw in calls:
            if op not in be.ops:
                continue
            reg = per_call_us(lambda: be.ops[op](**kw), args.number, args.repeat)
            raw = per_call_us(lambda: impls[op](**kw), args.number, args.repeat) if impls else float("nan")
            check = getattr(REGISTRY[op], "check", None)
            chk = per_call_us(lambda: check(**kw), args.number, args.repeat) if check else float("nan")
            print(f"{name:10} {op:12} {reg:12.2f} {raw:8.2f} {chk:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
