"""Cases for tests/unit/test_cuda_kernels_emulated.py, run in a child process (``python this_file``).

The child compiles every module of ``gptevo/backends/cupy/kernels`` with the CPU emulator
(``tools/cuda_emu``), builds the cupy backend's ops on an emulated runtime (the same Python op code
as on a GPU, with NumPy arrays standing in for device arrays) and prints one JSON line per case:
``{"id": ..., "ok": bool, "detail": str, "seconds": float}``. A kernel that reads out of bounds
can kill the child; the parent then reports the case that was running.

Three groups of cases:
- ``conformance``: every registry case of every op the backend runs as a kernel, compared with the
  reference by ``gptevo.conformance.compare`` at the op's registered tolerance (bit-exact where the
  registry says so: mxfp4_decode, embedding);
- ``extra``: shapes that reach kernel paths the registry cases do not (loops past one block or
  one warp, partial blocks, many chunks, empty KV slots, all 65536 f16/bf16 bit patterns, NaN
  and subnormal MXFP4 scales);
- ``emulator``: the emulator's own checks must fire (divergent barrier, bad warp mask, a shuffle
  naming a returned lane, deadlock, Python scalars) and its shuffles/atomics/shared memory must
  compute what the hardware computes.
"""
from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ml_dtypes
import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools" / "cuda_emu"))

from gptevo.backends import Backend  # noqa: E402
from gptevo.backends.cupy._ops import KERNEL_OPS, make_ops  # noqa: E402
from gptevo.backends.cupy._runtime import Runtime  # noqa: E402
from gptevo.backends.cupy._source import MODULES, kernel_source  # noqa: E402
from gptevo.conformance.compare import compare  # noqa: E402
from gptevo.conformance.runner import iter_cases, tolerance_for  # noqa: E402
from gptevo.ops import REGISTRY, Case  # noqa: E402
from gptevo.ops.mxfp4 import Mxfp4Weight, mxfp4_encode  # noqa: E402

BF16 = ml_dtypes.bfloat16


# ---------------------------------------------------------------------------------------------
# case lists (ids are needed by the parent at collection time, so building them must be cheap)

def conformance_cases() -> list[tuple[str, str, Case]]:
    return [(f"conformance:{spec.name}({case.label})", spec.name, case)
            for spec, case in iter_cases(seed=0) if spec.name in KERNEL_OPS]


