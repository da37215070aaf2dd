"""The cupy backend's CUDA modules compile for real GPUs (sm_80 and sm_90), with no GPU needed.

Each module is compiled exactly as handed to NVRTC by the backend (``kernel_source``: the shared
``common.cuh`` inlined, no include path) by nvcc, for both architectures in one fat binary, with
``-Werror all-warnings`` and ptxas's ``--resource-usage``: every ``extern "C" __global__`` entry
point must be compiled for both architectures without register spills. CuPy adds ``-ftz=true``
(passed here too) and ``--device-as-default-execution-space`` (NVRTC only; every function in the
kernels is annotated, so it changes nothing). Skipped with the reason when nvcc is absent.

When NVIDIA's NVRTC wheel is installed (``pip install nvidia-cuda-nvrtc``, not a CI dependency),
a third test compiles every module through NVRTC itself with CuPy's exact options.

A compiler-free test checks the kernel rules of spec/backends.md on the source text.
"""
import ctypes
import glob
import importlib.util
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gptevo.backends.cupy._source import KERNEL_DIR, MODULES, kernel_source

ARCHS = ("sm_80", "sm_90")
ENTRY = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(')


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for candidate in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        path = Path(candidate) / "bin" / "nvcc"
        if candidate and path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


NVCC = find_nvcc()


def _compile(module: str, workdir: Path) -> subprocess.CompletedProcess:
    src = workdir / f"{module}.cu"
    src.write_text(kernel_source(module))
    gencode = [a for arch in ARCHS for a in ("-gencode", f"arch=compute_{arch[3:]},code={arch}")]
    cmd = [NVCC, "-fatbin", *gencode, "-std=c++17", "-ftz=true", "--resource-usage", "-Werror", "all-warnings",
           "-o", str(workdir / f"{module}.fatbin"), str(src)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """nvcc's result for every module, compiled in parallel (2 CI cores)."""
    if NVCC is None:
        pytest.skip("nvcc not found (on PATH, $CUDA_HOME/bin or /usr/local/cuda/bin): cannot compile the CUDA kernels")
    workdir = tmp_path_factory.mktemp("cuda")
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return dict(zip(MODULES, pool.map(lambda m: _compile(m, workdir), MODULES)))


@pytest.mark.parametrize("module", MODULES)
def test_module_compiles_for_sm80_and_sm90(compiled, module):
    proc = compiled[module]
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed on kernels/{module}.cu:\n{log[-4000:]}"
    entries = ENTRY.findall(kernel_source(module))
    assert entries, f"kernels/{module}.cu has no extern \"C\" __global__ entry point"
    for arch in ARCHS:
        built = set(re.findall(rf"Compiling entry function '(\w+)' for '{arch}'", log))
        assert set(entries) <= built, f"{module}: entry points not compiled for {arch}: {sorted(set(entries) - built)}"
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    assert spills and not any(spills), f"{module}: register spills reported by ptxas:\n{log[-3000:]}"


def test_kernel_sources_follow_the_rules():
    """No toolkit headers, no inline PTX or tensor-core code, only *_sync warp intrinsics, every
    module includes common.cuh, and entry points are written out (the emulator finds them by name)."""
    files = sorted(KERNEL_DIR.glob("*.cu")) + sorted(KERNEL_DIR.glob("*.cuh"))
    assert {p.stem for p in KERNEL_DIR.glob("*.cu")} == set(MODULES), "kernels/*.cu and _source.MODULES disagree"
    problems = []
    for path in files:
        text = path.read_text()
        code = re.sub(r"//[^\n]*", "", text)                                  # ignore comments
        for pattern, why in ((r"#\s*include\s*<", "toolkit/system header"), (r"\basm\b|\b__asm__\b", "inline PTX"),
                             (r"\bwmma\b|\bmma\.sync\b|\bwgmma\b", "tensor-core code"),
                             (r"__shfl(?:_up|_down|_xor)?\s*\(|__(?:any|all|ballot)\s*\(", "non-_sync warp intrinsic")):
            if re.search(pattern, code):
                problems.append(f"{path.name}: {why}")
        includes = re.findall(r'#\s*include\s*"([^"]+)"', code)
        if path.suffix == ".cu" and includes != ["common.cuh"]:
            problems.append(f"{path.name}: includes {includes}, expected exactly common.cuh")
        if path.suffix == ".cu" and re.search(r"#define\s+\w+\([^)]*\)[^\n]*__global__", code):
            problems.append(f"{path.name}: an entry point made by a macro")
    assert not problems, "\n".join(problems)


def find_nvrtc() -> str | None:
    """libnvrtc.so from NVIDIA's pip wheel (nvidia-cuda-nvrtc, CUDA 13 or 12), or None."""
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    for root in roots:
        found = sorted(glob.glob(os.path.join(root, "cu13", "lib", "libnvrtc.so*"))
                       + glob.glob(os.path.join(root, "cuda_nvrtc", "lib", "libnvrtc.so*")))
        found = [f for f in found if "builtins" not in f]
        if found:
            return found[0]
    return None


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_modules_compile_with_nvrtc_and_cupy_options(arch):
    """What cupy.RawModule does on a GPU: NVRTC, our -std=c++17 plus CuPy's -ftz=true and
    --device-as-default-execution-space; no error and an empty log (no warning) for every module."""
    path = find_nvrtc()
    if path is None:
        pytest.skip("NVRTC not installed (pip install nvidia-cuda-nvrtc to run this check)")
    for builtins in glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins*.so*")):
        ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)          # the CUDA 13 wheel needs it loaded first
    lib = ctypes.CDLL(path)
    options = [f"--gpu-architecture={arch}", "-std=c++17", "-ftz=true", "--device-as-default-execution-space"]
    argv = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    problems = []
    for module in MODULES:
        prog = ctypes.c_void_p()
        assert lib.nvrtcCreateProgram(ctypes.byref(prog), kernel_source(module).encode(), f"{module}.cu".encode(),
                                      0, None, None) == 0
        rc = lib.nvrtcCompileProgram(prog, len(options), argv)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(max(1, size.value))
        lib.nvrtcGetProgramLog(prog, log)
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
        text = log.value.decode(errors="replace").strip()
        if rc != 0 or text:
            problems.append(f"{module}: NVRTC result {rc}\n{text[:2000]}")
    assert not problems, "\n".join(problems)
