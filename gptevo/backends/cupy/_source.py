"""The CUDA C sources of the cupy backend, as the text handed to the compiler.

Each module ``kernels/<name>.cu`` starts with ``#include "common.cuh"``; :func:`kernel_source`
inlines that file, so the compiler (NVRTC through CuPy, nvcc in the compile test, g++ in the CPU
emulator) gets one self-contained text with no include path, and CuPy's kernel cache, which keys
on the text, sees every change to the shared helpers.
"""
from __future__ import annotations

from pathlib import Path

from gptevo.errors import BackendError

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
COMMON = "common.cuh"
MODULES = ("activations", "attention", "embedding", "linear", "moe", "mxfp4", "norms", "rope", "sampling",
           "softmax")


def kernel_source(module: str) -> str:
    """The text of ``kernels/<module>.cu`` with ``#include "common.cuh"`` replaced by that file."""
    if module not in MODULES:
        raise BackendError(f"unknown CUDA kernel module {module!r}; modules: {', '.join(MODULES)}")
    try:
        text = (KERNEL_DIR / f"{module}.cu").read_text()
        common = (KERNEL_DIR / COMMON).read_text().replace("#pragma once", "")
    except OSError as exc:
        raise BackendError(f"cannot read the CUDA kernel sources in {KERNEL_DIR}: {exc}") from None
    include = f'#include "{COMMON}"'
    if include not in text:
        raise BackendError(f"kernels/{module}.cu does not include {COMMON}")
    return text.replace(include, f"// ---- {COMMON} (inlined) ----\n{common}\n// ---- end of {COMMON} ----", 1)
