"""The one validation layer, on every backend: bad arguments are refused by the op's check before the
backend's code runs, with the reference's message; a call is checked exactly once.

Runs for every known backend (an unavailable one is a skip with its reason), plus the cupy backend's
ops on a runtime that fails if it is ever reached ("cupy-unreached"): its arguments are checked
without a GPU. An outside backend gets the same guarantees by being loaded through the registry.
"""
from __future__ import annotations

import numpy as np
import pytest

from gptevo import backends
from gptevo.conformance.check_calls import CheckCalls
from gptevo.conformance.runner import iter_cases
from gptevo.errors import RequestError
from gptevo.ops import REGISTRY

AVAILABLE = backends.available()
BACKEND_OPS = sorted(name for name, spec in REGISTRY.items() if spec.backend_op)
CUPY_UNREACHED = "cupy-unreached"


def _backend(name: str):
    if name == CUPY_UNREACHED:
        from gptevo.backends.cupy._ops import CudaOps, make_ops

        def unreachable():
            raise AssertionError("the cupy implementation ran: the check should have refused the call")

        return backends.Backend(CUPY_UNREACHED, make_ops(impl=CudaOps(make_runtime=unreachable)))
    if name not in AVAILABLE:
        pytest.skip(f"backend {name!r} unavailable: {AVAILABLE.unavailable[name]}")
    return backends.get(name)


f32 = np.float32
Q, K, V = np.zeros((2, 4, 8), f32), np.zeros((3, 2, 8), f32), np.zeros((3, 2, 8), f32)
MOE = {"x": np.zeros((1, 4), f32), "weights": np.ones((1, 1), f32), "ids": np.array([[0]]),
       "w_gate_up": np.zeros((2, 6, 4), f32), "b_gate_up": None, "w_down": np.zeros((2, 4, 3), f32), "b_down": None}
