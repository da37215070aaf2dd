"""Load-time weight preparation (gptevo.prepare): fused projections, the int8 mode, resident pages."""
from pathlib import Path

import numpy as np
import pytest

import gptevo
from gptevo import backends
from gptevo.errors import RequestError
from gptevo.ops.int8 import Int8Weight
from gptevo.prepare import fuse_projections, populate, quantize_dense

BUNDLED = Path(gptevo.__file__).parent / "data" / "austen"
IDS = [5, 17, 300, 42, 9, 1000, 77, 3]
HAS_NUMBA = "numba" in backends.available()


@pytest.fixture(scope="module")
def reference():
    return gptevo.load(BUNDLED, backend="reference")


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_reference_keeps_the_checkpoint_tensors(reference):
    assert all(layer.wqkv is None for layer in reference.weights.layers)


def test_fused_rows_are_the_separate_rows_and_views_share_memory():
    m = gptevo.load(BUNDLED, backend="reference")
    layers = m.weights.layers
    before = [np.array(layers[0].wq), np.array(layers[0].wk), np.array(layers[0].wv)]
    fuse_projections(m.weights)
    L = layers[0]
    assert np.array_equal(np.asarray(L.wqkv), np.concatenate(before))
    assert np.shares_memory(L.wq, L.wqkv) and np.shares_memory(L.wv, L.wqkv)
    fused_bytes = m.weights.nbytes()
    assert fused_bytes == gptevo.load(BUNDLED, backend="reference").weights.nbytes()   # nothing counted twice


@pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed")
def test_numba_model_is_fused_and_matches_the_reference(reference):
    m = gptevo.load(BUNDLED, backend="numba")
    assert all(layer.wqkv is not None for layer in m.weights.layers)
    assert _rel(m.logits(IDS), reference.logits(IDS)) < 1e-4
    cache = m.new_cache(16)
    step = np.concatenate([m.forward(IDS[:5], cache)] + [m.forward([t], cache) for t in IDS[5:]])
    assert _rel(step, reference.logits(IDS)) < 1e-4


@pytest.mark.parametrize("backend", ["reference"] + (["numba"] if HAS_NUMBA else []))
def test_int8_mode_quantizes_dense_matrices_only(backend, reference):
    m = gptevo.load(BUNDLED, backend=backend, weights="int8")
    L = m.weights.layers[0]
    assert isinstance(L.wo, Int8Weight) and isinstance(m.weights.lm_head, Int8Weight)
    assert not isinstance(m.weights.embed, Int8Weight) and L.experts_gate_up.dtype == "mxfp4"
    assert m.weight_mode == "int8"
    got, want = m.logits(IDS), reference.logits(IDS)
    assert 0 < _rel(got, want) < 0.05                       # close, but not the exact path
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.75


def test_int8_quantize_reports_progress():
    m = gptevo.load(BUNDLED, backend="reference")
    seen = []
    quantize_dense(m.weights, progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1][0] == seen[-1][1]


def test_unknown_weight_mode_is_a_request_error():
    with pytest.raises(RequestError, match="weights must be one of 'stored', 'int8'"):
        gptevo.load(BUNDLED, weights="int4")


def test_populate_advises_mapped_weights_and_skips_private_memory():
    mapped = gptevo.load(BUNDLED, backend="reference")
    assert populate(mapped.weights) > 0
    private = gptevo.load(BUNDLED, backend="reference", mmap=False)
    assert populate(private.weights) == 0


def test_int8_fused_weights_are_counted_once():
    m = gptevo.load(BUNDLED, backend="reference")
    quantize_dense(m.weights)
    before = m.weights.nbytes()
    fuse_projections(m.weights)
    assert isinstance(m.weights.layers[0].wqkv, Int8Weight)
    assert m.weights.nbytes() == before


@pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed")
def test_numba_int8_mode_marks_experts_for_int8_activations(reference):
    m = gptevo.load(BUNDLED, backend="numba", weights="int8")
    experts = m.weights.layers[0].experts_gate_up
    assert getattr(experts, "mode", None) == "int8"
    from gptevo.backends.numba._gemv_q8 import Q8Int8Weight

    dense = [w for layer in m.weights.layers for w in (layer.wqkv, layer.wo) if isinstance(w, Int8Weight)]
    assert dense and all(isinstance(w, Q8Int8Weight) for w in dense)
    cache = m.new_cache(16)
    got = np.concatenate([m.forward(IDS[:5], cache)] + [m.forward([t], cache) for t in IDS[5:]])
    want = reference.logits(IDS)
    assert 0 < _rel(got, want) < 0.05 and (got.argmax(-1) == want.argmax(-1)).mean() >= 0.75


@pytest.mark.parametrize("backend", ["reference"] + (["numba"] if HAS_NUMBA else []))
def test_forward_last_logits_equal_the_last_row(backend):
    m = gptevo.load(BUNDLED, backend=backend)
    full = m.forward(IDS, m.new_cache(16))
    last = m.forward(IDS, m.new_cache(16), logits="last")
    assert last.shape == (1, full.shape[1])
    assert np.abs(last[0] - full[-1]).max() <= 1e-5 * np.abs(full[-1]).max()
    with pytest.raises(RequestError, match="logits must be 'all' or 'last'"):
        m.forward(IDS, m.new_cache(16), logits="first")


def test_make_private_copies_mapped_weights_and_keeps_values():
    from gptevo.prepare import _is_mapped, _arrays, make_private

    m = gptevo.load(BUNDLED, backend="reference")
    want = m.logits(IDS)
    assert any(_is_mapped(a) for a in _arrays(m.weights))
    copied = make_private(m.weights)
    assert copied > 0 and not any(_is_mapped(a) for a in _arrays(m.weights))
    assert np.array_equal(m.logits(IDS), want)
    assert make_private(m.weights) == 0                        # nothing mapped is left


@pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed")
def test_numba_model_holds_no_mapped_weights():
    from gptevo.prepare import _is_mapped, _arrays

    m = gptevo.load(BUNDLED, backend="numba")
    assert not any(_is_mapped(a) for a in _arrays(m.weights))
