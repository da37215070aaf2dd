#!/usr/bin/env bash
# One prepared GPU check of the cupy backend, for a session that has a device machine (H200).
#
#   run(command="bash tools/gpu_check.sh", timeout_s=590)          # from the repository root
#
# Steps (each bounded by `timeout`, a failing step does not stop the next; at most ~9.5 minutes,
# typically 2-4):
#   1. environment: GPU, driver, python3, CuPy/NVRTC versions (the device image ships cupy-cuda13x;
#      nothing can be downloaded there, so nothing is pip-installed unless wheels were carried in
#      .whl/, see /work/.library/device/README.md);
#   2. probe() and NVRTC compilation of every kernel module (timed);
#   3. python -m gptevo.conformance -b cupy  (every registry case vs the NumPy reference);
#   4. the hypothesis conformance tests for cupy (tests/conformance -k cupy, profile "ci");
#   5. a small timing table of the cupy ops (decode-sized GEMV, MXFP4, MoE, attention, norm);
#   6. tools/bench.py --quick (reference/numba table) when present.
# Everything is written under $OUT (gpu_check.log, conformance.txt, pytest.txt, bench_cupy.txt,
# bench.txt); the last lines printed are the summary.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HYPOTHESIS_PROFILE=ci
PY=${PYTHON:-python3}
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
declare -A STATUS
step() { echo; echo "=== $1 ($(date +%T))"; }
record() { STATUS[$1]=$2; echo "--- $1: $2"; }

step "1. environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
$PY - <<'EOF'
import sys
print("python", sys.version.split()[0])
try:
    import cupy
    print("cupy", cupy.__version__, "| CUDA runtime", cupy.cuda.runtime.runtimeGetVersion(),
          "| NVRTC", cupy.cuda.nvrtc.getVersion(), "| devices", cupy.cuda.runtime.getDeviceCount())
    print("device 0:", cupy.cuda.runtime.getDeviceProperties(0)["name"])
except Exception as exc:
    print("cupy unavailable:", type(exc).__name__, exc)
import numpy, ml_dtypes
print("numpy", numpy.__version__, "ml_dtypes", ml_dtypes.__version__)
EOF

step "2. probe and NVRTC compile of every module"
timeout 120 $PY - <<'EOF'
import time
from gptevo.backends import cupy as cb
reason = cb.probe()
print("probe:", reason or "usable")
if reason is None:
    rt = cb.runtime()
    from gptevo.backends.cupy._source import MODULES, kernel_source
    for m in MODULES:
        t0 = time.perf_counter()
        mod = rt._compile_module(kernel_source(m))
        getattr(mod, "compile", lambda: None)()      # CuPy compiles lazily; force NVRTC now
        rt._modules[m] = mod
        print(f"  {m:12s} compiled by NVRTC in {time.perf_counter() - t0:.2f} s")
    raise SystemExit(0)
raise SystemExit(1)
EOF
rc=$?; record compile "$([ $rc -eq 0 ] && echo ok || echo "FAILED rc=$rc")"

step "3. conformance: python -m gptevo.conformance -b cupy"
timeout 150 $PY -m gptevo.conformance -b cupy > "$OUT/conformance.txt" 2>&1
rc=$?; tail -n 40 "$OUT/conformance.txt"
record conformance "$(tail -n 1 "$OUT/conformance.txt") (rc=$rc)"

step "4. hypothesis conformance tests for cupy"
timeout 180 $PY -m pytest -q -p no:cacheprovider tests/conformance -k cupy > "$OUT/pytest.txt" 2>&1
rc=$?; tail -n 30 "$OUT/pytest.txt"
record pytest "$(tail -n 1 "$OUT/pytest.txt") (rc=$rc)"

step "5. cupy op timings"
timeout 60 $PY - > "$OUT/bench_cupy.txt" 2>&1 <<'EOF'
"""Decode-sized timings. 'op' = the public op (NumPy in/out, host<->device copies included);
'kernel' = the device work alone on device-resident inputs (CUDA events). GB/s = weight bytes / kernel time."""
import time
import ml_dtypes
import numpy as np
import cupy as cp
from gptevo.backends import cupy as cb
from gptevo.backends.cupy._ops import CudaOps
from gptevo.ops.mxfp4 import Mxfp4Weight

rt = cb.runtime()
ops = CudaOps(rt)
rng = np.random.default_rng(0)
BF16 = ml_dtypes.bfloat16

def op_ms(fn, n=20):
    fn(); cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    cp.cuda.Device().synchronize()
    return (time.perf_counter() - t0) / n * 1e3

