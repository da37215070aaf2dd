"""Whole tiny models on every backend against the reference backend, layer by layer.

The same checkpoint (llama f32, qwen3 bf16 with q/k-norm, gpt-oss with MXFP4 experts, sinks and an
alternating window, GPT-2 Conv1D) is loaded on each available backend; logits must agree with the
reference within 1e-4 relative, and on failure the message names the first traced tensor that
diverges. Unavailable backends skip with their reason.
"""
import numpy as np
import pytest

from _builders import tiny_models
from gptevo import backends
from gptevo.model import Model

AVAILABLE = backends.available()
FAST_BACKENDS = [b for b in backends.known() if b != "reference"]


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("backend_name", FAST_BACKENDS)
@pytest.mark.parametrize("name", tiny_models.CASES)
def test_model_on_backend_matches_reference(tiny_case, backend_name, name):
    if backend_name not in AVAILABLE:
        pytest.skip(f"backend {backend_name!r} unavailable: {AVAILABLE.unavailable[backend_name]}")
    config, _, ref_model = tiny_case(name)
    fast = Model(config, ref_model.weights, backend=backend_name)
    ids = tiny_models.IDS
    ref_trace, fast_trace = ref_model.trace(ids), fast.trace(ids)
    for key, ref_value in ref_trace.items():
        err = _rel(fast_trace[key], ref_value)
        assert err <= 1e-4, f"{name} on {backend_name}: first divergence at {key!r} (relative error {err:.3g})"
    # incremental decode on the fast backend equals its own full-sequence logits
    cache = fast.new_cache(len(ids))
    steps = np.concatenate([fast.forward([t], cache) for t in ids])
    assert _rel(steps, fast.logits(ids)) <= 1e-5
