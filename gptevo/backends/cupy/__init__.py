"""The cupy backend: gptevo's ops as raw CUDA kernels (``kernels/*.cu``) launched through CuPy.

The third tier after the NumPy reference and numba. ``OPS`` maps every backend op name to an
implementation with the reference's keyword signature and output dtype (see ``_ops.py`` for which
ops run as kernels and which few small ones run on the host through the reference). NumPy inputs
give NumPy results (each call copies its activations); device inputs give device results with no
transfer. ``ARRAYS`` (:class:`~gptevo.backends.cupy._runtime.DeviceArrays`) is the backend's own
array functions: the model uses them to keep activations and the KV cache on the device and to
sample on the device. Weights are copied once, in their stored dtype, and cached on the device
(``_runtime.py`` documents the memory behaviour).

Importing this package does not import cupy: the registry first checks ``find_spec("cupy")`` and
:func:`probe`; the CUDA runtime is created, and each kernel module compiled by NVRTC, on the first
op call that needs it. Verification status: the kernels compile with nvcc for sm_80/sm_90 and run
under the CPU emulator in the tests; see spec/backends.md for what has run on a GPU.
"""
from __future__ import annotations

import importlib.util

from gptevo.backends.cupy._ops import CudaOps, make_ops
from gptevo.backends.cupy._runtime import DeviceArrays, cupy_runtime

_RUNTIME = None


def runtime():
    """The process-wide CuPy runtime (created on first use; imports cupy)."""
    global _RUNTIME
    if _RUNTIME is None:
        _RUNTIME = cupy_runtime()
    return _RUNTIME


_IMPL = CudaOps(make_runtime=runtime)
OPS = make_ops(impl=_IMPL)
ARRAYS = DeviceArrays(runtime, lambda: _IMPL)


def probe() -> str | None:
    """None when cupy imports and sees a CUDA device; else the reason in words."""
    if importlib.util.find_spec("cupy") is None:
        return ("the Python package 'cupy' is not installed (pip install 'gptevo[cupy]' for CUDA 12, "
                "'gptevo[cupy13]' for CUDA 13)")
    try:
        import cupy
    except Exception as exc:  # a broken install, missing CUDA libraries, ...
        return f"cupy is installed but failed to import ({type(exc).__name__}: {exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, no device, ...
        return f"no CUDA device: cupy could not query the CUDA runtime ({type(exc).__name__}: {exc})"
    if count < 1:
        return "no CUDA device: the CUDA runtime reports 0 devices"
    return None
