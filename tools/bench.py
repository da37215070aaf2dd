"""Benchmark the backends op by op (and one decode step of a small synthetic gpt-oss-like model).

    python tools/bench.py [--repeat N] [--quick] [--no-model]

Prints one table: per op and shape, the time per call of the reference, numba, and a peer in the
same run (torch CPU when installed), and, for the weight-bound ops (linear / MoE GEMV), the bytes
of weights read per call and the bandwidth that implies, next to the memory bandwidth measured
here with a large NumPy copy. A tool, not a test: nothing here asserts on time.
Numba's first call of each op compiles it; that call is excluded (one warm-up call per cell).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gptevo import backends  # noqa: E402
from gptevo.ops.mxfp4 import Mxfp4Weight  # noqa: E402

BF16 = ml_dtypes.bfloat16


def timeit(fn, repeat: int) -> float:
    """Best-of-``repeat`` seconds per call, after one warm-up call (compiles numba kernels)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def memory_bandwidth(mb: int = 256) -> float:
    """Bytes moved per second (read + write) by ``np.copyto`` of a ``mb`` MiB array, best of 5."""
    src = np.ones(mb * 2**20 // 8)
    dst = np.empty_like(src)
    t = timeit(lambda: np.copyto(dst, src), 5)
    return 2 * src.nbytes / t


def mxfp4(rng, rows, cols) -> Mxfp4Weight:
    rows = tuple(np.atleast_1d(rows))
    return Mxfp4Weight(rng.integers(0, 256, (*rows, cols // 32, 16), dtype=np.uint8),
                       rng.integers(118, 128, (*rows, cols // 32), dtype=np.uint8), name="bench")


def weight_bytes(w) -> int:
    return int(w.nbytes)


def cases(rng, quick: bool):
    """(label, op, kwargs, torch_fn or None, weight bytes read per call or None)."""
    try:
        import torch
        import torch.nn.functional as F
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    except ImportError:
        torch = F = None
    t = (lambda a: torch.from_numpy(np.ascontiguousarray(a))) if torch else None
    D, Q, KV = (1024, 1024, 256) if quick else (2880, 4096, 512)

    x1 = rng.standard_normal((1, D)).astype(np.float32)
    x64 = rng.standard_normal((64, D)).astype(np.float32)
    w_norm = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    yield ("rms_norm x[1,D]", "rms_norm", dict(x=x1, weight=w_norm, eps=1e-5),
           torch and (lambda a=t(x1), w=t(w_norm): F.rms_norm(a, (D,), w, 1e-5)), None)
    yield ("rms_norm x[64,D]", "rms_norm", dict(x=x64, weight=w_norm, eps=1e-5),
           torch and (lambda a=t(x64), w=t(w_norm): F.rms_norm(a, (D,), w, 1e-5)), None)

    w32 = (rng.standard_normal((Q, D)) / np.sqrt(D)).astype(np.float32)
    wbf = w32.astype(BF16)
    w4 = mxfp4(rng, Q, D)
    for tag, w in (("f32", w32), ("bf16", wbf), ("mxfp4", w4)):
        peer = None
        if torch and tag == "f32":
            peer = lambda a=t(x1), b=t(w32): F.linear(a, b)  # noqa: E731
        elif torch and tag == "bf16":
            peer = lambda a=t(x1).bfloat16(), b=t(w32).bfloat16(): F.linear(a, b)  # noqa: E731
        yield (f"linear GEMV x[1,{D}] W[{Q},{D}] {tag}", "linear", dict(x=x1, weight=w), peer, weight_bytes(w))
    yield (f"linear x[64,{D}] W[{Q},{D}] bf16", "linear", dict(x=x64, weight=wbf),
           torch and (lambda a=t(x64).bfloat16(), b=t(w32).bfloat16(): F.linear(a, b)), weight_bytes(wbf))

    logits = (3 * rng.standard_normal((64, 4096))).astype(np.float32)
    yield ("softmax [64,4096] +sinks", "softmax", dict(x=logits, sinks=rng.standard_normal(64).astype(np.float32)),
           torch and (lambda a=t(logits): torch.softmax(a, -1)), None)

    H, G, Dh, S = 64, 8, 64, (1024 if quick else 4096)
    q = rng.standard_normal((1, H, Dh)).astype(np.float32)
    k = rng.standard_normal((S, G, Dh)).astype(np.float32)
    v = rng.standard_normal((S, G, Dh)).astype(np.float32)
    sinks = rng.standard_normal(H).astype(np.float32)

    def sdpa(qa, ka, va, causal):
        qt = t(qa).permute(1, 0, 2)[None]                         # [1,H,T,Dh]
        kt = t(ka).permute(1, 0, 2)[None].repeat_interleave(H // G, 1)
        vt = t(va).permute(1, 0, 2)[None].repeat_interleave(H // G, 1)
        return lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    yield (f"attention decode T=1 S={S} H={H} G={G} Dh={Dh} sinks", "attention",
           dict(q=q, k=k, v=v, sinks=sinks), torch and sdpa(q, k, v, False), None)
    T = 128
    qp = rng.standard_normal((T, H, Dh)).astype(np.float32)
    kp, vp = k[:T].copy(), v[:T].copy()
    yield (f"attention prefill T=S={T} H={H} G={G} W=128", "attention", dict(q=qp, k=kp, v=vp, window=128),
           torch and sdpa(qp, kp, vp, True), None)

    cos_ang = rng.uniform(-3, 3, (T, Dh // 2))
    xr = rng.standard_normal((T, H, Dh)).astype(np.float32)
    yield (f"apply_rope x[{T},{H},{Dh}]", "apply_rope",
           dict(x=xr, cos=np.cos(cos_ang).astype(np.float32), sin=np.sin(cos_ang).astype(np.float32)), None, None)

    E, K, I = 8, 4, (512 if quick else 2880)
    gu, dn = mxfp4(rng, (E, 2 * I), D), mxfp4(rng, (E, D), I)
    ids = np.array([[1, 3, 4, 6]], np.int64)
    used = 4 * (gu.nbytes + dn.nbytes) // E
    yield (f"moe_experts decode E={E} k={K} D={D} I={I} mxfp4", "moe_experts",
           dict(x=x1, weights=np.full((1, K), 0.25, np.float32), ids=ids, w_gate_up=gu,
                b_gate_up=np.zeros((E, 2 * I), np.float32), w_down=dn, b_down=np.zeros((E, D), np.float32),
                activation="clamped_swiglu"), None, used)
    ids64 = np.stack([rng.permutation(E)[:K] for _ in range(16)]).astype(np.int64)
    yield (f"moe_experts T=16 E={E} k={K} D={D} I={I} mxfp4", "moe_experts",
           dict(x=x64[:16], weights=np.full((16, K), 0.25, np.float32), ids=ids64, w_gate_up=gu, b_gate_up=None,
                w_down=dn, b_down=None, activation="clamped_swiglu"), None, gu.nbytes + dn.nbytes)


def model_row(repeat: int, names):
    """Time one decode step (T=1 after a 16-token prompt) of a small synthetic gpt-oss-like model."""
    try:
        sys.path.insert(0, str(REPO / "tests"))
        from _builders import tiny_models as tiny
        from gptevo.config import ModelConfig
    except Exception as exc:  # the helpers moved: say so instead of failing
        return None, f"skipped: could not import the tiny-model helpers ({exc!r})"
    c = ModelConfig(family="gpt_oss", vocab_size=8192, hidden_size=512, num_layers=4, num_heads=8,
                    num_kv_heads=2, head_dim=64, intermediate_size=512, max_position_embeddings=256,
                    rope_theta=150000.0, sliding_window=128, layer_types=("sliding", "full") * 2,
                    attention_sinks=True, qkv_bias=True, o_bias=True, mlp="moe", num_experts=16,
                    experts_per_token=4, moe_intermediate_size=512, router_order="topk_softmax",
                    expert_activation="clamped_swiglu", swiglu_limit=7.0)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            roles = tiny.quantize_experts(tiny.make_roles(c, 0))
            path = tiny.write(tmp, "gptoss", tiny.hf_tensors(c, roles), dtype=BF16)
            times = {}
            for name in names:
                model = tiny.build(c, path, backend=name)
                prompt = list(range(1, 17))

                def step(model=model):
                    cache = model.new_cache(32)
                    model.forward(prompt, cache)
                    t0 = time.perf_counter()
                    model.forward([5], cache)
                    return time.perf_counter() - t0

                step()
                times[name] = min(step() for _ in range(repeat))
            return times, "D=512, 4 layers, 16 experts top-4 MXFP4, bf16 attention, V=8192"
    except Exception as exc:
        return None, f"skipped: {type(exc).__name__}: {exc}"


def fmt(seconds) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:9.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="timed calls per cell (best is shown)")
    ap.add_argument("--quick", action="store_true", help="smaller shapes")
    ap.add_argument("--no-model", action="store_true", help="skip the decode-step row")
    args = ap.parse_args(argv)

    avail = backends.available()
    names = [n for n in ("reference", "numba") if n in avail]
    for n in ("numba",):
        if n not in avail:
            print(f"note: {n} unavailable: {avail.unavailable.get(n)}")
    bw = memory_bandwidth()
    threads = ""
    if "numba" in avail:
        import numba
        threads = f", numba threads {numba.get_num_threads()} (threading layer setting: {numba.config.THREADING_LAYER})"
    print(f"memory bandwidth (np.copyto, read+write): {bw / 1e9:.1f} GB/s; cores {os.cpu_count()}{threads}")
    print("times in ms per call (best of --repeat); weight GB/s = weight bytes read / numba time")
    head = f"{'op':52s} {'reference':>10s} {'numba':>10s} {'torch':>10s} {'weights MB':>10s} {'GB/s':>7s} {'% bw':>5s}"
    print(head)
    print("-" * len(head))
    rng = np.random.default_rng(0)
    for label, op, kwargs, peer, nbytes in cases(rng, args.quick):
        row = {}
        for name in names:
            be = backends.get(name)
            row[name] = timeit(lambda: be.ops[op](**kwargs), args.repeat) if op in be.ops else None
        row["torch"] = timeit(peer, args.repeat) if peer else None
        extra = ""
        if nbytes and row.get("numba"):
            gbs = nbytes / row["numba"] / 1e9
            extra = f" {nbytes / 1e6:10.1f} {gbs:7.2f} {100 * gbs * 1e9 / bw:5.0f}"
        print(f"{label:52s} {fmt(row.get('reference')):>10s} {fmt(row.get('numba')):>10s} "
              f"{fmt(row['torch']):>10s}{extra}")
    if not args.no_model:
        times, note = model_row(max(1, args.repeat // 2), names)
        label = "decode step, synthetic gpt-oss-like model"
        if times is None:
            print(f"{label:52s} {note}")
        else:
            print(f"{label:52s} {fmt(times.get('reference')):>10s} {fmt(times.get('numba')):>10s} "
                  f"{'-':>10s}   ({note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
