"""Run pytest with the ``cupy`` backend served by the CPU emulator instead of a GPU.

    python tools/cuda_emu/run_pytest.py tests/conformance -k cupy [-x] [--examples 150]

The cupy backend's own op code runs on an emulated runtime (``loader.EmuModule`` compiles the same
kernel sources with g++; NumPy arrays stand in for device arrays), registered as backend "cupy"
for this process only. Slow (every CUDA thread is an OS thread): meant for the hypothesis
conformance tests and spot checks, not the whole suite. ``--examples N`` runs hypothesis with N
examples per test (profile "emulated"); the default is the suite's own profile.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))


def main(argv: list[str]) -> int:
    import os

    import pytest
    from hypothesis import HealthCheck, settings

    from gptevo import backends
    from gptevo.backends.cupy._ops import make_ops
    from gptevo.backends.cupy._runtime import Runtime
    from loader import EmuModule

    if "--examples" in argv:
        i = argv.index("--examples")
        settings.register_profile("emulated", max_examples=int(argv[i + 1]), deadline=None,
                                  suppress_health_check=[HealthCheck.too_slow])
        os.environ["HYPOTHESIS_PROFILE"] = "emulated"
        argv = argv[:i] + argv[i + 2:]
    runtime = Runtime("cuda-emulator", EmuModule, np, np.asarray, max_blocks=3)
    backends._LOADED["cupy"] = backends.Backend("cupy", make_ops(runtime))
    original = backends._why_unavailable
    backends._why_unavailable = lambda name: None if name == "cupy" else original(name)
    return pytest.main(["-p", "no:cacheprovider", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
