"""The one validation layer (spec/backends.md, "Argument checks"): one check per op next to its
reference, put by the registry in front of every backend's implementation.

Per-backend behaviour (the reference's messages everywhere, one check per call) is in
tests/conformance/test_ops_validation.py; here: the checks' contract, plug-ins, device arrays, and
the model's calls.
"""
from __future__ import annotations

import inspect
import types

import numpy as np
import pytest

import gptevo
from gptevo import backends
from gptevo.backends import Backend
from gptevo.conformance.check_calls import CheckCalls
from gptevo.errors import RequestError
from gptevo.ops import REGISTRY
from gptevo.ops.spec import unchecked, validated

BACKEND_OPS = sorted(name for name, spec in REGISTRY.items() if spec.backend_op)
AUSTEN = gptevo.__file__.rsplit("/", 1)[0] + "/data/austen"


def test_each_backend_op_has_one_check_with_the_ops_signature():
    for name in BACKEND_OPS:
        spec = REGISTRY[name]
        assert spec.check is not None, name
        want = inspect.signature(spec.kernel).parameters
        got = inspect.signature(spec.check).parameters
        assert [(p.name, p.default) for p in got.values()] == [(p.name, p.default) for p in want.values()], name
        assert unchecked(spec.reference) is spec.kernel and spec.reference.__gptevo_check__ is spec.check
        assert inspect.signature(spec.reference) == inspect.signature(spec.kernel)


def test_a_public_reference_function_checks_its_arguments():
    from gptevo.ops.norms import rms_norm

    with pytest.raises(RequestError, match="eps must be >= 0"):
        rms_norm(np.ones((2, 4), np.float32), np.ones(4, np.float32), -1.0)     # positional, as a user calls it
    assert rms_norm(np.ones((1, 2), np.float32), np.ones(2, np.float32), 0).dtype == np.float32


def test_wrapping_never_nests():
    """Ops given as already checked callables (public functions, another backend's ops) are unwrapped,
    so a backend built from them still checks once; Backend.impls are the bare implementations."""
    ref = backends.get("reference")
    again = Backend("again", ref.ops)
    spec = REGISTRY["rms_norm"]
    assert again.impls["rms_norm"] is spec.kernel
    assert unchecked(again.ops["rms_norm"]) is spec.kernel
    public = Backend("public", {"rms_norm": spec.reference})
    assert public.impls["rms_norm"] is spec.kernel
    assert unchecked(validated(spec.check, spec.reference)) is spec.kernel


class Spy:
    """A plug-in op that records the arguments it receives."""

    def __init__(self, result=None):
        self.calls, self.result = [], result

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.result


def test_a_plugin_backend_gets_checked_canonical_arguments(monkeypatch):
    attention, rms_norm, moe_route, extra = Spy(), Spy(), Spy(), Spy("extra")
    module = types.SimpleNamespace(OPS={"attention": attention, "rms_norm": rms_norm, "moe_route": moe_route,
                                        "my_fused_op": extra})

    class EntryPoint:
        name, value = "spy", "spy_backend:module"

        def load(self):
            return module

    monkeypatch.setattr(backends, "_entry_points", lambda: {"spy": EntryPoint()})
    monkeypatch.setattr(backends, "_LOADED", {})
    be = backends.get("spy")

    q, kv = np.zeros((2, 4, 8), np.float32), np.zeros((5, 2, 8), np.float32)
    with pytest.raises(RequestError, match="multiple of KV heads"):
        be.attention(q=np.zeros((2, 3, 8), np.float32), k=kv, v=kv)
    with pytest.raises(RequestError, match="sliding window"):
        be.attention(q=q, k=kv, v=kv, window=0)
    with pytest.raises(RequestError, match="eps"):
        be.rms_norm(x=np.ones((1, 8), np.float32), weight=np.ones(8, np.float32), eps=float("nan"))
    with pytest.raises(RequestError, match="k must be an int"):
        be.moe_route(logits=np.ones((1, 4), np.float32), k=5)
    assert attention.calls == rms_norm.calls == moe_route.calls == []          # refused before the plug-in

    be.attention(q=q, k=kv, v=kv, window=np.int64(3))
    got = attention.calls[0]
    assert got["q"] is q and got["k"] is kv                                     # arrays passed through
    np.testing.assert_array_equal(got["q_positions"], [3, 4])                   # defaults filled in
    np.testing.assert_array_equal(got["k_positions"], np.arange(5))
    assert type(got["window"]) is int and got["window"] == 3
    assert type(got["scale"]) is float and got["scale"] == pytest.approx(8 ** -0.5)
    be.rms_norm(x=[[1.0, 2.0]], weight=np.ones(2, np.float32), eps=np.float32(1e-5))
    got = rms_norm.calls[0]
    assert isinstance(got["x"], np.ndarray) and type(got["eps"]) is float and got["offset"] == 0.0
    be.moe_route(logits=np.ones((1, 4), np.float32), k=np.int64(2), renormalize=1)
    assert moe_route.calls[0]["k"] == 2 and type(moe_route.calls[0]["k"]) is int
    assert moe_route.calls[0]["order"] == "softmax_topk" and moe_route.calls[0]["renormalize"] is True
    assert be.my_fused_op(anything=1) == "extra"                                # unknown ops: not checked


