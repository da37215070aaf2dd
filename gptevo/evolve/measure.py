"""Measured columns of a ladder step: prefill and decode tok/s and peak memory, random weights in memory.

One step is measured in its own Python process (``python -m gptevo.evolve.measure ...`` prints one JSON
object), so that its peak RSS is its own: the parent builds nothing. In the worker:

1. build the step's model with random weights on the backend (``random_model.build_model``); the RSS
   before building is the process baseline (Python, NumPy, the backend's modules);
2. warm up: the same prompt length and 2 decoded tokens on a scratch cache (numba compiles or loads
   its kernels for these shapes here; the cupy backend compiles its kernels);
3. prefill: one ``model.forward(ids, cache, logits="last")`` of ``context`` random ids on an empty
   cache sized ``context + decode_tokens``; prefill tok/s = context / seconds;
4. decode: ``decode_tokens`` greedy single-token forwards on that cache (each attends to the context);
   decode tok/s = decode_tokens / seconds; 3 and 4 run ``REPEATS`` times on fresh caches and the
   fastest of each is kept (the machine may be shared);
5. peak RSS of the process (``ru_maxrss``) and peak minus the baseline taken after the backend's
   modules were imported (what the model, its KV cache, the activations and the kernels loaded on
   first use added).

A step is measured only when it fits: its estimated peak (:func:`estimate_bytes`) must be below
``FIT_FRACTION`` of the memory available now; otherwise the result says why it was skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from gptevo.config import ModelConfig
from gptevo.errors import GptevoError, RequestError

FIT_FRACTION = 0.6
OVERHEAD_BYTES = 300 << 20          # interpreter, NumPy, numba's compiled kernels
STEP_TIMEOUT_S = 900
REPEATS = 3


def available_memory() -> int | None:
    """Bytes of memory available now (Linux MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_bytes(config: ModelConfig, context: int, decode_tokens: int) -> int:
    """An upper estimate of the worker's peak: weights as stored, the float32 KV cache, the prefill's
    activations (including the reference's [H, T, T] score matrix) and a fixed overhead."""
    from gptevo.calculators import kv_cache_bytes
    from gptevo.evolve.metrics import storage
    from gptevo.calculators import weight_memory

    dtype, experts_only = storage(config)
    n = context + decode_tokens
    widest = max(config.intermediate_size, 2 * (config.moe_intermediate_size or 0), config.hidden_size)
    acts = 4 * n * (8 * config.hidden_size + 3 * widest + (config.num_heads + 2 * config.num_kv_heads)
                    * config.head_dim)
    scores = 4 * config.num_heads * n * n
    return (weight_memory(config, dtype, experts_only=experts_only) + kv_cache_bytes(config, n, "float32")
            + acts + scores + 4 * config.vocab_size + OVERHEAD_BYTES)


def fits(config: ModelConfig, context: int, decode_tokens: int) -> tuple[bool, str]:
    """(True, "") when the step can be measured here, else (False, the reason in words)."""
    need = estimate_bytes(config, context, decode_tokens)
    avail = available_memory()
    if avail is None:
        return True, ""
    if need > FIT_FRACTION * avail:
        return False, (f"not measured: needs about {need / 1e9:.1f} GB, {avail / 1e9:.1f} GB available "
                       f"(limit {int(FIT_FRACTION * 100)}%)")
    return True, ""


def peak_rss() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss()


def measure_model(model, context: int, decode_tokens: int, seed: int = 0, repeats: int = REPEATS) -> dict:
    """Warm-up, then ``repeats`` times a prefill of ``context`` ids and ``decode_tokens`` greedy decodes
    on a fresh cache; the fastest prefill and the fastest decode are kept (see module doc)."""
    rng = np.random.default_rng(seed)
    V = model.config.vocab_size
    t0 = time.perf_counter()
    scratch = model.new_cache(context + 2)                  # the measured shapes once: kernels compile
    model.forward(rng.integers(0, V, context).tolist(), scratch, logits="last")
    for _ in range(2):
        model.forward([int(rng.integers(0, V))], scratch)
    del scratch
    warm = time.perf_counter() - t0
    prefill = decode = float("inf")
    for _ in range(repeats):
        cache = model.new_cache(context + decode_tokens)
        ids = rng.integers(0, V, context).tolist()                                   # [context]
        t0 = time.perf_counter()
        logits = model.forward(ids, cache, logits="last")                            # [1, V]
        prefill = min(prefill, time.perf_counter() - t0)
        tok = int(np.argmax(logits[-1]))
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            tok = int(np.argmax(model.forward([tok], cache)[-1]))                    # [1, V]
        decode = min(decode, time.perf_counter() - t0)
        del cache
    return {"prefill_tok_s": context / prefill, "decode_tok_s": decode_tokens / decode,
            "prefill_s": prefill, "decode_s": decode, "warmup_s": warm}


def measure_in_this_process(config: ModelConfig, backend, context: int, decode_tokens: int, seed: int = 0,
                            threads: int | None = None) -> dict:
    """Build and measure one step here (the worker's body); peak RSS is this process's. ``threads``
    sets the numba, OpenMP and BLAS thread counts (gptevo.bench.set_threads) before building."""
    from gptevo.bench import set_numba_threads, set_threads
    from gptevo.evolve.random_model import build_model

    from gptevo import backends

    set_threads(threads)
    backend = backends.resolve(backend)          # import the backend's modules before the baseline
    base = current_rss()
    t0 = time.perf_counter()
    model = build_model(config, backend, seed=seed)
    if threads is not None:
        set_numba_threads(threads)
    build = time.perf_counter() - t0
    out = measure_model(model, context, decode_tokens, seed)
    peak = peak_rss()
    out.update(build_s=build, peak_rss_bytes=peak, model_peak_bytes=max(0, peak - base),
               backend=model.backend.name)
    return out


def measure_step(scale: str, step_id: str, backend: str | None, context: int, decode_tokens: int,
                 threads: int | None = None, timeout: float = STEP_TIMEOUT_S, python: str | None = None) -> dict:
    """Measure one step in a fresh process; {"error": ...} (never an exception) when it fails."""
    cmd = [python or sys.executable, "-m", "gptevo.evolve.measure", "--scale", scale, "--step", step_id,
           "--context", str(context), "--decode-tokens", str(decode_tokens)]
    if backend:
        cmd += ["--backend", backend]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"measurement process failed (exit {proc.returncode}): {tail}"}
    return json.loads(lines[-1])


def _worker(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gptevo.evolve.measure",
                                 description="measure one ladder step (prints one JSON object)")
    ap.add_argument("--scale", required=True)
    ap.add_argument("--step", required=True)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--context", type=int, required=True)
    ap.add_argument("--decode-tokens", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    from gptevo.evolve.ladder import ladder, step_by_id

    try:
        step = step_by_id(ladder(args.scale), args.step)
        if args.context < 1 or args.decode_tokens < 1:
            raise RequestError("--context and --decode-tokens must be positive")
        result = measure_in_this_process(step.config, args.backend, args.context, args.decode_tokens, args.seed,
                                         threads=args.threads)
    except GptevoError as exc:
        print(f"gptevo: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_worker())
