#!/usr/bin/env bash
# The GPU check of the cupy backend, on one NVIDIA GPU with CuPy installed (pip install "gptevo[cupy]",
# or "gptevo[cupy13]" for CUDA 13). Step 6 holds gpt-oss-120b's 65 GB of weights in GPU memory.
#
#   bash tools/gpu_check.sh            # from anywhere; OUT=DIR keeps the outputs (default: a temp dir)
#   PYTHON=python3.11 WHEELS=DIR bash tools/gpu_check.sh
#
# PYTHON picks the interpreter (default python3). On a machine without network access, wheels placed in
# WHEELS (default: .whl/ in the repository, skipped when it holds none) are installed offline into
# $OUT/site and put on PYTHONPATH first.
#
# Steps (each bounded by `timeout`, 440 s in all; a failing step does not stop the next):
#   1. environment: GPU, driver, python3, CuPy, CUDA runtime and NVRTC versions;
#   2. probe() and NVRTC compilation of every kernel module (timed);
#   3. conformance suite: python -m gptevo.conformance -b cupy (every registry case vs the reference);
#   4. tiny peer models, cupy vs reference at model level (tools/gpu_tiny.py): logits, decode past the
#      sliding window with the host transfers of a decode step counted, generate (greedy and sampled),
#      and every kernel op with device inputs;
#   5. gpt-oss-20b and 6. gpt-oss-120b built in GPU memory with random weights (tools/gpu_synthetic.py):
#      batch-1 decode tok/s at 128 and 4096 context tokens, prefill tok/s at 512 and 2048 tokens, peak
#      GPU memory.
# Everything printed is also written under $OUT (gpu_check.log, one file per step, the JSON of steps
# 4-6); the last lines printed are one table of the results.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
declare -A STATUS
step() { echo; echo "=== $1 ($(date +%T))"; }
record() { STATUS[$1]=$2; echo "--- $1: $2"; }
T0=$(date +%s)

step "1. environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$OUT/site" \
        "$WHEELS"/*.whl && export PYTHONPATH="$PYTHONPATH:$OUT/site"
fi
timeout 30 $PY - <<'EOF' > "$OUT/env.txt" 2>&1
import sys
print("python", sys.version.split()[0])
try:
    import cupy
    print("cupy", cupy.__version__, "| CUDA runtime", cupy.cuda.runtime.runtimeGetVersion(),
          "| NVRTC", cupy.cuda.nvrtc.getVersion(), "| devices", cupy.cuda.runtime.getDeviceCount())
    print("device 0:", cupy.cuda.runtime.getDeviceProperties(0)["name"].decode())
except Exception as exc:
    print("cupy unavailable:", type(exc).__name__, exc)
import numpy, ml_dtypes
print("numpy", numpy.__version__, "ml_dtypes", ml_dtypes.__version__)
EOF
cat "$OUT/env.txt"

step "2. probe and NVRTC compile of every module"
timeout 60 $PY - <<'EOF' > "$OUT/compile.txt" 2>&1
import time
from gptevo.backends import cupy as cb
reason = cb.probe()
print("probe:", reason or "usable")
if reason is not None:
    raise SystemExit(1)
rt = cb.runtime()
from gptevo.backends.cupy._source import MODULES, kernel_source
total = 0.0
for m in MODULES:
    t0 = time.perf_counter()
    mod = rt._compile_module(kernel_source(m))
    getattr(mod, "compile", lambda: None)()      # CuPy compiles lazily; force NVRTC now
    rt._modules[m] = mod
    dt = time.perf_counter() - t0
    total += dt
    print(f"  {m:12s} compiled by NVRTC in {dt:.2f} s")
print(f"compiled {len(MODULES)} modules in {total:.1f} s")
EOF
rc=$?; cat "$OUT/compile.txt"
record compile "$([ $rc -eq 0 ] && tail -n 1 "$OUT/compile.txt" || echo "FAILED rc=$rc: $(tail -n 1 "$OUT/compile.txt")")"

step "3. conformance suite: python -m gptevo.conformance -b cupy"
timeout 60 $PY -m gptevo.conformance -b cupy > "$OUT/conformance.txt" 2>&1
rc=$?; tail -n 25 "$OUT/conformance.txt"
record conformance "$(tail -n 1 "$OUT/conformance.txt" | cut -c1-110) (rc=$rc)"

step "4. tiny peer models, cupy vs reference (tools/gpu_tiny.py)"
timeout 60 $PY tools/gpu_tiny.py --json "$OUT/tiny.json" > "$OUT/tiny.txt" 2>&1
rc=$?; cat "$OUT/tiny.txt" | cut -c1-400 | tail -n 20
record tiny "$(tail -n 1 "$OUT/tiny.txt" | cut -c1-110) (rc=$rc)"

step "5. gpt-oss-20b, random weights built on the GPU"
timeout 100 $PY tools/gpu_synthetic.py --model gpt-oss-20b --json "$OUT/bench_20b.json" > "$OUT/bench_20b.txt" 2>&1
rc=$?; tail -n 12 "$OUT/bench_20b.txt"
record bench_20b "rc=$rc"

step "6. gpt-oss-120b, random weights built on the GPU"
timeout 130 $PY tools/gpu_synthetic.py --model gpt-oss-120b --json "$OUT/bench_120b.json" > "$OUT/bench_120b.txt" 2>&1
rc=$?; tail -n 12 "$OUT/bench_120b.txt"
record bench_120b "rc=$rc"

step "results ($(( $(date +%s) - T0 )) s in all)"
COMPILE="${STATUS[compile]:-not run}" CONFORMANCE="${STATUS[conformance]:-not run}" TINY="${STATUS[tiny]:-not run}" \
B20="${STATUS[bench_20b]:-not run}" B120="${STATUS[bench_120b]:-not run}" OUTDIR="$OUT" $PY - <<'EOF' | tee "$OUT/table.txt"
import json, os
out = os.environ["OUTDIR"]
rows = [("NVRTC compile, all modules", os.environ["COMPILE"]),
        ("conformance suite (cupy vs reference)", os.environ["CONFORMANCE"]),
        ("tiny peer models + device-input ops", os.environ["TINY"])]
for size, status in (("20b", os.environ["B20"]), ("120b", os.environ["B120"])):
    path = os.path.join(out, f"bench_{size}.json")
    if not os.path.exists(path):
        rows.append((f"gpt-oss-{size}", f"no result ({status}); see bench_{size}.txt"))
        continue
    for r in json.load(open(path)):
        if r["what"] == "build":
            rows.append((f"gpt-oss-{size} build on GPU", f"{r['seconds']} s, {r['device_weight_gb']} GB weights"))
        elif r["what"] == "decode":
            rows.append((f"gpt-oss-{size} decode, ctx {r['context']}, {r.get('mode', 'eager')}",
                         f"{r['tok_s']} tok/s ({r['ms_per_token']} ms/token)"))
        elif r["what"] == "prefill":
            rows.append((f"gpt-oss-{size} prefill, {r['tokens']} tokens", f"{r['tok_s']} tok/s ({r['seconds']} s)"))
        elif r["what"] == "memory":
            rows.append((f"gpt-oss-{size} peak GPU memory", f"{r['peak_gpu_gb']} GB"))
w = max(len(a) for a, _ in rows)
print("| " + "check".ljust(w) + " | result |")
print("|" + "-" * (w + 2) + "|--------|")
for a, b in rows:
    print(f"| {a.ljust(w)} | {b} |")
EOF
