"""Run CUDA C kernel modules on the CPU: the Python half of the emulator (``cuda_emu.h`` is the C++ half).

    module = EmuModule(code)                    # like cupy.RawModule(code=code)
    kernel = module.get_function("rms_norm_f32")
    kernel((rows,), (128,), (x, w, y, np.int32(rows), np.int32(d), np.float32(1e-5), np.float32(0)))

``code`` is the text of one module (its ``extern "C" __global__`` entry points are found with a
regular expression, so each must be written out, not produced by a macro). The module is compiled
by g++ with ``-include cuda_emu.h`` and a launcher per entry point, cached by content hash under
``$GPTEVO_EMU_CACHE`` (default: a folder in the temp directory), and loaded with ctypes.

Arguments are checked the way the GPU would need them: an array for every pointer parameter, with
the pointee's dtype and C-contiguous; for scalars exactly ``np.int32`` (int), ``np.int64`` (long
long), ``np.uint32`` (unsigned int), ``np.float32`` (float), ``np.float64`` (double). A Python
``int``/``float`` is rejected, since CuPy would pass it as 64 bits and the kernel would read garbage.
Arrays are NumPy arrays, written in place. A launch error (deadlock, divergent barrier, bad warp
mask) raises EmuError with the emulator's message. An out-of-bounds access may kill the process:
run emulated kernels in a subprocess.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

HEADER = Path(__file__).resolve().parent / "cuda_emu.h"
CXX_FLAGS = ("-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w")

_ENTRY = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)', re.S)
_DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+([\w\s]+?)\s+(\w+)\s*\[\s*\]\s*;")

# pointee / scalar C type -> NumPy dtype
_C_TYPES = {
    "float": np.float32, "double": np.float64, "int": np.int32, "unsigned int": np.uint32,
    "unsigned": np.uint32, "long long": np.int64, "unsigned long long": np.uint64,
    "unsigned short": np.uint16, "short": np.int16, "unsigned char": np.uint8, "char": np.int8,
}
_CTYPES = {np.float32: ctypes.c_float, np.float64: ctypes.c_double, np.int32: ctypes.c_int32,
           np.uint32: ctypes.c_uint32, np.int64: ctypes.c_int64, np.uint64: ctypes.c_uint64,
           np.uint16: ctypes.c_uint16, np.int16: ctypes.c_int16, np.uint8: ctypes.c_uint8, np.int8: ctypes.c_int8}


class EmuError(RuntimeError):
    """A kernel failed under the emulator (compile error, bad arguments, or a launch error)."""


def gxx() -> str | None:
    """The g++ executable, or None."""
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")


def _parse_param(text: str) -> tuple[str, bool, str]:
    """'const float* __restrict__ x' -> ('const float*', True, 'float'): C type, is pointer, base type."""
    text = " ".join(text.replace("__restrict__", " ").replace("*", " * ").split())
    words = text.split(" ")
    name = words[-1]
    ctype = " ".join(words[:-1]).replace(" *", "*")
    is_ptr = "*" in ctype
    base = " ".join(w for w in ctype.replace("*", " ").split() if w not in ("const", "volatile"))
    if base not in _C_TYPES:
        raise EmuError(f"parameter {name!r}: unsupported C type {ctype!r}")
    return ctype, is_ptr, base


class EmuFunction:
    """One kernel: call as ``kernel(grid, block, args, shared_mem=0)``, like a CuPy RawKernel."""

    def __init__(self, lib, name: str, params: list[tuple[str, bool, str]]):
        self.name = name
        self.params = params
        self._fn = getattr(lib, f"gptevo_emu_launch_{name}")
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [ctypes.c_uint] * 6 + [ctypes.c_ulonglong, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]

    def __call__(self, grid, block, args, shared_mem=0):
        grid, block = _dim3(grid, "grid"), _dim3(block, "block")
        if len(args) != len(self.params):
            raise EmuError(f"{self.name}: {len(args)} arguments for {len(self.params)} parameters")
        keep, slots = [], []
        for i, (arg, (ctype, is_ptr, base)) in enumerate(zip(args, self.params)):
            want = np.dtype(_C_TYPES[base])
            if is_ptr:
                if not isinstance(arg, np.ndarray):
                    raise EmuError(f"{self.name} argument {i} ({ctype}): expected an array, got {type(arg).__name__}")
                if arg.dtype != want or not arg.flags.c_contiguous:
                    raise EmuError(f"{self.name} argument {i} ({ctype}): expected a C-contiguous {want} array, "
                                   f"got {arg.dtype} (contiguous={arg.flags.c_contiguous})")
                obj = ctypes.c_void_p(arg.ctypes.data if arg.size else 0)
            else:
                if type(arg) is not want.type:
                    raise EmuError(f"{self.name} argument {i} ({ctype}): expected np.{want.name}, got "
                                   f"{type(arg).__name__} (pass scalars as explicit NumPy types)")
                obj = _CTYPES[want.type](arg)
            keep.append(obj)
            slots.append(ctypes.addressof(obj))
        argv = (ctypes.c_void_p * max(1, len(slots)))(*slots)
        err = ctypes.create_string_buffer(512)
        rc = self._fn(*grid, *block, int(shared_mem), ctypes.cast(argv, ctypes.c_void_p), err, len(err))
        if rc != 0:
            raise EmuError(f"{self.name}: {err.value.decode(errors='replace')}")


def _dim3(value, what: str) -> tuple[int, int, int]:
    dims = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    if not 1 <= len(dims) <= 3 or any(int(d) < 1 for d in dims):
        raise EmuError(f"{what} must be 1 to 3 positive sizes, got {value!r}")
    return tuple(int(d) for d in dims) + (1,) * (3 - len(dims))


def _launchers(entries) -> str:
    out = ["\n// ---- generated by tools/cuda_emu/loader.py ----"]
    for name, params in entries:
        call = ", ".join(f"*({ctype}*)args[{i}]" for i, (ctype, _, _) in enumerate(params))
        out.append(
            f"static void gptevo_emu_body_{name}(void** args) {{ {name}({call}); }}\n"
            f'extern "C" int gptevo_emu_launch_{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, '
            f"unsigned by, unsigned bz, unsigned long long shmem, void** args, char* err, int errlen) {{\n"
            f"    return emu::launch(dim3(gx, gy, gz), dim3(bx, by, bz), shmem, err, errlen, "
            f"gptevo_emu_body_{name}, args);\n}}")
    return "\n".join(out) + "\n"


class EmuModule:
    """A kernel module compiled for the CPU: ``get_function(name)`` as ``cupy.RawModule``."""

    def __init__(self, code: str, options=(), cache_dir: str | None = None):
        compiler = gxx()
        if compiler is None:
            raise EmuError("g++ not found: the CUDA emulator needs a C++20 compiler")
        entries = []
        for m in _ENTRY.finditer(code):
            params = [p for p in (s.strip() for s in m.group(2).split(",")) if p]
            entries.append((m.group(1), [_parse_param(p) for p in params]))
        if not entries:
            raise EmuError('no extern "C" __global__ entry point found in the module')
        source = _DYNAMIC_SHARED.sub(
            lambda m: f"{m.group(1)}* {m.group(2)} = ({m.group(1)}*)emu::dynamic_shared();", code)
        source += _launchers(entries)
        defines = [o for o in options if o.startswith("-D")]
        key = hashlib.sha256("\0".join([source, HEADER.read_text(), *CXX_FLAGS, *defines]).encode()).hexdigest()[:20]
        cache = Path(cache_dir or os.environ.get("GPTEVO_EMU_CACHE")
                     or Path(tempfile.gettempdir()) / f"gptevo-cuda-emu-{os.getuid()}")
        cache.mkdir(parents=True, exist_ok=True)
        lib_path = cache / f"{key}.so"
        if not lib_path.exists():
            src_path = cache / f"{key}.cpp"
            src_path.write_text(source)
            tmp = cache / f"{key}.{os.getpid()}.so"
            cmd = [compiler, *CXX_FLAGS, *defines, "-include", str(HEADER), "-x", "c++", str(src_path), "-o", str(tmp)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise EmuError(f"g++ failed on the module ({src_path}):\n{proc.stderr[-4000:]}")
            os.replace(tmp, lib_path)
        self._lib = ctypes.CDLL(str(lib_path))
        self._entries = dict(entries)

    def get_function(self, name: str) -> EmuFunction:
        if name not in self._entries:
            raise EmuError(f"the module has no kernel {name!r}; it has {', '.join(sorted(self._entries))}")
        return EmuFunction(self._lib, name, self._entries[name])
