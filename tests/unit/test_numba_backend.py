"""The numba backend at the registry level: listed, lazily imported, same signatures as the reference."""
import importlib.util
import inspect
import subprocess
import sys

import pytest

from gptevo import backends
from gptevo.ops import REGISTRY

HAS_NUMBA = importlib.util.find_spec("numba") is not None


def test_numba_is_a_known_backend():
    assert "numba" in backends.known()
    avail = backends.available()
    assert ("numba" in avail) != ("numba" in avail.unavailable)


def test_import_gptevo_does_not_import_numba():
    code = ("import sys, gptevo, gptevo.ops, gptevo.backends; "
            "assert 'numba' not in sys.modules, 'numba imported'; "
            "assert 'gptevo.backends.numba' not in sys.modules, 'backend imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_broken_numba_is_unavailable_with_a_reason():
    # A fresh interpreter where 'numba' is found but fails to import: a reason, never a crash.
    code = ("import sys, importlib.abc, importlib.machinery\n"
            "class Broken(importlib.abc.Loader):\n"
            "    def create_module(self, spec): return None\n"
            "    def exec_module(self, module): raise ImportError('simulated broken numba')\n"
            "class Finder(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'numba':\n"
            "            return importlib.machinery.ModuleSpec(name, Broken())\n"
            "        return None\n"
            "sys.meta_path.insert(0, Finder())\n"
            "from gptevo import backends\n"
            "avail = backends.available()\n"
            "assert 'numba' not in avail, avail\n"
            "assert 'simulated broken numba' in avail.unavailable['numba'], avail.unavailable\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed (pip install 'gptevo[numba]')")
def test_numba_backend_is_available_and_covers_the_model_ops():
    assert backends.available().unavailable.get("numba") is None
    be = backends.get("numba")
    must = {"embedding", "rms_norm", "layer_norm", "linear", "mxfp4_decode", "silu", "gelu", "swiglu",
            "clamped_swiglu", "softmax", "apply_rope", "rope_cos_sin", "attention", "moe_route",
            "moe_experts", "moe_combine"}
    assert be.missing(must) == []
    assert set(be.ops) <= {n for n, s in REGISTRY.items() if s.backend_op}


@pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed (pip install 'gptevo[numba]')")
def test_signatures_match_the_reference():
    be = backends.get("numba")
    for name, fn in be.ops.items():
        ref = inspect.signature(REGISTRY[name].reference).parameters
        ours = inspect.signature(fn).parameters
        assert list(ours) == list(ref), f"{name}: parameters {list(ours)} != reference {list(ref)}"
        for p in ref:
            assert ours[p].default == ref[p].default, \
                f"{name}({p}=...): default {ours[p].default!r} != {ref[p].default!r}"
            assert ours[p].kind == ref[p].kind, f"{name}({p}): kind differs"


@pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed (pip install 'gptevo[numba]')")
def test_bad_input_raises_request_error_not_a_crash():
    import numpy as np

    from gptevo.errors import RequestError

    be = backends.get("numba")
    with pytest.raises(RequestError, match="outside"):
        be.embedding(table=np.ones((4, 3), np.float32), ids=np.array([4]))
    with pytest.raises(RequestError, match="input features"):
        be.linear(x=np.ones((2, 5), np.float32), weight=np.ones((3, 4), np.float32))
    with pytest.raises(RequestError, match="expert ids"):
        be.moe_experts(x=np.ones((1, 4), np.float32), weights=np.ones((1, 1), np.float32),
                       ids=np.array([[3]]), w_gate_up=np.ones((2, 6, 4), np.float32), b_gate_up=None,
                       w_down=np.ones((2, 4, 3), np.float32), b_down=None)
