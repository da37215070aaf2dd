"""The model's cupy path keeps its data on the device: proved on the CPU with an instrumented fake device.

The cupy backend's own op code runs its kernels under the CUDA emulator (tools/cuda_emu), but its
"device arrays" are :class:`FakeDeviceArray`: a wrapper around a NumPy array that behaves like a
CuPy array (arithmetic, slicing, reshapes, ``astype``) and, like CuPy, refuses every implicit
conversion to the host (``np.asarray``, ``int()``, ``float()``, ``bool()``, ``.item()``, mixing with
a NumPy array), and counts every explicit crossing: uploads (``xp.array``/``xp.asarray`` of host data)
and downloads (``to_host``/``.get()``). A kernel handed a host array fails, as on a GPU.

Checked here, on tiny models (kept few for CI time: the emulator runs every CUDA thread as an OS thread):
- gpt-oss (MXFP4 experts, sinks, sliding window 3) and Llama (GQA, window 4): a decode step
  (``model.forward_on_backend``) makes exactly one upload (the token id) and no download, past the
  sliding window (ring buffer on the device); ``forward`` adds one download (the logits); prefill and
  decode logits match the NumPy reference model;
- Qwen3 (q/k norm, bf16, tied head) and GPT-2 (learned positions, LayerNorm, GELU MLP): full-sequence
  logits match the reference with device activations;
- all four with the prefill path forced (``gemm_min_rows = 2``: dense layers as ``xp.matmul`` on weights
  widened on the device, MoE experts grouped by expert on the host): logits match the reference;
- gpt-oss ``generate`` samples on the device: per step one upload and one download (the token), and
  the same tokens as the reference backend (greedy, and seeded temperature + top-k + top-p);
- the sampling kernel picks what ``generation.sample_token`` picks (ties, top-k, top-p, many draws);
- every registry case of the kernel ops, with its activations as device arrays, matches the reference.

Everything runs in a child process (``python this_file``), as the other emulated tests do: a kernel
reading out of bounds can kill the process. Skipped when g++ is absent.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


# ---------------------------------------------------------------------------------------------
# the fake device

COUNTS = {"uploads": 0, "downloads": 0}


class HostTransfer(TypeError):
    """An implicit device -> host conversion (CuPy raises TypeError for these too)."""


def _unwrap(a):
    return a.a if isinstance(a, FakeDeviceArray) else a


def _wrap(a):
    return FakeDeviceArray(a) if isinstance(a, np.ndarray) else a


def _no_host(values, what):
    for v in values:
        if isinstance(v, np.ndarray) and v.ndim > 0:
            raise HostTransfer(f"{what}: a NumPy array mixed with a device array (an implicit upload)")


class FakeDeviceArray(np.lib.mixins.NDArrayOperatorsMixin):
    """A device array stand-in: NumPy storage, CuPy's rules about the host."""

    __slots__ = ("a",)

    def __init__(self, a: np.ndarray):
        self.a = a

    # metadata
    shape = property(lambda self: self.a.shape)
    dtype = property(lambda self: self.a.dtype)
    ndim = property(lambda self: self.a.ndim)
    size = property(lambda self: self.a.size)
    nbytes = property(lambda self: self.a.nbytes)
    itemsize = property(lambda self: self.a.itemsize)
    flags = property(lambda self: self.a.flags)
    T = property(lambda self: FakeDeviceArray(self.a.T))

    def __len__(self):
        return len(self.a)

    def __repr__(self):
        return f"FakeDeviceArray(shape={self.a.shape}, dtype={self.a.dtype})"

    # the host boundary
    def __array__(self, *args, **kwargs):
        raise HostTransfer("np.asarray() of a device array (an implicit download)")

    def _refuse(self, *args, **kwargs):
        raise HostTransfer("a device value read on the host (an implicit download and synchronization)")

    __int__ = __float__ = __bool__ = __index__ = __complex__ = _refuse
    item = tolist = tobytes = _refuse

    def get(self):
        COUNTS["downloads"] += 1
        return self.a.copy()

    # array behaviour
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _no_host(inputs, f"ufunc {ufunc.__name__}")
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = tuple(_unwrap(o) for o in out)
        result = getattr(ufunc, method)(*(_unwrap(i) for i in inputs), **kwargs)
        if isinstance(result, tuple):
            return tuple(_wrap(r) for r in result)
        return _wrap(result) if not np.isscalar(result) else FakeDeviceArray(np.asarray(result))

    def __getitem__(self, idx):
        if isinstance(idx, tuple):
            idx = tuple(_unwrap(i) for i in idx)
            _no_host([i for i in idx if not isinstance(i, FakeDeviceArray)], "indexing")
        else:
            if isinstance(idx, np.ndarray):
                raise HostTransfer("indexing with a NumPy array (an implicit upload)")
            idx = _unwrap(idx)
        return FakeDeviceArray(np.asarray(self.a[idx]))

    def __setitem__(self, idx, value):
        _no_host([value], "assignment")
        self.a[_unwrap(idx) if not isinstance(idx, tuple) else tuple(_unwrap(i) for i in idx)] = _unwrap(value)

    def reshape(self, *shape, **kw):
        return FakeDeviceArray(self.a.reshape(*shape, **kw))

    def astype(self, dtype, copy=True):
        return FakeDeviceArray(self.a.astype(dtype, copy=copy))

    def view(self, dtype):
        return FakeDeviceArray(self.a.view(dtype))

    def copy(self):
        return FakeDeviceArray(self.a.copy())

    def ravel(self):
        return FakeDeviceArray(self.a.ravel())

    def transpose(self, *axes):
        return FakeDeviceArray(self.a.transpose(*axes))

    def sum(self, *args, **kwargs):
        return FakeDeviceArray(np.asarray(self.a.sum(*args, **kwargs)))


