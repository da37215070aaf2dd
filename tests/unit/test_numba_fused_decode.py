"""The numba backend's fused one-token decode step (gptevo/backends/numba/_fused_decode.py) and the
spin barrier it relies on (_atomics.py).

The fused step must give what the ops give, token after token: the same logits within float32
summation-order differences, the same KV cache contents; it must agree with the reference backend
within the conformance tolerance; and when its threads cannot all run at once it must do nothing and
let the ops run (the model's logits stay right).
"""
import copy
import dataclasses

import ml_dtypes
import numpy as np
import pytest

from _builders import tiny_models
from gptevo import backends
from gptevo.model import Model
from gptevo.weights import LayerWeights, ModelWeights

numba = pytest.importorskip("numba")
if "numba" not in backends.available():
    pytest.skip("numba backend unavailable", allow_module_level=True)

from gptevo.backends.numba import _atomics, _fused_decode  # noqa: E402
from gptevo.backends.numba._simd import has_avx512  # noqa: E402
from gptevo.prepare import fuse_projections  # noqa: E402

pytestmark = pytest.mark.skipif(not has_avx512(), reason="the fused step needs AVX-512 (plan() returns None)")

PROMPT = [3, 17, 42, 5, 9]
STEPS = [11, 60, 2, 33, 8, 12, 50]


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _gpt2_weights(config, dtype, seed, bias=True):
    """ModelWeights for a GPT-2-style ``config`` (any head counts) with q|k|v fused, as the numba
    backend's load-time hook leaves them; ``dtype`` float32 or bfloat16; ``bias=False`` drops every
    projection bias."""
    roles = tiny_models.store_dtype(tiny_models.make_roles(config, seed), dtype)

    def cast(a):
        return None if a is None else np.ascontiguousarray(np.asarray(a).astype(dtype))

    layers = []
    for L in roles["layers"]:
        fields = {k: cast(v) for k, v in L.items()}
        if not bias:
            for k in ("bq", "bk", "bv", "bo", "b_fc", "b_proj"):
                fields.pop(k, None)
        layers.append(LayerWeights(**fields))
    embed = cast(roles["embed"])
    w = ModelWeights(embed=embed, final_norm=cast(roles["final_norm"]), lm_head=embed, layers=layers,
                     pos_embed=cast(roles["pos_embed"]), final_norm_bias=cast(roles["final_norm_bias"]),
                     tied=True)
    return fuse_projections(w)


GQA = dataclasses.replace(tiny_models.GPT2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                          intermediate_size=96, num_layers=3, attn_scale_inverse_layer=True)
CASES = {
    "gpt2_f32": (tiny_models.GPT2, np.float32, True),
    "gpt2_bf16": (tiny_models.GPT2, ml_dtypes.bfloat16, True),
    "gqa_no_bias_f32": (dataclasses.replace(GQA, qkv_bias=False, o_bias=False, mlp_bias=False), np.float32, False),
    "gqa_bf16": (GQA, ml_dtypes.bfloat16, True),
}


def _decode(model, steps=STEPS, max_tokens=16):
    cache = model.new_cache(max_tokens)
    model.forward(PROMPT, cache)
    return np.concatenate([model.forward([t], cache) for t in steps]), cache


@pytest.fixture
def ops_only(monkeypatch):
    """A function making a twin model that never takes the fused step."""
    def make(config, weights, backend="numba"):
        m = Model(config, weights, backend=backend)
        m._fused_step = False
        return m
    return make


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_step_equals_the_ops(case, ops_only):
    config, dtype, bias = CASES[case]
    weights = _gpt2_weights(config, dtype, seed=7, bias=bias)
    fused = Model(config, weights, backend="numba")
    got, cache = _decode(fused)
    assert isinstance(fused._fused_step, _fused_decode.FusedDecode) and not fused._fused_step.disabled
    want, want_cache = _decode(ops_only(config, weights))
    assert _rel(got, want) <= 1e-5, case
    assert cache.length == want_cache.length == len(PROMPT) + len(STEPS)
    for i in range(config.num_layers):
        n = cache.length
        np.testing.assert_array_equal(cache.positions[i], want_cache.positions[i])
        assert _rel(cache.keys[i][:n], want_cache.keys[i][:n]) <= 1e-5
        assert _rel(cache.values[i][:n], want_cache.values[i][:n]) <= 1e-5