def extra_cases() -> list[tuple[str, str, Case]]:
    rng = np.random.default_rng(1234)
    f32 = np.float32
    out = []

    def add(label, op, **kwargs):
        out.append((f"extra:{op}({label})", op, Case(label, kwargs)))

    every_f16 = np.arange(65536, dtype=np.uint16).view(np.float16).reshape(2048, 32)
    every_bf16 = np.arange(65536, dtype=np.uint16).view(BF16).reshape(2048, 32)
    add("all 65536 f16 patterns", "embedding", table=every_f16, ids=np.arange(2048))
    add("all 65536 bf16 patterns", "embedding", table=every_bf16, ids=np.arange(2047, -1, -1))
    sub = (rng.standard_normal((6, 5)) * 1e-39).astype(f32)                    # f32 subnormals
    add("f32 subnormal table", "embedding", table=sub, ids=np.array([0, 5, 3, 3]))
    tied = (rng.standard_normal((16, 8))).astype(f32)                         # tied embedding / lm_head
    add("f32 table, later tied", "embedding", table=tied, ids=np.array([1, 15]))
    add("weight = the f32 embedding table above (tied)", "linear", x=rng.standard_normal((2, 8)).astype(f32),
        weight=tied)
    add("T=9,out=7,in=70,bf16w,bias", "linear", x=rng.standard_normal((9, 70)).astype(f32),
        weight=(rng.standard_normal((7, 70)) / 8).astype(BF16), bias=rng.standard_normal(7).astype(f32))
    f16w = (rng.standard_normal((6, 64)) / 8).astype(np.float16)
    f16w[0, :5] = [6e-8, -3e-6, 65504, -np.inf, 0.0]                        # subnormals, max, inf
    add("T=5,out=6,in=64,f16w with subnormals/inf (vector path)", "linear",
        x=rng.standard_normal((5, 64)).astype(f32), weight=f16w)
    add("T=3,out=5,in=96,f64x,bf16w (vector path)", "linear", x=rng.standard_normal((3, 96)),
        weight=(rng.standard_normal((5, 96)) / 8).astype(BF16), bias=rng.standard_normal(5))
    add("T=1,out=3,in=1,f64w,f32x", "linear", x=rng.standard_normal((1, 1)).astype(f32),
        weight=rng.standard_normal((3, 1)))
    blocks = rng.integers(0, 256, (5, 3, 16), dtype=np.uint8)
    scales = np.array([[127, 0, 3], [255, 127, 126], [130, 1, 120], [254, 100, 127], [127, 127, 2]], np.uint8)
    add("T=6,mxfp4,NaN/subnormal/large scales", "linear", x=rng.standard_normal((6, 96)).astype(f32),
        weight=Mxfp4Weight(blocks, scales, name="extra"))
    add("T=2,mxfp4,f64x,bias", "linear", x=rng.standard_normal((2, 64)),
        weight=Mxfp4Weight(*mxfp4_encode(rng.standard_normal((9, 64))), name="extra"),
        bias=rng.standard_normal(9).astype(BF16))
    add("D=300", "rms_norm", x=rng.standard_normal((3, 300)).astype(f32), weight=rng.standard_normal(300).astype(f32),
        eps=1e-6)
    add("D=2100,f64", "layer_norm", x=rng.standard_normal((2, 2100)) + 3.0, weight=rng.standard_normal(2100),
        bias=rng.standard_normal(2100).astype(BF16), eps=1e-5)
    rows = (4 * rng.standard_normal((3, 200))).astype(f32)
    rows[1] = -np.inf
    add("S=200,masked row", "softmax", x=rows)
    add("n=5000", "gelu", x=(5 * rng.standard_normal(5000)).astype(f32), approximate="tanh")
    add("n=3000,f64", "silu", x=5 * rng.standard_normal(3000))
    add("T=2,H=3,Dh=128,R=64,half", "apply_rope", x=rng.standard_normal((2, 3, 128)).astype(f32),
        cos=rng.uniform(-1, 1, (2, 32)).astype(f32), sin=rng.uniform(-1, 1, (2, 32)).astype(f32))
    t, s, h, g = 2, 70, 4, 2
    add("T=2,S=70,Dh=70,Dv=40,W=50,sinks", "attention", q=rng.standard_normal((t, h, 70)).astype(f32),
        k=rng.standard_normal((s, g, 70)).astype(f32), v=rng.standard_normal((s, g, 40)).astype(f32),
        window=50, sinks=rng.standard_normal(h).astype(f32))
    add("T=2,S=300,W=200 (several visible tiles per warp, fully masked tiles)", "attention",
        q=rng.standard_normal((2, 2, 32)).astype(f32), k=rng.standard_normal((300, 1, 32)).astype(f32),
        v=rng.standard_normal((300, 1, 16)).astype(f32), window=200, sinks=rng.standard_normal(2).astype(f32))
    kpos = np.array([8, 9, 10, -1, -1, 5, 6, 7], np.int64)                     # ring buffer, two empty slots
    add("ring buffer,empty slots,bf16 kv", "attention", q=rng.standard_normal((1, 4, 8)).astype(f32),
        k=rng.standard_normal((8, 1, 8)).astype(BF16), v=rng.standard_normal((8, 1, 8)).astype(np.float16),
        q_positions=np.array([10]), k_positions=kpos, window=4, scale=0.3)
    add("query sees no key", "attention", q=rng.standard_normal((2, 2, 4)).astype(f32),
        k=rng.standard_normal((3, 2, 4)).astype(f32), v=rng.standard_normal((3, 2, 4)).astype(f32),
        q_positions=np.array([0, 5]), k_positions=np.array([-1, 3, 4]))
    t, e, k, d, i = 9, 3, 2, 40, 12
    ids = np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int64)
    add("T=9,E=3,k=2,mxfp4 gate_up,f32 down,swiglu", "moe_experts", x=rng.standard_normal((t, 64)).astype(f32),
        weights=rng.dirichlet(np.ones(k), size=t).astype(f32), ids=ids,
        w_gate_up=Mxfp4Weight(*mxfp4_encode(0.3 * rng.standard_normal((e, 2 * i, 64))), name="gu"),
        b_gate_up=None, w_down=(0.3 * rng.standard_normal((e, 64, i))).astype(f32),
        b_down=rng.standard_normal((e, 64)).astype(f32))
    add("T=2,E=5,k=1,bf16 weights", "moe_experts", x=rng.standard_normal((2, d)).astype(f32),
        weights=np.ones((2, 1), BF16), ids=np.array([[4], [0]]),
        w_gate_up=(0.3 * rng.standard_normal((5, 2 * i, d))).astype(BF16), b_gate_up=None,
        w_down=(0.3 * rng.standard_normal((5, d, i))).astype(BF16), b_down=None,
        activation="clamped_swiglu", alpha=1.5, limit=3.0)
    return out