class FakeXp:
    """The array module of the fake device (the subset of cupy's API the backend and model use)."""

    ndarray = FakeDeviceArray

    @staticmethod
    def array(a, copy=True, dtype=None):
        if isinstance(a, FakeDeviceArray):
            return FakeDeviceArray(np.array(a.a, copy=True, dtype=dtype))
        COUNTS["uploads"] += 1
        return FakeDeviceArray(np.array(a, copy=True, dtype=dtype))

    @staticmethod
    def asarray(a, dtype=None):
        if isinstance(a, FakeDeviceArray):
            return a if dtype is None else a.astype(dtype, copy=False)
        COUNTS["uploads"] += 1
        return FakeDeviceArray(np.array(a, dtype=dtype))

    empty = staticmethod(lambda shape, dtype=np.float32: FakeDeviceArray(np.empty(shape, dtype)))
    zeros = staticmethod(lambda shape, dtype=np.float32: FakeDeviceArray(np.zeros(shape, dtype)))
    full = staticmethod(lambda shape, value, dtype=None: FakeDeviceArray(np.full(shape, value, dtype)))
    arange = staticmethod(lambda *a, dtype=None: FakeDeviceArray(np.arange(*[int(v) for v in a], dtype=dtype)))

    @staticmethod
    def ascontiguousarray(x):
        return FakeDeviceArray(np.ascontiguousarray(x.a))

    @staticmethod
    def concatenate(seq, axis=0):
        _no_host(seq, "concatenate")
        return FakeDeviceArray(np.concatenate([_unwrap(s) for s in seq], axis=axis))

    @staticmethod
    def broadcast_to(x, shape):
        return FakeDeviceArray(np.broadcast_to(x.a, shape))

    @staticmethod
    def where(c, a, b):
        _no_host([c, a, b], "where")
        return FakeDeviceArray(np.where(_unwrap(c), _unwrap(a), _unwrap(b)))

    @staticmethod
    def matmul(a, b):
        _no_host([a, b], "matmul")
        return FakeDeviceArray(np.matmul(a.a, b.a))

    sin = staticmethod(lambda x: np.sin(x))
    cos = staticmethod(lambda x: np.cos(x))


