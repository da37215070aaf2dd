"""Where the cupy backend's kernels run: module compilation, array transfer, the weight cache.

A :class:`Runtime` is built from three pieces, so that the same op code runs on a GPU through
CuPy and, in the tests, on the CPU through the emulator in ``tools/cuda_emu``:

- ``compile_module(code)``: an object with ``get_function(name)`` whose result is called as
  ``kernel(grid, block, args, shared_mem=0)`` (``cupy.RawModule`` / ``EmuModule``);
- ``xp``: the array module for device arrays (``cupy`` / ``numpy``);
- ``to_host(device_array) -> np.ndarray``.

Device arrays are instances of ``xp.ndarray`` that are not NumPy arrays (under the plain emulator
``xp`` is NumPy, so every array is a host array). :class:`DeviceArrays` is what the backend gives
the model (``gptevo.backends.cupy.ARRAYS``): upload, download, allocation and on-device sampling,
so that activations and the KV cache live on the device from the embedding to the logits.
``uploads`` and ``downloads`` count the host <-> device copies this runtime made.

Memory behaviour. Op inputs that arrive as NumPy arrays are copied to the device per call and the
result is copied back; device inputs stay where they are. Weights are the exception: every array
an op treats as a weight (linear/expert weights and biases, norm weights, embedding tables, MXFP4
blocks and scales) is copied once and kept in :class:`WeightCache`, keyed on the identity of the
NumPy array object passed in (the cache holds a reference to it, so the identity cannot be reused
while the entry lives). Consequences: an array mutated in place after it was passed is not
re-read (the model never does this); the device holds one copy of each distinct weight array until
the cache's byte limit (``GPTEVO_CUPY_WEIGHT_CACHE_MB``, default 65536 MiB; 0 disables caching)
evicts the least recently used entries; :func:`Runtime.clear` drops everything.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Callable

import numpy as np

from gptevo.backends.cupy._source import MODULES, kernel_source
from gptevo.errors import BackendError

# Options for cupy.RawModule (CuPy itself adds -ftz=true and --device-as-default-execution-space).
NVRTC_OPTIONS = ("-std=c++17",)
DEFAULT_CACHE_MB = 65536


class WeightCache:
    """Device copies of weight arrays, keyed on (id(array), tag), least recently used first out."""

    def __init__(self, upload: Callable[[np.ndarray], Any], limit_bytes: int):
        self._upload = upload
        self.limit_bytes = int(limit_bytes)
        self._entries: OrderedDict[tuple[int, str], tuple[Any, Any, int]] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, array, tag: str, prepare: Callable[[Any], np.ndarray]):
        """The device copy of ``prepare(array)``; ``tag`` names the preparation (e.g. "float32")."""
        key = (id(array), tag)
        entry = self._entries.get(key)
        if entry is not None and entry[0] is array:
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[1]
        self.misses += 1
        if isinstance(array, np.ndarray) and array.size > 1 and not any(array.strides):
            raise BackendError(f"a placeholder weight (shape {array.shape}, every stride 0) has no device copy "
                               f"under {tag!r}; it would upload {array.nbytes} bytes of one repeated value")
        device = self._upload(prepare(array))
        size = int(getattr(device, "nbytes", 0))
        if self.limit_bytes <= 0 or size > self.limit_bytes:
            return device
        if entry is not None:                      # a stale entry under a reused id
            self._drop(key)
        self._entries[key] = (array, device, size)
        self.nbytes += size
        while self.nbytes > self.limit_bytes and self._entries:
            self._drop(next(iter(self._entries)))
        return device

    def put(self, array, tag: str, device) -> None:
        """Store ``device`` as the device copy of ``array`` under ``tag`` (made elsewhere, e.g. on the
        device itself: tools/gpu_synthetic.py), counted against the limit like any entry."""
        key = (id(array), tag)
        if key in self._entries:
            self._drop(key)
        size = int(getattr(device, "nbytes", 0))
        self._entries[key] = (array, device, size)
        self.nbytes += size

    def _drop(self, key) -> None:
        _, _, size = self._entries.pop(key)
        self.nbytes -= size

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)


class Runtime:
    """Compiled kernel modules plus array transfer for one device (or the CPU emulator)."""

    def __init__(self, name: str, compile_module: Callable[[str], Any], xp, to_host: Callable[[Any], np.ndarray],
                 cache_limit_bytes: int | None = None, max_blocks: int = 1 << 20):
        self.name = name
        self.max_blocks = int(max_blocks)     # cap on the grid of grid-stride kernels
        self.xp = xp
        self._compile_module = compile_module
        self._to_host = to_host
        self._modules: dict[str, Any] = {}
        self._functions: dict[tuple[str, str], Any] = {}
        if cache_limit_bytes is None:
            cache_limit_bytes = _cache_limit_from_env()
        self.weights = WeightCache(self.upload, cache_limit_bytes)
        self.uploads = 0
        self.downloads = 0
        self.gemm_min_rows: int | None = None     # matrix ops with this many rows or more use xp.matmul
        nd = getattr(xp, "ndarray", None)
        self._device_type = None if nd is None or nd is np.ndarray else nd

    def is_device(self, a) -> bool:
        """True for this runtime's device arrays (never for NumPy arrays)."""
        return self._device_type is not None and isinstance(a, self._device_type)

    def kernel(self, module: str, name: str):
        """The compiled entry point ``name`` of ``kernels/<module>.cu`` (compiled on first use)."""
        key = (module, name)
        fn = self._functions.get(key)
        if fn is None:
            if module not in self._modules:
                try:
                    self._modules[module] = self._compile_module(kernel_source(module))
                except BackendError:
                    raise
                except Exception as exc:
                    raise BackendError(f"{self.name}: compiling CUDA module {module!r} failed: {exc}") from exc
            fn = self._functions[key] = self._modules[module].get_function(name)
        return fn

    def launch(self, module: str, name: str, grid, block, args, shared_mem: int = 0) -> None:
        """Run one kernel; scalars in ``args`` must already be explicit NumPy scalars."""
        self.kernel(module, name)(grid, block, tuple(args), shared_mem=shared_mem)

    def upload(self, array: np.ndarray):
        """A fresh C-contiguous device copy of a host array (fresh, so 16-byte aligned also when
        the device is the host, as under the emulator: kernels use 16-byte vector loads)."""
        self.uploads += 1
        return self.xp.array(np.ascontiguousarray(array), copy=True)

    def empty(self, shape, dtype):
        return self.xp.empty(shape, dtype=dtype)

    def to_host(self, device_array) -> np.ndarray:
        if isinstance(device_array, np.ndarray):
            return device_array
        self.downloads += 1
        return np.asarray(self._to_host(device_array))

    def weight(self, array, tag: str = "raw", prepare: Callable[[Any], np.ndarray] = np.asarray):
        """The cached device copy of ``prepare(array)`` (see the module docstring)."""
        return self.weights.get(array, tag, prepare)

    def compile_all(self) -> None:
        """Compile every kernel module now (the first op call otherwise compiles its module)."""
        for module in MODULES:
            if module not in self._modules:
                self._modules[module] = self._compile_module(kernel_source(module))

    def clear(self) -> None:
        """Forget cached weights (compiled modules stay)."""
        self.weights.clear()