@pytest.mark.parametrize("case", ["gpt2_f32", "gqa_bf16"])
def test_fused_step_matches_the_reference_backend(case, ops_only):
    config, dtype, bias = CASES[case]
    weights = _gpt2_weights(config, dtype, seed=11, bias=bias)
    got, _ = _decode(Model(config, weights, backend="numba"))
    want, _ = _decode(ops_only(config, weights, backend="reference"))
    assert _rel(got, want) <= 1e-4


def test_fused_step_on_one_thread(ops_only):
    config, dtype, bias = CASES["gpt2_f32"]
    weights = _gpt2_weights(config, dtype, seed=3)
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        got, _ = _decode(Model(config, weights, backend="numba"))
    finally:
        numba.set_num_threads(before)
    want, _ = _decode(ops_only(config, weights))
    assert _rel(got, want) <= 1e-5


def test_loaded_gpt2_checkpoint_takes_the_fused_step(tiny_case):
    config, _, ref_model = tiny_case("gpt2_f32")
    model = tiny_models.build(config, ref_model.path, backend="numba")      # the load-time hook fuses q|k|v
    got, _ = _decode(model)
    assert isinstance(model._fused_step, _fused_decode.FusedDecode)
    want, _ = _decode(ref_model)
    assert _rel(got, want) <= 1e-4


def test_threads_that_cannot_meet_fall_back_to_the_ops(monkeypatch, ops_only):
    """More iterations than threads: one thread runs two iterations in turn, the rendezvous times out,
    the step computes nothing (cache untouched) and the model runs the ops from then on."""
    config, dtype, bias = CASES["gpt2_f32"]
    weights = _gpt2_weights(config, dtype, seed=5)
    model = Model(config, weights, backend="numba")
    monkeypatch.setattr(numba, "get_num_threads", lambda: numba.config.NUMBA_NUM_THREADS + 1)
    cache = model.new_cache(16)
    model.forward(PROMPT, cache)
    keys_before = [k.copy() for k in cache.keys]
    step = _fused_decode.plan(config, weights)
    assert step(STEPS[0], cache) is None and step.disabled
    assert cache.length == len(PROMPT)
    for k, k0 in zip(cache.keys, keys_before):
        np.testing.assert_array_equal(k, k0)
    got, _ = _decode(model)
    want, _ = _decode(ops_only(config, weights))
    assert model._fused_step.disabled and _rel(got, want) <= 1e-5


def test_plan_refuses_other_models(tiny_case):
    for name in ("llama_f32", "qwen3_bf16"):
        config, _, ref_model = tiny_case(name)
        weights = fuse_projections(copy.deepcopy(ref_model.weights))   # in place: not the session's model
        assert _fused_decode.plan(config, weights) is None, name
    config, dtype, _ = CASES["gpt2_f32"]
    weights = _gpt2_weights(config, dtype, seed=1)
    assert _fused_decode.plan(config, weights, dtype=np.float64) is None
    windowed = dataclasses.replace(config, sliding_window=4, layer_types=("sliding", "full"))
    assert _fused_decode.plan(windowed, weights) is None
    unfused = _gpt2_weights(config, dtype, seed=1)
    for layer in unfused.layers:
        layer.wqkv = None
    assert _fused_decode.plan(config, unfused) is None