def fake_to_host(a):
    COUNTS["downloads"] += 1
    return a.a.copy()


class UnwrappingModule:
    """An emulated kernel module whose launches take fake device arrays (and refuse host arrays)."""

    def __init__(self, module):
        self.module = module

    def get_function(self, name):
        fn = self.module.get_function(name)

        def launch(grid, block, args, shared_mem=0):
            for i, a in enumerate(args):
                if isinstance(a, np.ndarray) and a.ndim > 0:
                    raise HostTransfer(f"kernel {name}: argument {i} is a host array")
            return fn(grid, block, tuple(_unwrap(a) for a in args), shared_mem=shared_mem)

        return launch


# ---------------------------------------------------------------------------------------------
# the worker (child process)

def make_fake_backend():
    sys.path.insert(0, str(REPO / "tools" / "cuda_emu"))
    from loader import EmuModule

    from gptevo.backends import Backend
    from gptevo.backends.cupy._ops import CudaOps, make_ops
    from gptevo.backends.cupy._runtime import DeviceArrays, Runtime
    from gptevo.backends.cupy._source import MODULES, kernel_source

    by_source = {kernel_source(m): m for m in MODULES}
    modules = {}

    def compile_module(code):
        name = by_source[code]
        if name not in modules:
            modules[name] = UnwrappingModule(EmuModule(code))
        return modules[name]

    runtime = Runtime("fake-device", compile_module, FakeXp(), fake_to_host, cache_limit_bytes=2**28, max_blocks=2)
    impl = CudaOps(runtime)
    backend = Backend("cupy-fake-device", make_ops(impl=impl))
    backend.arrays = DeviceArrays(lambda: runtime, lambda: impl)
    return backend, impl


