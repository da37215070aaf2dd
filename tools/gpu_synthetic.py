"""Full-size gpt-oss models with random weights built directly in GPU memory, and their decode/prefill speed.

    python tools/gpu_synthetic.py --model gpt-oss-20b [--decode-ctx 128,4096] [--prefill 512,2048]
        [--steps 32] [--json FILE]

No file is written or read: gpt-oss-120b's 65 GB would not fit the disk. The model is built by
``Model.from_checkpoint`` from a checkpoint object that serves the real tensor list of the release
(``tools/make_synthetic_checkpoint.py``: names, shapes, dtypes); small tensors (norms, biases,
sinks, router) are real random host arrays, and every big one (embedding, attention matrices, MXFP4
expert blocks and scales, output head) is a zero-strided placeholder with the right shape and dtype
that holds no memory. The cupy backend's weight cache is then filled, for exactly those placeholder
objects, with random device arrays made on the GPU (bf16 normal(0, 0.02) as raw bits; uniform code
bytes and scale bytes 118..122, as make_synthetic_checkpoint.py draws them), so the ops find every
weight already uploaded and the host never holds the model.

Measured (batch 1, float32 activations, the model's own code path):
- decode tok/s at context C: the KV cache is filled with C random positions (keys and values on the
  device, ring slots of sliding layers hold the last W positions), then ``--steps`` tokens are
  decoded, each ``model.forward_on_backend([tok], cache)`` ("eager") or the replayed CUDA graph of
  the step (``ARRAYS.decode_runner``, as ``gptevo.generate`` does), followed by greedy sampling on the
  device (only the token id crosses to the host);
- prefill tok/s at T tokens: one ``forward_on_backend(ids, cache, logits="last")`` of T random ids on an
  empty cache (the output head on the last row only, as generate does; best of two);
- peak GPU memory in use (``cudaMemGetInfo``, sampled after every phase) and the weight bytes.
Prints one line per measurement and, with ``--json``, writes them to FILE.

``build_model(model, backend, rt)`` is the entry point for other tools and the tests (which run the
tiny gpt-oss config on the CPU emulator with ``--tiny``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "tools"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import make_synthetic_checkpoint as msc  # noqa: E402

BIG = 1 << 20                    # tensors with more elements are made on the device
STD = msc.STD


def _np_dtype(name: str):
    import ml_dtypes

    return {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32),
            "uint8": np.dtype(np.uint8)}[name]


def placeholder(shape, dtype) -> np.ndarray:
    """A read-only array of ``shape``/``dtype`` that holds one element (every stride 0)."""
    a = np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape=tuple(shape), strides=(0,) * len(shape))
    a.flags.writeable = False
    return a


class SyntheticCheckpoint:
    """names/info/get over a TensorSpec list; big tensors are placeholders (see the module doc)."""

    def __init__(self, specs, seed: int = 0, big: int = BIG):
        self.specs = {s.name: s for s in specs}
        self.seed = seed
        self.big_numel = big
        self.big: dict[str, msc.TensorSpec] = {}

    def names(self):
        return list(self.specs)

    def info(self, name):
        s = self.specs[name]
        return s.dtype, tuple(s.shape)

    def get(self, name):
        s = self.specs[name]
        dt = _np_dtype(s.dtype)
        if s.numel > self.big_numel:
            self.big[name] = s
            return placeholder(s.shape, dt)
        rng = np.random.default_rng([self.seed, sum(map(ord, name))])
        if s.fill == "ones":
            return np.ones(s.shape, dt)
        if s.fill == "bytes":
            return rng.integers(0, 256, s.shape, dtype=np.uint8)
        if s.fill == "scales":
            return rng.integers(msc.SCALE_BYTES[0], msc.SCALE_BYTES[1] + 1, s.shape, dtype=np.uint8)
        return (rng.standard_normal(s.shape) * s.std).astype(dt)

    def close(self):
        pass


def _device_random(rt, kind: str, shape, seed: int):
    """A device array: "bf16" normal(0, STD) as uint16 bits, "bytes" uniform u8, "scales" u8 in SCALE_BYTES."""
    xp = rt.xp
    n = int(np.prod(shape, dtype=np.int64))
    random = getattr(xp, "random", None)
    if random is None or xp is np:                       # the CPU emulator: make it on the host
        rng = np.random.default_rng(seed)
        if kind == "bf16":
            host = ((rng.standard_normal(n).astype(np.float32) * STD).view(np.uint32) >> 16).astype(np.uint16)
        elif kind == "bytes":
            host = rng.integers(0, 256, n, dtype=np.uint8)
        else:
            host = rng.integers(msc.SCALE_BYTES[0], msc.SCALE_BYTES[1] + 1, n, dtype=np.uint8)
        return rt.upload(host.reshape(shape))
    random.seed(seed)
    out = xp.empty(n, dtype=np.uint16 if kind == "bf16" else np.uint8)
    chunk = 1 << 28
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        if kind == "bf16":
            x = random.standard_normal(b - a, dtype=np.float32) * np.float32(STD)
            out[a:b] = (x.view(np.uint32) >> 16).astype(np.uint16)
        elif kind == "bytes":
            out[a:b] = random.randint(0, 256, b - a, dtype=np.int32).astype(np.uint8)
        else:
            out[a:b] = random.randint(msc.SCALE_BYTES[0], msc.SCALE_BYTES[1] + 1, b - a,
                                      dtype=np.int32).astype(np.uint8)
    return out.reshape(shape)


def _weights_of(model):
    """Every weight object the model holds (arrays and MXFP4 weights), with duplicates by identity once."""
    from gptevo.ops.mxfp4 import Mxfp4Weight

    seen, out = set(), []

    def visit(v):
        if isinstance(v, (np.ndarray, Mxfp4Weight)) and id(v) not in seen:
            seen.add(id(v))
            out.append(v)

    w = model.weights
    for v in vars(w).values() if hasattr(w, "__dict__") else ():
        visit(v)
    for name in getattr(type(w), "__dataclass_fields__", {}):
        visit(getattr(w, name))
    for layer in w.layers:
        fields = getattr(type(layer), "__dataclass_fields__", None) or vars(layer)
        for name in fields:
            visit(getattr(layer, name))
    return out


def _is_placeholder(a) -> bool:
    return isinstance(a, np.ndarray) and a.size > 1 and all(s == 0 for s in a.strides)


def fill_device_weights(model, rt, seed: int = 0) -> int:
    """Put a random device array into ``rt``'s weight cache for every placeholder the model holds,
    under the tags the cupy ops look up; returns the device bytes made."""
    from gptevo.ops.mxfp4 import Mxfp4Weight

    total = 0
    for i, w in enumerate(_weights_of(model)):
        if isinstance(w, Mxfp4Weight):
            for j, (arr, kind) in enumerate(((w.blocks, "bytes"), (w.scales, "scales"))):
                if _is_placeholder(arr):
                    dev = _device_random(rt, kind, arr.shape, seed * 1000 + 2 * i + j)
                    rt.weights.put(arr, "raw", dev)
                    total += int(dev.nbytes)
        elif _is_placeholder(w):
            if w.dtype.itemsize != 2:
                raise ValueError(f"synthetic big weights are bf16; got {w.dtype}")
            dev = _device_random(rt, "bf16", w.shape, seed * 1000 + 2 * i)
            rt.weights.put(w, "raw:uint16", dev)
            total += int(dev.nbytes)
    return total


def build_model(model: str, backend, rt, tiny: bool = False, seed: int = 0, big: int = BIG):
    """(Model, device weight bytes) of ``model`` ("gpt-oss-20b" / "gpt-oss-120b") on ``backend``,
    whose cupy runtime is ``rt``; the big weights are made on the device (see the module doc)."""
    from gptevo.config_adapters import config_from_dict
    from gptevo.model import Model

    cfg = msc.model_config(model, tiny=tiny)
    specs = msc.tensor_list(cfg)
    config = config_from_dict(cfg, f"synthetic {model}")
    ckpt = SyntheticCheckpoint(specs, seed, big=1000 if tiny else big)
    rt.weights.limit_bytes = max(rt.weights.limit_bytes, 1 << 40)        # the whole model stays resident
    m = Model.from_checkpoint(config, ckpt, backend=backend)
    return m, fill_device_weights(m, rt, seed)


def fill_cache(cache, context: int, rt, seed: int = 0) -> None:
    """Make ``cache`` hold ``context`` positions of random keys and values (device buffers)."""
    xp = rt.xp
    random = getattr(xp, "random", None)
    for layer, (K, V, P) in enumerate(zip(cache.keys, cache.values, cache.positions)):
        slots = K.shape[0]
        if random is not None and xp is not np:
            random.seed(seed + layer)
            K[...] = random.standard_normal(K.shape, dtype=np.float32)
            V[...] = random.standard_normal(V.shape, dtype=np.float32)
        else:
            rng = np.random.default_rng(seed + layer)
            K[...] = rt.upload(rng.standard_normal(K.shape).astype(np.float32))
            V[...] = rt.upload(rng.standard_normal(V.shape).astype(np.float32))
        first = max(0, context - slots)
        pos = np.full(slots, -1, np.int64)
        p = np.arange(first, context, dtype=np.int64)
        pos[p % slots] = p
        P[...] = rt.upload(pos)
    cache._lengths = [context] * cache.num_layers


def _sync(rt):
    device = getattr(getattr(rt.xp, "cuda", None), "Device", None)
    if callable(device):
        rt.xp.cuda.Device().synchronize()


def _mem_used(rt) -> int:
    try:
        free, total = rt.xp.cuda.runtime.memGetInfo()
        return int(total - free)
    except Exception:
        return 0


def bench(model_name: str, decode_ctx, prefill, steps: int, tiny: bool = False, backend=None, rt=None,
          report=print, rows: list | None = None) -> list[dict]:
    """The measurements of the module doc, appended to ``rows`` as dicts; ``report`` gets one line per
    measurement (after the row is appended, so a caller can save what is done so far)."""
    if backend is None:
        from gptevo.backends import get
        from gptevo.backends.cupy import runtime

        backend, rt = get("cupy"), runtime()
    from gptevo.model import backend_arrays

    arrays = backend_arrays(backend)
    rows = [] if rows is None else rows
    peak = [0]

    def note():
        peak[0] = max(peak[0], _mem_used(rt))

    t0 = time.perf_counter()
    model, nbytes = build_model(model_name, backend, rt, tiny=tiny)
    _sync(rt)
    note()
    rows.append({"what": "build", "model": model_name, "seconds": round(time.perf_counter() - t0, 2),
                 "device_weight_gb": round(nbytes / 1e9, 2)})
    report(f"{model_name}: built in {rows[-1]['seconds']} s, "
           f"{rows[-1]['device_weight_gb']} GB of weights on the device")
    V = model.config.vocab_size
    rng = np.random.default_rng(0)
    warm = model.new_cache(8)
    model.forward_on_backend(rng.integers(0, V, 4).tolist(), warm)           # compiles the kernels
    model.forward_on_backend([1], warm)
    _sync(rt)
    del warm

    for ctx in decode_ctx:
        for graph in (False, True):
            cache = model.new_cache(ctx + steps + 4)
            fill_cache(cache, ctx, rt)
            runner = arrays.decode_runner(model, cache) if graph else None
            step = runner if runner is not None else (lambda t, c=cache: model.forward_on_backend([t], c))
            tok = 1
            for _ in range(3):                                              # warm-up steps (and the capture)
                logits = step(tok)
                tok, _ = arrays.sample_token(logits[-1], 0.0, 0, 1.0, 0.0)
            _sync(rt)
            t1 = time.perf_counter()
            for _ in range(steps):
                logits = step(tok)
                tok, bad = arrays.sample_token(logits[-1], 0.0, 0, 1.0, 0.0)
            dt = time.perf_counter() - t1
            note()
            how = "eager" if runner is None else ("CUDA graph" if runner.failed is None else
                                                  f"graph failed ({runner.failed[:80]})")
            rows.append({"what": "decode", "model": model_name, "context": ctx, "mode": how,
                         "tok_s": round(steps / dt, 1), "ms_per_token": round(dt / steps * 1e3, 3), "finite": bad < 0})
            report(f"{model_name}: decode at context {ctx}, {how}: {rows[-1]['tok_s']} tok/s "
                   f"({rows[-1]['ms_per_token']} ms/token, logits finite: {bad < 0})")
            del cache, logits, runner

    for t in prefill:
        best = None
        for _ in range(2):
            cache = model.new_cache(t + 1)
            ids = rng.integers(0, V, t).tolist()
            _sync(rt)
            t1 = time.perf_counter()
            logits = model.forward_on_backend(ids, cache, logits="last")   # as generate (and llama-bench)
            _sync(rt)
            dt = time.perf_counter() - t1
            best = dt if best is None else min(best, dt)
            note()
            del cache, logits
        rows.append({"what": "prefill", "model": model_name, "tokens": t, "tok_s": round(t / best, 1),
                     "seconds": round(best, 3)})
        report(f"{model_name}: prefill of {t} tokens: {rows[-1]['tok_s']} tok/s ({rows[-1]['seconds']} s)")
    rows.append({"what": "memory", "model": model_name, "peak_gpu_gb": round(peak[0] / 1e9, 2)})
    report(f"{model_name}: peak GPU memory in use {rows[-1]['peak_gpu_gb']} GB")
    rt.clear()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gpt-oss-20b", choices=("gpt-oss-20b", "gpt-oss-120b"))
    ap.add_argument("--decode-ctx", default="128,4096")
    ap.add_argument("--prefill", default="512,2048")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--json", default=None)
    ap.add_argument("--tiny", action="store_true", help="the tiny config of the family (tests)")
    args = ap.parse_args(argv)
    ints = lambda s: [int(v) for v in s.split(",") if v]   # noqa: E731
    rows: list[dict] = []

    def report(line):
        print(line, flush=True)
        if args.json:                                  # what is done so far survives a timeout
            Path(args.json).write_text(json.dumps(rows, indent=1))

    bench(args.model, ints(args.decode_ctx), ints(args.prefill), args.steps, tiny=args.tiny, report=report, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