def test_a_cache_the_step_cannot_take_is_left_to_the_ops():
    config, dtype, _ = CASES["gpt2_f32"]
    weights = _gpt2_weights(config, dtype, seed=2)
    model = Model(config, weights, backend="numba")
    step = _fused_decode.plan(config, weights)
    cache = model.new_cache(len(PROMPT))
    model.forward(PROMPT, cache)
    assert step(1, cache) is None and not step.disabled           # full: no room for a position
    broken = model.new_cache(8)
    broken.broken = "test"
    assert step(1, broken) is None


@numba.njit(parallel=True, cache=False)
def _barrier_rounds(slots, rounds, sync, seen_wrong):
    n = slots.shape[0]
    for t in numba.prange(n):
        if not _atomics.rendezvous(sync, n):
            continue
        gen = 0
        for r in range(1, rounds + 1):
            slots[t] = r
            gen += 1
            _atomics.barrier(sync, n, gen)
            for u in range(n):
                if slots[u] != r:
                    seen_wrong[t] += 1
            gen += 1
            _atomics.barrier(sync, n, gen)


def test_barrier_orders_every_round():
    n = numba.get_num_threads()
    slots = np.zeros(n, np.int64)
    wrong = np.zeros(n, np.int64)
    sync = np.zeros(_atomics.SYNC_SIZE, np.int64)
    _barrier_rounds(slots, 500, sync, wrong)
    assert sync[_atomics.VERDICT] == 1
    assert wrong.sum() == 0 and (slots == 500).all()
    assert sync[_atomics.ARRIVALS] == 2 * 500 * n


def test_rendezvous_of_more_iterations_than_threads_fails_for_all():
    n = numba.config.NUMBA_NUM_THREADS + 1
    slots = np.zeros(n, np.int64)
    wrong = np.zeros(n, np.int64)
    sync = np.zeros(_atomics.SYNC_SIZE, np.int64)
    _barrier_rounds(slots, 3, sync, wrong)
    assert sync[_atomics.VERDICT] == 2
    assert (slots == 0).all() and sync[_atomics.ARRIVALS] == 0


# --- gpt-oss: RMSNorm, RoPE, sinks, sliding windows, MXFP4 experts (exact and int8 modes) ----------

MID_OSS = dataclasses.replace(tiny_models.GPTOSS, hidden_size=576, num_heads=8, num_kv_heads=2, head_dim=64,
                              intermediate_size=288, moe_intermediate_size=288)   # int8 kernels, with tails


def _oss_checkpoint(tmp_path, config, seed):
    from gptevo.checkpoint import Checkpoint

    roles = tiny_models.quantize_experts(tiny_models.store_dtype(tiny_models.make_roles(config, seed),
                                                                 ml_dtypes.bfloat16))
    path = tiny_models.write(tmp_path, f"oss{seed}", tiny_models.hf_tensors(config, roles), ml_dtypes.bfloat16)
    return lambda mode="stored", backend="numba": Model.from_checkpoint(config, Checkpoint(path), backend=backend,
                                                                       weights=mode)


def _oss_steps(model, n=12, fused=True):
    """Prompt then n single tokens: past the window (3) so the ring slots wrap; logits per step."""
    if not fused:
        model._fused_step = False
    cache = model.new_cache(len(PROMPT) + n)
    model.forward(PROMPT, cache)
    out = [model.forward([t], cache) for t in (STEPS * 2)[:n]]
    return out, cache


@pytest.mark.parametrize("config", [tiny_models.GPTOSS, MID_OSS], ids=["tiny", "mid"])
def test_gptoss_exact_mode_equals_the_ops_and_the_reference(tmp_path, config):
    make = _oss_checkpoint(tmp_path, config, seed=3)
    model = make()
    got, cache = _oss_steps(model)
    assert type(model._fused_step).__name__ == "GptOssStep" and not model._fused_step.moe_int8
    want, want_cache = _oss_steps(make(), fused=False)
    ref, _ = _oss_steps(make(backend="reference"), fused=False)
    for a, b, r in zip(got, want, ref):       # no farther from the reference than the ops are (plus 1e-4)
        assert _rel(a, b) <= 1e-5 and _rel(a, r) <= 1e-4 + 2 * _rel(b, r)
    for i in range(config.num_layers):                        # ring slots of the sliding layers included
        np.testing.assert_array_equal(cache.positions[i], want_cache.positions[i])
        assert _rel(cache.keys[i], want_cache.keys[i]) <= 1e-5
        assert _rel(cache.values[i], want_cache.values[i]) <= 1e-5