def run_worker() -> int:
    import ml_dtypes  # noqa: F401

    import gptevo
    from _builders import tiny_models as tiny        # tests/ is on PYTHONPATH (set by the parent)
    from gptevo.checkpoint import Checkpoint
    from gptevo.conformance.compare import compare
    from gptevo.conformance.runner import iter_cases, tolerance_for
    from gptevo.generation import Sampling, sample_token
    from gptevo.model import Model
    from gptevo.backends.cupy._ops import KERNEL_OPS

    backend, impl = make_fake_backend()
    arrays = backend.arrays

    def emit(case_id, ok, detail="", seconds=0.0):
        print(json.dumps({"id": case_id, "ok": bool(ok), "detail": detail, "seconds": round(seconds, 3)}), flush=True)

    def case(case_id, fn):
        t0 = time.perf_counter()
        try:
            ok, detail = fn()
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            import traceback
            ok, detail = False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-2500:]}"
        emit(case_id, ok, detail, time.perf_counter() - t0)

    def counted(fn):
        before = dict(COUNTS)
        result = fn()
        return result, COUNTS["uploads"] - before["uploads"], COUNTS["downloads"] - before["downloads"]

    # -- models --------------------------------------------------------------------------------
    tmp = Path(os.environ.get("GPTEVO_TEST_TMP") or "/tmp") / f"gptevo-device-transfers-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    prompt = [3, 17, 42, 5, 9]                       # longer than every window used (3 and 4)
    for name in tiny.CASES:
        config, _, ref_model = tiny.build_case(name, tmp)
        path = ref_model.path
        dev_model = Model.from_checkpoint(config, Checkpoint(path), backend=backend, path=path)

        def full_sequence():
            ids = tiny.IDS[:5]
            err = tiny.normalized_error(dev_model.logits(ids), ref_model.logits(ids))
            return err < 1e-4, f"normalized error {err:.2e}"

        def decode_steps():
            cache, ref_cache = dev_model.new_cache(16), ref_model.new_cache(16)
            if not arrays.is_device(cache.keys[0]):
                return False, "the KV cache is not on the device"
            errs = [tiny.normalized_error(dev_model.forward(prompt, cache), ref_model.forward(prompt, ref_cache))]
            crossings = []
            for step, tok in enumerate([7, 11, 2]):
                logits, up, down = counted(lambda: dev_model.forward_on_backend([tok], cache))
                if not arrays.is_device(logits):
                    return False, f"step {step}: forward_on_backend returned {type(logits).__name__}"
                host, up2, down2 = counted(lambda: arrays.to_host(logits))
                errs.append(tiny.normalized_error(host, ref_model.forward([tok], ref_cache)))
                if step >= 1:                            # step 0 may still upload first-use constants
                    crossings.append((up, down, up2, down2))
            bad = [c for c in crossings if c != (1, 0, 0, 1)]
            if bad:
                return False, f"(uploads, downloads) per decode step, then for the logits: {crossings}"
            err = max(errs)
            return err < 1e-4, f"max normalized error {err:.2e} over prefill + 3 decode steps; crossings {crossings[0]}"

        def generate_on_device():
            results = []
            settings = [{"temperature": 0.0}, {"temperature": 1.0, "top_k": 9, "top_p": 0.8, "seed": 1}]
            for kw in settings if name == "gptoss_mxfp4" else settings[:1]:
                before = dict(COUNTS)
                got = gptevo.generate(dev_model, prompt, max_new_tokens=4, **kw)
                up, down = COUNTS["uploads"] - before["uploads"], COUNTS["downloads"] - before["downloads"]
                want = gptevo.generate(ref_model, prompt, max_new_tokens=4, **kw)
                if got != want:
                    return False, f"{kw}: device {got} vs reference {want}"
                results.append((up, down))
            # prefill + 3 decode steps: one upload (the ids) per forward, one download per sampled token
            if any(c != (4, 4) for c in results):
                return False, f"(uploads, downloads) per generate call of 4 tokens: {results}"
            return True, f"tokens equal; crossings per 4-token call {results}"

        def prefill_gemm():
            impl.rt.gemm_min_rows = 2                    # the prefill path (GEMMs, experts grouped on the host)
            try:
                return full_sequence()
            finally:
                impl.rt.gemm_min_rows = None

        if name in ("gpt2_f32", "qwen3_bf16"):         # CI time: every model path, not every check on each
            case(f"model:{name}:logits", full_sequence)
        case(f"model:{name}:prefill-gemm", prefill_gemm)
        if name in ("gptoss_mxfp4", "llama_f32"):
            case(f"model:{name}:decode", decode_steps)
        if name == "gptoss_mxfp4":
            case(f"model:{name}:generate", generate_on_device)
    shutil.rmtree(tmp, ignore_errors=True)

    # -- the sampling kernel ---------------------------------------------------------------------
    def sampling_kernel():
        rng = np.random.default_rng(0)
        mismatches, n = [], 0
        for v in (1, 7, 70):
            row = (2 * rng.standard_normal(v)).astype(np.float32)
            if v >= 7:
                row[[1, 3, 5]] = row[0]                  # ties
            dev = arrays.asarray(row)
            for temperature, top_k, top_p in ((0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 3, 1.0), (1.5, 0, 0.5),
                                              (1.0, 4, 0.9), (2.0, min(v, 2), 0.3), (1.0, v, 1.0)):
                for u in (0.0, 0.37, 0.93):
                    want = sample_token(row, Sampling(temperature, top_k, top_p), _FixedU(u))
                    got, bad = arrays.sample_token(dev, temperature, top_k, top_p, u)
                    n += 1
                    if got != want or bad != -1:
                        mismatches.append((v, temperature, top_k, top_p, u, got, want, bad))
        row = np.array([0.5, np.nan, 1.0, np.inf], np.float32)
        got, bad = arrays.sample_token(arrays.asarray(row), 1.0, 0, 1.0, 0.5)
        if bad != 1:
            mismatches.append(("non-finite", got, bad))
        return not mismatches, f"{n} draws; mismatches {mismatches[:5]}"

    case("sampling:kernel vs sample_token", sampling_kernel)

    # -- registry cases with device activations ------------------------------------------------------
    weight_names = {"weight", "table", "bias", "w_fc", "b_fc", "w_proj", "b_proj", "w_gate", "w_up", "w_down",
                    "b_gate", "b_up", "b_down", "w_gate_up", "b_gate_up", "sinks", "alibi_slopes", "inv_freq",
                    "blocks", "scales"}
    for spec, c in iter_cases(seed=0):
        if spec.name not in KERNEL_OPS or spec.name == "mxfp4_decode":
            continue

        def run_case(spec=spec, c=c):
            kwargs = {k: (arrays.asarray(v) if isinstance(v, np.ndarray) and k not in weight_names
                          and v.dtype.kind in "fiu" and v.dtype.itemsize >= 4 else v)
                      for k, v in c.kwargs.items()}
            out = spec.reference(**c.kwargs)
            got = backend.ops[spec.name](**kwargs)
            got = tuple(arrays.to_host(g) for g in got) if isinstance(got, tuple) else arrays.to_host(got)
            mismatch = compare(got, out, tolerance_for(spec, c), spec.exact)
            return mismatch is None, "" if mismatch is None else str(mismatch)

        case(f"device-inputs:{spec.name}({c.label})", run_case)
    return 0