class DeviceArray:
    """A device array stand-in: shape and dtype only; reading its values on the host fails."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.ndim, self.size = len(self.shape), int(np.prod(self.shape))

    def _refuse(self, *args, **kwargs):
        raise AssertionError("a device array's values were read on the host")

    __array__ = __int__ = __float__ = __bool__ = __index__ = __len__ = __iter__ = _refuse
    min = max = reshape = tolist = astype = __getitem__ = _refuse


def test_device_arrays_are_checked_on_shape_and_dtype_only():
    check = {name: REGISTRY[name].check for name in BACKEND_OPS}
    table = np.ones((4, 3), np.float32)
    ids = DeviceArray((2,), np.int64)                  # its values (maybe out of range) are never read
    assert check["embedding"](table=table, ids=ids)["ids"] is ids
    with pytest.raises(RequestError, match="ids must be integers"):
        check["embedding"](table=table, ids=DeviceArray((2,), np.float32))
    q, k, v = DeviceArray((1, 4, 8), np.float32), DeviceArray((6, 2, 8), np.float32), DeviceArray((6, 2, 8), np.float32)
    qpos, kpos = DeviceArray((1,), np.int64), DeviceArray((6,), np.int64)
    args = check["attention"](q=q, k=k, v=v, q_positions=qpos, k_positions=kpos, window=4, sinks=np.zeros(4))
    assert args["q"] is q and args["q_positions"] is qpos and args["k_positions"] is kpos
    with pytest.raises(RequestError, match=r"k_positions \(6,\), got \(1,\) and \(5,\)"):
        check["attention"](q=q, k=k, v=v, q_positions=qpos, k_positions=DeviceArray((5,), np.int64))
    moe = dict(x=DeviceArray((1, 4), np.float32), weights=DeviceArray((1, 2), np.float32),
               ids=DeviceArray((1, 2), np.int64), w_gate_up=np.zeros((3, 6, 4), np.float32), b_gate_up=None,
               w_down=np.zeros((3, 4, 3), np.float32), b_down=None)
    assert check["moe_experts"](**moe)["ids"] is moe["ids"]
    x = DeviceArray((2, 8), np.float32)
    assert check["rms_norm"](x=x, weight=np.ones(8, np.float32), eps=1e-5)["x"] is x
    with pytest.raises(RequestError, match="weight must have shape"):
        check["rms_norm"](x=x, weight=np.ones(7, np.float32), eps=1e-5)
    assert check["softmax"](x=DeviceArray((2, 3, 5), np.float32), sinks=DeviceArray((3,), np.float32))
    assert check["apply_rope"](x=DeviceArray((2, 4, 8), np.float32), cos=DeviceArray((2, 4), np.float32),
                               sin=DeviceArray((2, 4), np.float32))["interleaved"] is False


@pytest.mark.parametrize("backend_name", ["reference", "numba"])
def test_the_models_op_calls_are_each_checked_once(backend_name):
    """The bundled gpt-oss model, prefill and decode steps, on a Backend whose implementations count
    their calls: every op call was preceded by exactly one run of that op's check, and no other."""
    if backend_name not in backends.available():
        pytest.skip(f"backend {backend_name!r} unavailable")
    impl_calls: dict[str, int] = {}

    def counted(name, fn):
        def call(**kwargs):
            impl_calls[name] = impl_calls.get(name, 0) + 1
            return fn(**kwargs)
        return call

    be = backends.get(backend_name)
    counting = Backend(f"{backend_name}-counted", {name: counted(name, fn) for name, fn in be.impls.items()})
    model = gptevo.load(AUSTEN, backend=counting)
    cache = model.new_cache(16)
    with CheckCalls() as checks:
        model.forward([1, 2, 3], cache)
        for token in (4, 5):
            model.forward([token], cache)
    assert {"embedding", "rms_norm", "linear", "apply_rope", "attention", "moe_route", "moe_experts"} <= set(impl_calls)
    assert checks.counts == impl_calls