def test_gptoss_int8_mode_follows_the_int8_ops(tmp_path):
    """int8 mode quantizes activations, so an input that differs in its last bit (attention sums in
    another order) can round one int8 value differently: steps then differ by far more than float
    rounding. Most steps must still agree to float rounding (a wrong kernel would differ at every
    step), and every step must stay much closer to the int8 ops than int8 is to exact."""
    make = _oss_checkpoint(tmp_path, MID_OSS, seed=4)
    model = make("int8")
    got, _ = _oss_steps(model)
    assert model._fused_step.dense_q8 and model._fused_step.moe_int8
    want, _ = _oss_steps(make("int8"), fused=False)
    exact, _ = _oss_steps(make("stored"), fused=False)
    errs = [_rel(a, b) for a, b in zip(got, want)]
    int8_errs = [_rel(b, e) for b, e in zip(want, exact)]
    assert sum(e <= 1e-5 for e in errs) >= len(errs) // 2, errs
    assert max(errs) <= 0.25 * max(int8_errs), (errs, int8_errs)


def test_two_threads_decoding_on_one_model_get_their_own_results(ops_only):
    """The step's scratch buffers are shared, so concurrent calls take turns (a lock); without it a
    second region started while one runs gets no threads of its own, its rendezvous fails and the
    step disables itself."""
    import threading

    config, dtype, _ = CASES["gpt2_bf16"]
    weights = _gpt2_weights(config, dtype, seed=9)
    model = Model(config, weights, backend="numba")
    prompts = ([3, 4, 5], [40, 41])
    results = {}

    def run(i):
        cache = model.new_cache(len(prompts[i]) + len(STEPS))
        model.forward(prompts[i], cache)
        results[i] = np.concatenate([model.forward([t], cache) for t in STEPS])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert isinstance(model._fused_step, _fused_decode.FusedDecode) and not model._fused_step.disabled
    twin = ops_only(config, weights)
    for i in range(2):
        cache = twin.new_cache(len(prompts[i]) + len(STEPS))
        twin.forward(prompts[i], cache)
        want = np.concatenate([twin.forward([t], cache) for t in STEPS])
        assert _rel(results[i], want) <= 1e-5


@pytest.mark.parametrize("case", ["gpt2_f32", "gpt2_bf16", "gqa_no_bias_f32"])
def test_batched_fused_step_equals_each_sequence_alone(case, ops_only, monkeypatch):
    """forward_batch of 2+ sequences takes the step's batched form (one region, weights read once
    for all rows); each row equals that sequence decoded alone through the ops, caches included."""
    from gptevo.backends.numba import _fused_gpt2

    config, dtype, bias = CASES[case]
    weights = _gpt2_weights(config, dtype, seed=13, bias=bias)
    calls = []
    original = _fused_gpt2.Gpt2Step.rows
    monkeypatch.setattr(_fused_gpt2.Gpt2Step, "rows", lambda self, t, c: calls.append(len(c)) or original(self, t, c))
    model = Model(config, weights, backend="numba")
    twin = ops_only(config, weights)
    prompts = [[3, 4, 5], [40, 41, 42, 43, 44, 45], [7]]
    caches, alone = [], []
    for p in prompts:
        caches.append(model.new_cache(len(p) + 4))
        model.forward(p, caches[-1])
        alone.append(twin.new_cache(len(p) + 4))
        twin.forward(p, alone[-1])
    for step in range(4):
        toks = np.array([11 + step, 20 + step, 30 + step])
        got = model.forward_batch(toks, caches)
        want = np.concatenate([twin.forward([int(t)], c) for t, c in zip(toks, alone)])
        assert _rel(got, want) <= 1e-5, (case, step)
    assert calls == [3, 3, 3, 3] and not model._fused_step.disabled
    for c, w in zip(caches, alone):
        assert c.length == w.length
        for i in range(config.num_layers):
            np.testing.assert_array_equal(c.positions[i], w.positions[i])
            assert _rel(c.keys[i][:c.length], w.keys[i][:w.length]) <= 1e-5
            assert _rel(c.values[i][:c.length], w.values[i][:w.length]) <= 1e-5