class _FixedU:
    """A generator stand-in whose ``random()`` returns a fixed u."""

    def __init__(self, u):
        self.u = u

    def random(self):
        return self.u


# ---------------------------------------------------------------------------------------------
# the tests (parent process)

@pytest.fixture(scope="module")
def results():
    if shutil.which("g++") is None:
        pytest.skip("g++ not found: the CUDA emulator (tools/cuda_emu) needs a C++20 compiler")
    path = os.pathsep.join([str(REPO), str(REPO / "tests")] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=900, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": path})
    rows = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            rows[row["id"]] = row
    if not rows:
        pytest.fail(f"the worker reported nothing (exit code {proc.returncode}); stderr:\n{proc.stderr[-3000:]}")
    return rows, proc


def _check(results, prefix):
    rows, proc = results
    chosen = {k: v for k, v in rows.items() if k.startswith(prefix)}
    assert chosen, f"no {prefix} case reported (exit code {proc.returncode}); stderr:\n{proc.stderr[-3000:]}"
    failed = {k: v["detail"] for k, v in chosen.items() if not v["ok"]}
    assert not failed, "\n".join(f"{k}: {d}" for k, d in failed.items())


@pytest.mark.parametrize("name", ["gptoss_mxfp4", "llama_f32"])
def test_decode_step_makes_no_host_transfer(results, name):
    _check(results, f"model:{name}:decode")


@pytest.mark.parametrize("name", ["qwen3_bf16", "gpt2_f32"])
def test_device_logits_match_reference(results, name):
    _check(results, f"model:{name}:logits")


@pytest.mark.parametrize("name", ["gptoss_mxfp4"])
def test_generate_samples_on_device(results, name):
    _check(results, f"model:{name}:generate")


@pytest.mark.parametrize("name", ["gptoss_mxfp4", "llama_f32", "qwen3_bf16", "gpt2_f32"])
def test_prefill_gemm_path_matches_reference(results, name):
    _check(results, f"model:{name}:prefill-gemm")


def test_sampling_kernel_matches_sample_token(results):
    _check(results, "sampling:")


def test_ops_with_device_inputs_match_reference(results):
    _check(results, "device-inputs:")


def test_fake_device_refuses_implicit_host_conversion():
    a = FakeDeviceArray(np.arange(4.0))
    for fn in (np.asarray, float, bool, lambda x: x.item(), lambda x: x + np.ones(4), lambda x: int(x[0])):
        with pytest.raises(TypeError):
            fn(a)
    before = COUNTS["downloads"]
    assert (a.get() == np.arange(4.0)).all() and COUNTS["downloads"] == before + 1
    assert isinstance(a * np.float32(2) + a, FakeDeviceArray)


if __name__ == "__main__":
    sys.exit(run_worker())