class DeviceArrays:
    """The array functions the cupy backend gives the model (``gptevo.backends.cupy.ARRAYS``).

    The model asks its backend for these (see ``gptevo.model.backend_arrays``): it uploads the
    token ids once per forward, makes positions on the device, allocates the KV cache here, and
    downloads only what its caller needs (the logits; in ``generate``, the sampled token id).
    ``get_runtime`` is called on first use (it imports cupy and creates the CUDA context).
    """

    def __init__(self, get_runtime: Callable[[], "Runtime"], get_ops: Callable[[], Any] | None = None):
        self._get_runtime = get_runtime
        self._get_ops = get_ops
        self._graph_inputs = None        # (ids, pos) device buffers while a decode step is captured

    @property
    def runtime(self) -> "Runtime":
        return self._get_runtime()

    @property
    def xp(self):
        return self.runtime.xp

    def is_device(self, a) -> bool:
        return self.runtime.is_device(a)

    def asarray(self, a, dtype=None):
        """A device copy of host data (device arrays are returned as they are)."""
        rt = self.runtime
        if rt.is_device(a):
            return a if dtype is None else a.astype(dtype, copy=False)
        if self._graph_inputs is not None:           # the token ids of a captured decode step
            return self._graph_inputs[0]
        return rt.upload(np.asarray(a) if dtype is None else np.asarray(a, dtype=dtype))

    def to_host(self, a) -> np.ndarray:
        return self.runtime.to_host(a)

    def empty(self, shape, dtype):
        return self.xp.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype):
        return self.xp.zeros(shape, dtype=dtype)

    def full(self, shape, value, dtype):
        return self.xp.full(shape, value, dtype=dtype)

    def arange(self, start: int, stop: int, dtype=np.int64):
        """Device ``arange(start, stop)``, made on the device (start and stop are host ints)."""
        if self._graph_inputs is not None and int(stop) - int(start) == 1:     # a captured decode step
            return self._graph_inputs[1]
        return self.xp.arange(int(start), int(stop), dtype=dtype)

    def decode_runner(self, model, cache):
        """A callable ``runner(token) -> logits [1, V]`` doing ``model.forward_on_backend([token], cache)``
        as a replayed CUDA graph (see _graph.py); None where the arrays are not CuPy's."""
        if getattr(self.xp, "__name__", "") != "cupy":
            return None
        from gptevo.backends.cupy._graph import DecodeGraph

        return DecodeGraph(self, model, cache)

    def kv_store(self, keys, values, positions, k_new, v_new, pos) -> None:
        """One position into its KV slot, the slot computed on the device (see CudaOps.kv_store)."""
        self._get_ops().kv_store(keys, values, positions, k_new, v_new, pos)

    def sample_token(self, logits_row, temperature: float, top_k: int, top_p: float, u: float) -> tuple[int, int]:
        """(token id, index of the first non-finite logit or -1) for a device row of logits [V],
        sampled on the device (gptevo.generation's rules); only these two integers cross to the host."""
        if self._get_ops is None:
            raise NotImplementedError("these arrays have no sampler")
        out = self.to_host(self._get_ops().sample_token(logits_row, temperature, top_k, top_p, u))
        return int(out[0]), int(out[1])


def _cache_limit_from_env() -> int:
    raw = os.environ.get("GPTEVO_CUPY_WEIGHT_CACHE_MB", str(DEFAULT_CACHE_MB))
    try:
        mb = float(raw)
    except ValueError:
        raise BackendError(f"GPTEVO_CUPY_WEIGHT_CACHE_MB must be a number of MiB, got {raw!r}") from None
    return int(mb * 2**20)


def cupy_runtime() -> Runtime:
    """The runtime on the current CUDA device through CuPy (imports cupy)."""
    import cupy

    def compile_module(code: str):
        return cupy.RawModule(code=code, options=NVRTC_OPTIONS)

    rt = Runtime(f"cupy (device {cupy.cuda.runtime.getDevice()})", compile_module, cupy, cupy.asnumpy)
    rt.gemm_min_rows = int(os.environ.get("GPTEVO_CUPY_GEMM_ROWS", "32"))   # prefill through cuBLAS
    return rt