def test_batched_step_leaves_a_full_cache_to_the_ops():
    config, dtype, _ = CASES["gpt2_f32"]
    weights = _gpt2_weights(config, dtype, seed=2)
    model = Model(config, weights, backend="numba")
    step = _fused_decode.plan(config, weights)
    a, b = model.new_cache(8), model.new_cache(len(PROMPT))
    model.forward(PROMPT, a)
    model.forward(PROMPT, b)
    before = (a.length, b.length)
    assert step.rows(np.array([1, 2]), [a, b]) is None and not step.disabled     # b has no room
    assert (a.length, b.length) == before
    assert step.rows(np.array([1, 2]), [a, a]) is None                          # one cache twice


def test_fused_decode_switch_reads_the_usual_spellings_and_refuses_others(monkeypatch):
    from gptevo.backends import numba as numba_backend
    from gptevo.errors import ConfigError

    for value, on in (("0", False), ("off", False), ("False", False), ("1", True), ("yes", True), ("", True)):
        monkeypatch.setenv("GPTEVO_FUSED_DECODE", value)
        assert numba_backend.fused_decode_enabled() is on, value
    monkeypatch.setenv("GPTEVO_FUSED_DECODE", "sometimes")
    with pytest.raises(ConfigError, match="GPTEVO_FUSED_DECODE='sometimes'"):
        numba_backend.fused_decode_enabled()
    config, dtype, _ = CASES["gpt2_f32"]
    model = Model(config, _gpt2_weights(config, dtype, seed=1), backend="numba")
    cache = model.new_cache(4)
    with pytest.raises(ConfigError, match="GPTEVO_FUSED_DECODE"):
        model.forward([1], cache)
    monkeypatch.setenv("GPTEVO_FUSED_DECODE", "0")
    model = Model(config, _gpt2_weights(config, dtype, seed=1), backend="numba")
    model.forward([1], model.new_cache(4))
    assert model._fused_step is False


def test_a_copied_cache_gets_its_own_addresses(ops_only):
    """The step keeps each cache's address table on the cache; a deepcopy taken mid-generation must
    not reuse the original's (it would write into the original's buffers): both continue as the ops."""
    import copy
    config, dtype, bias = CASES["gpt2_f32"]
    weights = _gpt2_weights(config, dtype, seed=5, bias=bias)
    fused, ops = Model(config, weights, backend="numba"), ops_only(config, weights)
    cache, want_cache = fused.new_cache(16), ops.new_cache(16)
    fused.forward(PROMPT, cache)
    ops.forward(PROMPT, want_cache)
    for t in STEPS[:2]:
        fused.forward([t], cache)
        ops.forward([t], want_cache)
    twin, want_twin = copy.deepcopy(cache), copy.deepcopy(want_cache)
    for t in STEPS[2:]:
        got_twin, got = fused.forward([t + 1], twin), fused.forward([t], cache)
        assert _rel(got_twin, ops.forward([t + 1], want_twin)) <= 1e-5
        assert _rel(got, ops.forward([t], want_cache)) <= 1e-5
    assert not fused._fused_step.disabled
    for a, b in ((cache, want_cache), (twin, want_twin)):
        n = a.length
        assert n == b.length and all(_rel(x[:n], y[:n]) <= 1e-5 for x, y in zip(a.keys, b.keys))