# Small kernels that exercise the emulator itself: (id, source, kernel, runner) in run_emulator_cases.
SELF_TEST_SOURCE = r'''
extern "C" __global__ void shuffles(const int* in, int* out) {
    int lane = threadIdx.x;
    int v = in[lane];
    out[lane] = __shfl_xor_sync(0xffffffffu, v, 5);
    out[32 + lane] = __shfl_down_sync(0xffffffffu, v, 3);
    out[64 + lane] = __shfl_up_sync(0xffffffffu, v, 2);
    out[96 + lane] = __shfl_sync(0xffffffffu, v, 7, 8);
}
extern "C" __global__ void divergent(int* out) {
    if (threadIdx.x < 16) { __syncthreads(); }
    else { __syncthreads(); }
    out[threadIdx.x] = 1;
}
extern "C" __global__ void bad_mask(int* out) {
    out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, (int)threadIdx.x, 1);
}
extern "C" __global__ void returned_lane(int* out) {
    if (threadIdx.x == 3) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (int)threadIdx.x, 1);
}
extern "C" __global__ void deadlock(int* out) {
    if (threadIdx.x == 0) { out[0] = __shfl_xor_sync(0x3u, 1, 1); }
    else { __syncthreads(); }
}
extern "C" __global__ void shared_and_atomics(const float* in, float* total, int* count, int n) {
    extern __shared__ float buf[];
    __shared__ float fixed[64];
    buf[threadIdx.x] = in[blockIdx.x * blockDim.x + threadIdx.x];
    fixed[threadIdx.x] = 2.0f;
    __syncthreads();
    float s = buf[(threadIdx.x + 1) % blockDim.x] * fixed[threadIdx.x];
    atomicAdd(total, s);
    atomicAdd(count, 1);
}
'''


