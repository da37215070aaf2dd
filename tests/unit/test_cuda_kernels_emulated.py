"""The cupy backend's CUDA kernels, run on the CPU by the emulator in tools/cuda_emu, against the reference.

The same ``.cu`` text that CuPy hands to NVRTC is compiled by g++ with ``tools/cuda_emu/cuda_emu.h``
and driven by the backend's own op code (``gptevo/backends/cupy/_ops.py``) on an emulated runtime
(NumPy arrays stand in for device arrays). All cases run in one child process
(``_cuda_emu_worker.py``), so an out-of-bounds access cannot kill pytest; each case is then one
test here, compared by ``gptevo.conformance.compare`` at the op's registered tolerance (bit-exact
for mxfp4_decode and embedding). Skipped with the reason when g++ is absent.

What this cannot show: speed, tensor-core paths, the GPU memory model, or races between blocks;
the GPU run is tools/gpu_check.sh (see spec/backends.md for its status).

In-process tests below check the parts that need no kernels: the exact op signatures, probe(),
and the device weight cache.
"""
import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import _cuda_emu_worker as worker   # the worker script next to this file (tests/unit is on pytest's path)
from gptevo.backends import cupy as cupy_backend
from gptevo.backends.cupy._runtime import WeightCache
from gptevo.ops import REGISTRY

HERE = Path(__file__).resolve().parent

CASE_IDS = worker.all_ids()
GXX = shutil.which("g++")


@pytest.fixture(scope="module")
def emulated():
    """{case id: result} from one run of the worker, plus the process for error reports."""
    if GXX is None:
        pytest.skip("g++ not found: the CUDA emulator (tools/cuda_emu) needs a C++20 compiler")
    proc = subprocess.run([sys.executable, str(HERE / "_cuda_emu_worker.py")], capture_output=True, text=True,
                          timeout=900)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            results[row["id"]] = row
    return results, proc


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_kernel_case(emulated, case_id):
    results, proc = emulated
    if case_id not in results:
        last = list(results)[-1] if results else "(none)"
        pytest.fail(f"the emulator process exited with code {proc.returncode} before reporting this case "
                    f"(last case reported: {last}); stderr tail:\n{proc.stderr[-3000:]}")
    row = results[case_id]
    assert row["ok"], f"{case_id}: {row['detail']}"


def test_worker_reports_nothing_unexpected(emulated):
    results, _ = emulated
    extra = set(results) - set(CASE_IDS) - {"compile:all modules"}
    assert not extra, f"the worker reported cases the test does not know: {sorted(extra)}"


# ---------------------------------------------------------------------------------------------
# no kernels needed

def test_ops_have_the_reference_signatures():
    backend_ops = {name for name, spec in REGISTRY.items() if spec.backend_op}
    assert set(cupy_backend.OPS) == backend_ops
    for name, fn in cupy_backend.OPS.items():
        assert inspect.signature(fn) == inspect.signature(REGISTRY[name].reference), name


def test_probe_explains_why_unavailable():
    reason = cupy_backend.probe()
    try:
        import cupy  # noqa: F401
        has_device = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        has_device = False
    if has_device:
        assert reason is None
    else:
        assert isinstance(reason, str) and ("not installed" in reason or "no CUDA device" in reason
                                            or "failed to import" in reason), reason


def test_weight_cache_hits_by_identity_and_evicts_by_bytes():
    uploads = []

    def upload(a):
        uploads.append(a)
        return a.copy()

    cache = WeightCache(upload, limit_bytes=3 * 800)
    w1, w2 = np.ones(100), np.ones(100)                       # equal values, different objects
    d1 = cache.get(w1, "raw", np.asarray)
    assert cache.get(w1, "raw", np.asarray) is d1 and cache.hits == 1
    assert cache.get(w2, "raw", np.asarray) is not d1 and cache.misses == 2
    f32 = cache.get(w1, "float32", lambda a: a.astype(np.float32))
    assert f32.dtype == np.float32 and len(cache) == 3 and cache.nbytes == 800 + 800 + 400
    w3 = np.zeros(100)
    cache.get(w3, "raw", np.asarray)                           # over the limit: the oldest (w1 raw) goes
    assert len(cache) == 3 and cache.nbytes <= cache.limit_bytes
    n = len(uploads)
    cache.get(w1, "raw", np.asarray)
    assert len(uploads) == n + 1                               # w1 was evicted, so it is uploaded again


def test_weight_cache_limit_zero_disables_caching():
    cache = WeightCache(lambda a: a.copy(), limit_bytes=0)
    w = np.ones(10)
    assert cache.get(w, "raw", np.asarray) is not cache.get(w, "raw", np.asarray)
    assert len(cache) == 0