BAD = [  # (op, label, kwargs): every op at least once; each must be refused by its check
    ("embedding", "id out of range", {"table": np.ones((4, 3), f32), "ids": np.array([1, 4])}),
    ("embedding", "negative id", {"table": np.ones((4, 3), f32), "ids": np.array([-1])}),
    ("embedding", "float ids", {"table": np.ones((4, 3), f32), "ids": np.array([1.0])}),
    ("embedding", "1-D table", {"table": np.ones(4, f32), "ids": np.array([1])}),
    ("learned_positions", "position past the table", {"table": np.ones((4, 3), f32), "positions": np.array([4])}),
    ("sinusoidal_positions", "dim 0", {"positions": np.arange(3), "dim": 0}),
    ("sinusoidal_positions", "dtype int8", {"positions": np.arange(3), "dim": 4, "dtype": "int8"}),
    ("alibi_slopes", "0 heads", {"num_heads": 0}),
    ("alibi_bias", "2-D slopes", {"slopes": np.ones((2, 2)), "q_positions": np.arange(2), "k_positions": np.arange(2)}),
    ("attention_mask", "window 0", {"q_positions": np.arange(2), "k_positions": np.arange(2), "window": 0}),
    ("attention_mask", "float positions", {"q_positions": np.arange(2.0), "k_positions": np.arange(2)}),
    ("rms_norm", "negative eps", {"x": np.ones((2, 4), f32), "weight": np.ones(4, f32), "eps": -1.0}),
    ("rms_norm", "weight of another width", {"x": np.ones((2, 4), f32), "weight": np.ones(5, f32), "eps": 1e-5}),
    ("rms_norm", "scalar x", {"x": np.float32(1), "weight": np.ones(1, f32), "eps": 1e-5}),
    ("rms_norm", "NaN offset", {"x": np.ones((2, 4), f32), "weight": np.ones(4, f32), "eps": 1e-5,
                                "offset": float("nan")}),
    ("layer_norm", "bias of another width", {"x": np.ones((2, 4), f32), "weight": np.ones(4, f32),
                                             "bias": np.ones(3, f32), "eps": 1e-5}),
    ("silu", "string x", {"x": np.array(["a", "b"])}),
    ("gelu", "unknown approximation", {"x": np.ones(3, f32), "approximate": "fast"}),
    ("swiglu", "shapes differ", {"gate": np.ones((2, 3), f32), "up": np.ones((2, 4), f32)}),
    ("clamped_swiglu", "odd last axis", {"h": np.ones((2, 5), f32)}),
    ("clamped_swiglu", "infinite limit", {"h": np.ones((2, 4), f32), "limit": float("inf")}),
    ("linear", "input width", {"x": np.ones((2, 5), f32), "weight": np.ones((3, 4), f32)}),
    ("linear", "1-D weight", {"x": np.ones((2, 4), f32), "weight": np.ones(4, f32)}),
    ("linear", "bias width", {"x": np.ones((2, 4), f32), "weight": np.ones((3, 4), f32), "bias": np.ones(2, f32)}),
    ("linear", "object weight", {"x": np.ones((2, 4), f32), "weight": np.full((3, 4), None)}),
    ("gelu_mlp", "w_proj width", {"x": np.ones((2, 4), f32), "w_fc": np.ones((6, 4), f32), "b_fc": None,
                                  "w_proj": np.ones((4, 5), f32), "b_proj": None, "approximate": "tanh"}),
    ("swiglu_mlp", "gate and up widths", {"x": np.ones((2, 4), f32), "w_gate": np.ones((6, 4), f32),
                                          "w_up": np.ones((5, 4), f32), "w_down": np.ones((4, 6), f32)}),
    ("mxfp4_decode", "scales shape", {"blocks": np.zeros((2, 3, 16), np.uint8), "scales": np.zeros((2, 2), np.uint8)}),
    ("mxfp4_decode", "dtype float16", {"blocks": np.zeros((1, 16), np.uint8), "scales": np.zeros(1, np.uint8),
                                       "dtype": "float16"}),
    ("softmax", "sinks do not broadcast", {"x": np.ones((3, 4), f32), "sinks": np.ones(2, f32)}),
    ("softmax", "scalar x", {"x": np.float32(1)}),
    ("rope_cos_sin", "float positions", {"positions": np.arange(3.0), "inv_freq": np.ones(2, f32)}),
    ("rope_cos_sin", "2-D inv_freq", {"positions": np.arange(3), "inv_freq": np.ones((2, 2), f32)}),
    ("apply_rope", "rotates more than head_dim", {"x": np.ones((2, 3, 4), f32), "cos": np.ones((2, 3), f32),
                                                  "sin": np.ones((2, 3), f32)}),
    ("attention", "H not a multiple of G", {"q": np.zeros((2, 3, 8), f32), "k": K, "v": V}),
    ("attention", "float positions", {"q": Q, "k": K, "v": V, "q_positions": np.array([1.0, 2.0])}),
    ("attention", "sinks per KV head", {"q": Q, "k": K, "v": V, "sinks": np.zeros(2, f32)}),
    ("attention", "window 0", {"q": Q, "k": K, "v": V, "window": 0}),
    ("attention", "more queries than keys", {"q": np.zeros((4, 4, 8), f32), "k": K, "v": V}),
    ("moe_route", "k = 0", {"logits": np.ones((2, 4), f32), "k": 0}),
    ("moe_route", "unknown order", {"logits": np.ones((2, 4), f32), "k": 1, "order": "random"}),
    ("moe_combine", "weights shape", {"expert_out": np.ones((2, 3, 4), f32), "weights": np.ones((2, 2), f32)}),
    ("moe_experts", "expert id out of range", {**MOE, "ids": np.array([[2]])}),
    ("moe_experts", "unknown activation", {**MOE, "activation": "relu"}),
    ("moe_experts", "NaN alpha", {**MOE, "alpha": float("nan")}),
    ("moe_experts", "w_down shape", {**MOE, "w_down": np.zeros((2, 4, 2), f32)}),
    ("dropout", "p = 1", {"x": np.ones(3, f32), "p": 1.0, "seed": 0}),
]


def test_every_backend_op_has_a_hostile_case():
    assert sorted({op for op, _, _ in BAD}) == BACKEND_OPS


@pytest.mark.parametrize("backend_name", backends.known() + [CUPY_UNREACHED])
@pytest.mark.parametrize("op,label,kwargs", BAD, ids=[f"{op}({label})" for op, label, _ in BAD])
def test_bad_arguments_give_the_reference_error(backend_name, op, label, kwargs):
    backend = _backend(backend_name)
    if op not in backend.ops:
        pytest.skip(f"backend {backend_name!r} lacks op {op}")
    with pytest.raises(RequestError) as want:
        REGISTRY[op].reference(**kwargs)
    with pytest.raises(RequestError) as got:
        backend.ops[op](**kwargs)
    assert str(got.value) == str(want.value)


CASES = list(iter_cases(seed=0))


@pytest.mark.parametrize("backend_name", backends.known())
def test_each_call_runs_its_own_check_once(backend_name):
    """Through a backend and through the public reference function: every registry case of every op
    runs exactly one check, the op's own (a composite's parts are not checked again)."""
    backend = _backend(backend_name)
    for spec, case in CASES:
        if spec.name not in backend.ops:
            continue
        for call in (backend.ops[spec.name], spec.reference):
            with CheckCalls() as calls:
                call(**case.kwargs)
            assert calls.counts == {spec.name: 1}, f"{spec.name}({case.label}) on {backend_name}: {calls.counts}"
