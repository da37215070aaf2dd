"""A/B: the numba backend's fused one-token decode step against the same model's ops, one process.

    python tools/bench_fused_decode.py MODEL_DIR [--weights stored|int8] [--tokens 32] [--rounds 3]
                                       [--batch B [--batch-steps 6]]

Loads the model once on numba, checks that the fused step takes it (else says so and stops), then
alternates rounds: ``--tokens`` greedy tokens through the fused step, the same through the ops
(``model._fused_step = False`` for that round), each on a fresh cache. Prints tok/s per round and
the largest relative logit difference between the two paths on the first step (exact mode: float
rounding; int8 mode may differ more, see spec/backends.md, "Fused decode"). Speed only: compare
rounds of the same run, the machine's bandwidth moves between runs.

With ``--batch B`` each round also runs the batch decoder (``gptevo.bench.measure_batch_decode``):
batch 1, then B sequences through the step's batched form (``rows``) and through the ops (``rows``
answering None for that round); prints aggregate tok/s and each batch-B rate over the batch-1 rate.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _rate(model, tokens: int, fused: bool) -> float:
    saved = model._fused_step
    if not fused:
        model._fused_step = False
    try:
        cache = model.new_cache(tokens + 1)
        tok = 5
        t0 = time.perf_counter()
        for _ in range(tokens):
            tok = int(np.argmax(model.forward([tok], cache)[-1]))
        return tokens / (time.perf_counter() - t0)
    finally:
        model._fused_step = saved


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--weights", default="stored", choices=("stored", "int8"))
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=0, help="also compare the batched step at this batch size")
    ap.add_argument("--batch-steps", type=int, default=6)
    args = ap.parse_args(argv)
    if args.tokens < 1 or args.rounds < 1 or args.batch < 0 or args.batch == 1 or args.batch_steps < 1:
        ap.error("--tokens, --rounds and --batch-steps must be >= 1, --batch 0 (off) or >= 2")

    import gptevo

    model = gptevo.load(args.model_dir, backend="numba", weights=args.weights)
    a, b = model.new_cache(2), model.new_cache(2)
    first = model.forward([5], a)                                          # builds (and compiles) the step
    if not model._fused_step:
        print("the fused step does not take this model (see spec/backends.md, 'Fused decode')")
        return 1
    model._fused_step, step = False, model._fused_step
    second = model.forward([5], b)
    model._fused_step = step
    diff = float(np.abs(first - second).max() / max(np.abs(second).max(), 1e-30))
    print(f"{args.model_dir} ({args.weights}): {type(step).__name__}; first-step logits, fused vs ops: "
          f"max relative difference {diff:.2e}")
    _rate(model, 2, True), _rate(model, 2, False)                          # warm both paths
    for r in range(args.rounds):
        f, o = _rate(model, args.tokens, True), _rate(model, args.tokens, False)
        print(f"round {r + 1}: fused {f:7.2f} tok/s   ops {o:7.2f} tok/s   ({f / o:.2f}x)")
        if args.batch:
            _batch_round(model, step, args.batch, args.batch_steps)
    return 0


def _batch_round(model, step, batch: int, steps: int) -> None:
    from gptevo.bench import measure_batch_decode

    one = measure_batch_decode(model, 1, steps, warmup=1)["tok_s"]
    fused = measure_batch_decode(model, batch, steps, warmup=1)["tok_s"]
    step.rows = lambda tokens, caches: None                                # this round: the ops
    try:
        ops = measure_batch_decode(model, batch, steps, warmup=1)["tok_s"]
    finally:
        del step.rows
    print(f"  batch 1 {one:7.2f} tok/s; batch {batch}: fused rows {fused:7.2f} tok/s ({fused / one:.2f}x batch 1)"
          f"   ops {ops:7.2f} tok/s ({ops / one:.2f}x)")


if __name__ == "__main__":
    sys.exit(main())