def run_emulator_cases(emit) -> None:
    from loader import EmuError, EmuModule

    mod = EmuModule(SELF_TEST_SOURCE)

    def case(name, fn):
        t0 = time.perf_counter()
        try:
            ok, detail = fn()
        except Exception as exc:  # a failing check, reported with its reason
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        emit(f"emulator:{name}", ok, detail, time.perf_counter() - t0)

    def expect_error(kernel, fragment, grid=1, block=32, args=None):
        def run():
            out = np.zeros(64, np.int32)
            try:
                mod.get_function(kernel)((grid,), (block,), args if args is not None else (out,))
            except EmuError as exc:
                return fragment in str(exc), str(exc)
            return False, "no error raised"
        return run

    def shuffles():
        x = (np.arange(32, dtype=np.int32) * 7 + 3)
        out = np.zeros(128, np.int32)
        mod.get_function("shuffles")((1,), (32,), (x, out))
        lane = np.arange(32)
        want = np.concatenate([x[lane ^ 5], np.where(lane + 3 < 32, x[np.minimum(lane + 3, 31)], x),
                               np.where(lane - 2 >= 0, x[np.maximum(lane - 2, 0)], x),
                               x[(lane & ~7) + 7]])
        bad = np.flatnonzero(out != want)
        return bad.size == 0, f"wrong lanes {bad.tolist()[:8]}"

    def shared_atomics():
        x = np.random.default_rng(0).standard_normal(3 * 64).astype(np.float32)
        total, count = np.zeros(1, np.float32), np.zeros(1, np.int32)
        mod.get_function("shared_and_atomics")((3,), (64,), (x, total, count, np.int32(3 * 64)), shared_mem=64 * 4)
        want = 2 * x.astype(np.float64).sum()
        return (count[0] == 192 and abs(total[0] - want) < 1e-3), f"total {total[0]} (want {want}), count {count[0]}"

    def python_scalar():
        try:
            mod.get_function("shared_and_atomics")((1,), (32,), (np.zeros(32, np.float32), np.zeros(1, np.float32),
                                                                np.zeros(1, np.int32), 32))
        except EmuError as exc:
            return "np.int32" in str(exc), str(exc)
        return False, "a Python int was accepted for an int parameter"

    case("shuffle formulas", shuffles)
    case("dynamic+static shared, atomics", shared_atomics)
    case("rejects Python scalars", python_scalar)
    case("divergent barrier detected", expect_error("divergent", "divergent __syncthreads"))
    case("mask without the calling lane detected", expect_error("bad_mask", "does not name it"))
    case("shuffle with a returned lane detected", expect_error("returned_lane", "returned"))
    os.environ["GPTEVO_EMU_TIMEOUT"] = "0.3"
    case("deadlock detected", expect_error("deadlock", "deadlock"))
    os.environ.pop("GPTEVO_EMU_TIMEOUT")


# ---------------------------------------------------------------------------------------------

def all_ids() -> list[str]:
    names = ["shuffle formulas", "dynamic+static shared, atomics", "rejects Python scalars",
             "divergent barrier detected", "mask without the calling lane detected",
             "shuffle with a returned lane detected", "deadlock detected"]
    return ([i for i, _, _ in conformance_cases()] + [i for i, _, _ in extra_cases()]
            + [f"emulator:{n}" for n in names])


def main() -> int:
    from loader import EmuModule

    def emit(case_id, ok, detail, seconds):
        print(json.dumps({"id": case_id, "ok": bool(ok), "detail": detail, "seconds": round(seconds, 3)}), flush=True)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:   # g++ runs in parallel
        modules = dict(zip(MODULES, pool.map(lambda m: EmuModule(kernel_source(m)), MODULES)))
    emit("compile:all modules", True, f"{len(modules)} modules", time.perf_counter() - t0)
    by_source = {kernel_source(m): mod for m, mod in modules.items()}
    # max_blocks=3: every grid-stride loop (rows, elements, chunks of pairs) runs several rounds
    runtime = Runtime("cuda-emulator", lambda code: by_source[code], np, np.asarray, cache_limit_bytes=2**26,
                      max_blocks=3)
    backend = Backend("cupy-emulated", make_ops(runtime))

    for case_id, op, case in conformance_cases() + extra_cases():
        spec = REGISTRY[op]
        t1 = time.perf_counter()
        try:
            ref = spec.reference(**case.kwargs)
            out = backend.ops[op](**case.kwargs)
            mismatch = compare(out, ref, tolerance_for(spec, case), spec.exact)
            emit(case_id, mismatch is None, "" if mismatch is None else str(mismatch), time.perf_counter() - t1)
        except Exception as exc:
            emit(case_id, False, f"{type(exc).__name__}: {exc}", time.perf_counter() - t1)
    run_emulator_cases(emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