def kernel_ms(fn, n=50):
    fn()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(n):
        fn()
    stop.record(); stop.synchronize()
    return cp.cuda.get_elapsed_time(start, stop) / n

def row(label, op=None, kern=None, nbytes=None):
    gbs = f"{nbytes / (kern * 1e-3) / 1e9:8.1f}" if (kern and nbytes) else "       -"
    print(f"{label:46s} op {op if op is None else f'{op:8.3f}'} ms   kernel {kern if kern is None else f'{kern:8.4f}'} ms   GB/s {gbs}")

def linear_kernel(x, w, t):
    dt = np.dtype(np.float32)
    packed = ops._dense_or_packed(w, dt)
    n_out, n_in = packed[2][-2], x.shape[1]
    xd = cp.asarray(x)
    src = cp.arange(t, dtype=cp.int64); eid = cp.zeros(t, dtype=cp.int64)
    return lambda: ops._grouped_linear(xd, src, eid, packed[:2], None, n_out, n_in, dt)

for t in (1, 4, 64):
    x = rng.standard_normal((t, 2880)).astype(np.float32)
    w = (rng.standard_normal((5120, 2880)) * 0.02).astype(BF16)
    row(f"linear bf16 [5120,2880] T={t}", op_ms(lambda: ops.linear(x=x, weight=w)),
        kernel_ms(linear_kernel(x, w, t)), w.nbytes)
wq = Mxfp4Weight(rng.integers(0, 256, (5760, 90, 16), dtype=np.uint8),
                 rng.integers(118, 128, (5760, 90), dtype=np.uint8), name="bench")
x = rng.standard_normal((1, 2880)).astype(np.float32)
row("linear mxfp4 [5760,2880] T=1", op_ms(lambda: ops.linear(x=x, weight=wq)),
    kernel_ms(linear_kernel(x, wq, 1)), wq.nbytes)
E, D, I, k = 32, 2880, 2880, 4
gu = Mxfp4Weight(rng.integers(0, 256, (E, 2 * I, D // 32, 16), dtype=np.uint8),
                 rng.integers(118, 128, (E, 2 * I, D // 32), dtype=np.uint8), name="gu")
dn = Mxfp4Weight(rng.integers(0, 256, (E, D, I // 32, 16), dtype=np.uint8),
                 rng.integers(118, 128, (E, D, I // 32), dtype=np.uint8), name="dn")
bgu = (0.1 * rng.standard_normal((E, 2 * I))).astype(BF16); bd = (0.1 * rng.standard_normal((E, D))).astype(BF16)
ids = rng.permutation(E)[:k][None].astype(np.int64); wts = np.full((1, k), 0.25, np.float32)
moe_bytes = k * (gu[0].nbytes + dn[0].nbytes)
t_moe = op_ms(lambda: ops.moe_experts(x=x, weights=wts, ids=ids, w_gate_up=gu, b_gate_up=bgu, w_down=dn, b_down=bd,
                                       activation="clamped_swiglu"))
row("moe_experts gpt-oss-20b layer, T=1 (op only)", t_moe, None, None)
print(f"{'':46s} -> {moe_bytes / (t_moe * 1e-3) / 1e9:.1f} GB/s of expert weights counting the whole op")
S, H, G, Dh = 4096, 64, 8, 64
q = rng.standard_normal((1, H, Dh)).astype(np.float32)
kk = rng.standard_normal((S, G, Dh)).astype(np.float32); vv = rng.standard_normal((S, G, Dh)).astype(np.float32)
sinks = rng.standard_normal(H).astype(np.float32)
row(f"attention decode S={S} H={H} G={G} (uploads K/V)", op_ms(lambda: ops.attention(q=q, k=kk, v=vv, sinks=sinks)),
    None, None)
xn = rng.standard_normal((1, 2880)).astype(np.float32); wn = np.ones(2880, np.float32)
row("rms_norm T=1 D=2880", op_ms(lambda: ops.rms_norm(x=xn, weight=wn, eps=1e-5)), None, None)
print("weight cache:", len(rt.weights), "entries,", rt.weights.nbytes / 1e6, "MB, hits", rt.weights.hits)
EOF
rc=$?; cat "$OUT/bench_cupy.txt"
record bench_cupy "rc=$rc"

step "6. tools/bench.py --quick"
if [ -f tools/bench.py ]; then
    timeout 45 $PY tools/bench.py --quick --no-model --repeat 3 > "$OUT/bench.txt" 2>&1
    rc=$?; tail -n 25 "$OUT/bench.txt"; record bench "rc=$rc"
else
    record bench "absent"
fi

step "summary"
for k in compile conformance pytest bench_cupy bench; do echo "$k: ${STATUS[$k]:-not run}"; done