def _record_region(monkeypatch, ops_for=lambda step: False):
    """Wrap ``GptOssStep.rows``: returns the list that records, per batched step, whether the region ran;
    steps for which ``ops_for(step)`` is true get None (their model runs the batched ops) unrecorded."""
    from gptevo.backends.numba import _fused_gptoss

    ran = []
    original = _fused_gptoss.GptOssStep.rows

    def rows(self, tokens, caches):
        if ops_for(self):
            return None
        out = original(self, tokens, caches)
        ran.append(out is not None)
        return out

    monkeypatch.setattr(_fused_gptoss.GptOssStep, "rows", rows)
    return ran


@pytest.mark.parametrize("config", [tiny_models.GPTOSS, MID_OSS], ids=["tiny", "mid"])
def test_gptoss_batched_fused_step_equals_each_sequence_alone(tmp_path, config, monkeypatch):
    """forward_batch of gpt-oss sequences of different lengths takes the batched region (5 rows x 2
    slots over 4 experts: groups that stream and groups of 4+ that tile), past the window of 3 so
    the ring slots wrap; each row equals that sequence alone through the ops, caches included."""

    make = _oss_checkpoint(tmp_path, config, seed=5)
    model, twin = make(), make()
    twin._fused_step = False
    calls = _record_region(monkeypatch)
    prompts = [[3, 4, 5], [40, 41, 42, 43, 44, 45], [7], [9, 10], [1, 2, 3, 4]]
    caches, alone = [], []
    for p in prompts:
        caches.append(model.new_cache(len(p) + 6))
        model.forward(p, caches[-1])
        alone.append(twin.new_cache(len(p) + 6))
        twin.forward(p, alone[-1])
    for step in range(6):
        toks = np.array([11 + step, 20 + step, 30 + step, 5 + step, 50 + step])
        got = model.forward_batch(toks, caches)
        want = np.concatenate([twin.forward([int(t)], c) for t, c in zip(toks, alone)])
        assert _rel(got, want) <= 1e-5, step
    assert calls == [True] * 6 and not model._fused_step.disabled
    for c, w in zip(caches, alone):
        assert c.length == w.length
        for i in range(config.num_layers):
            np.testing.assert_array_equal(c.positions[i], w.positions[i])
            assert _rel(c.keys[i], w.keys[i]) <= 1e-5
            assert _rel(c.values[i], w.values[i]) <= 1e-5


def test_gptoss_int8_batched_fused_step_follows_the_batched_int8_ops(tmp_path, monkeypatch):
    """The int8 mode's batched region against the same batch through the int8 ops: dense rows and
    expert rows are the ops' own kernels (bitwise), attention sums in another order, so as in the
    one-token int8 test most steps agree to float rounding and every step stays far closer to the
    int8 ops than int8 is to exact."""

    make = _oss_checkpoint(tmp_path, MID_OSS, seed=6)
    model, twin, exact = make("int8"), make("int8"), make("stored")
    used = _record_region(monkeypatch, ops_for=lambda step: step in (twin._fused_step, exact._fused_step))
    prompts = [[3, 4, 5], [40, 41, 42, 43, 44, 45], [7], [9, 10], [1, 2, 3, 4]]
    runs = []
    for m in (model, twin, exact):
        caches = []
        for p in prompts:
            caches.append(m.new_cache(len(p) + 6))
            m.forward(p, caches[-1])
        runs.append([m.forward_batch(np.array([11 + s, 20 + s, 30 + s, 5 + s, 50 + s]), caches) for s in range(6)])
    assert model._fused_step.dense_q8 and model._fused_step.moe_int8 and used == [True] * 6
    errs = [_rel(a, b) for a, b in zip(runs[0], runs[1])]
    int8_errs = [_rel(b, e) for b, e in zip(runs[1], runs[2])]
    assert sum(e <= 1e-5 for e in errs) >= len(errs) // 2, errs
    assert max(errs) <= 0.25 * max(int8_errs), (errs, int8_errs)
