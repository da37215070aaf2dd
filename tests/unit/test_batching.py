"""Batched decode (Model.forward_batch, gptevo.batching.BatchDecoder, generate with a list of prompts).

The expected outputs are single-sequence runs of the same model (``gptevo.generate`` one prompt at a
time, ``model.forward`` one token at a time), never the batched code itself: a batched row must give
the same logits (within rounding) and, greedy, the same tokens as its sequence decoded alone; seeded
sampling must not depend on which other requests share the batch. Models: the tiny checkpoints of
test_model_tiny (llama with a sliding layer and GQA, qwen3 bf16 with q/k-norm and MQA, gpt-oss with
MXFP4 experts, sinks and a window, GPT-2 with learned positions, mixtral MoE) on the reference and
numba backends; every peer-fixture family is covered in tests/model/test_batching_families.py.
"""
from __future__ import annotations

import dataclasses
import os
import threading

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import gptevo
from gptevo import backends, batching
from gptevo.backends import Backend
from gptevo.batching import BatchDecoder, TokenEvent
from gptevo.errors import GptevoError, NumericalError, RequestError
from gptevo.kv_cache import KVCache
from gptevo.model import Model
from gptevo.generation import check_sampling

from _builders import tiny_models as T

AVAILABLE = backends.available()
BACKENDS = [b for b in ("reference", "numba")]
CASES = (*T.CASES, "mixtral_f32")
GREEDY = check_sampling(0.0)
PROMPTS = [T.IDS[:1], T.IDS[:5], T.IDS[2:11], [7, 7, 7], T.IDS[:12]]     # lengths 1..12 (> every window)


def _case(name, tmp, backend):
    if name == "mixtral_f32":
        roles = T.store_dtype(T.make_roles(T.MIXTRAL, 5), np.float32)
        return T.MIXTRAL, T.build(T.MIXTRAL, T.write(tmp, name, T.hf_tensors(T.MIXTRAL, roles)), backend)
    config, _, _ = T.build_case(name, tmp)
    return config, T.build(config, os.path.join(str(tmp), name), backend)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batching")
    cache = {}

    def get(name, backend="reference"):
        if backend not in AVAILABLE:
            pytest.skip(f"backend {backend!r} unavailable: {AVAILABLE.unavailable[backend]}")
        if (name, backend) not in cache:
            cache[name, backend] = _case(name, tmp / backend, backend)[1]
        return cache[name, backend]

    return get


def _single(model, prompt, n, sampling=GREEDY, stop_token_ids=()):
    return gptevo.generate(model, prompt, max_new_tokens=n, temperature=sampling.temperature,
                           top_k=sampling.top_k, top_p=sampling.top_p, seed=sampling.seed,
                           stop_token_ids=list(stop_token_ids))


def _drain(decoder, outputs=None):
    """Step until idle: {request id: [tokens]}, checking the event stream's shape."""
    outputs = {} if outputs is None else outputs
    finished = set()
    for _ in range(10_000):
        if not (decoder.running or decoder.pending):
            return outputs
        events = decoder.step()
        assert len({ev.request_id for ev in events}) == len(events), "one event per request per step"
        for ev in events:
            assert isinstance(ev, TokenEvent) and ev.request_id not in finished
            assert ev.finished == (ev.finish_reason is not None)
            outputs.setdefault(ev.request_id, []).append(ev.token_id)
            if ev.finished:
                finished.add(ev.request_id)
    raise AssertionError("decoder never went idle")


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


# -- forward_batch: rows equal single-sequence forwards ------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CASES)
def test_forward_batch_rows_equal_single_forwards(tiny, name, backend):
    model = tiny(name, backend)
    prompts = PROMPTS[:4]
    batch = [model.new_cache(20) for _ in prompts]
    alone = [model.new_cache(20) for _ in prompts]
    for p, a, b in zip(prompts, batch, alone):
        model.forward(p, a)
        model.forward(p, b)
    for step in range(6):                                  # crosses the windows (3 and 4) of every row
        tokens = [(11 * step + 5 * b + 1) % model.config.vocab_size for b in range(len(prompts))]
        got = model.forward_batch(tokens, batch)                                        # [B,V]
        want = np.concatenate([model.forward([t], c) for t, c in zip(tokens, alone)])   # [B,V]
        assert got.shape == want.shape and got.dtype == np.float32
        assert _rel(got, want) < 1e-5, f"{name} on {backend}, step {step}"
    assert [c.length for c in batch] == [len(p) + 6 for p in prompts]


# -- generate with a list of prompts ---------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CASES)
def test_batched_greedy_equals_single_greedy(tiny, name, backend):
    model = tiny(name, backend)
    want = [_single(model, p, 9) for p in PROMPTS]
    assert gptevo.generate(model, PROMPTS, max_new_tokens=9, temperature=0.0) == want


def test_generate_list_seeded_sampling_equals_single(tiny):
    model = tiny("gptoss_mxfp4")
    got = gptevo.generate(model, PROMPTS, max_new_tokens=8, temperature=1.3, top_k=20, seed=11)
    assert got == [_single(model, p, 8, check_sampling(1.3, 20, None, 11)) for p in PROMPTS]


def test_generate_list_with_stop_ids_and_truncation(tiny):
    model = tiny("llama_f32")
    long = (T.IDS * 6)[:60]                                # 60 + 8 > 64 positions: truncated on the left
    stop = _single(model, PROMPTS[1], 6)[2]                # a token the second prompt produces
    got = gptevo.generate(model, [PROMPTS[1], long], max_new_tokens=8, temperature=0.0,
                          stop_token_ids=[stop], truncation="left")
    assert got == [gptevo.generate(model, p, max_new_tokens=8, temperature=0.0, stop_token_ids=[stop],
                                   truncation="left") for p in (PROMPTS[1], long)]
    assert got[0][-1] == stop and len(got[0]) <= 3


def test_generate_list_without_a_token_limit_runs_each_to_the_context(tiny):
    model = tiny("gpt2_f32")                               # context 32
    prompts = [PROMPTS[0], PROMPTS[2]]
    want = [gptevo.generate(model, p, max_new_tokens=None, temperature=0.0) for p in prompts]
    assert [len(w) for w in want] == [32 - len(p) for p in prompts]
    assert gptevo.generate(model, prompts, max_new_tokens=None, temperature=0.0) == want


def test_generate_list_of_text_prompts_equals_single():
    model = gptevo.load(os.path.join(os.path.dirname(gptevo.__file__), "data", "austen"), backend="reference")
    prompts = ["It is a truth universally acknowledged", "Mr. Darcy", "She said"]
    for kw in ({"temperature": 0.0}, {"temperature": 0.9, "seed": 3, "stop": [",", "."]}):
        want = [gptevo.generate(model, p, max_new_tokens=12, **kw) for p in prompts]
        assert gptevo.generate(model, prompts, max_new_tokens=12, **kw) == want
        assert all(isinstance(t, str) for t in want)


class _HostArrays:
    """A backend's own array functions, here plain NumPy: the model takes the device-array paths
    (``forward_batch`` runs the rows one at a time through ``forward``, as on cupy)."""

    xp = np
    asarray = staticmethod(np.asarray)
    to_host = staticmethod(np.asarray)
    zeros = staticmethod(np.zeros)
    full = staticmethod(np.full)

    @staticmethod
    def arange(start, stop, dtype=np.int64):
        return np.arange(start, stop, dtype=dtype)

    @staticmethod
    def is_device(a):
        return False


def test_backend_with_its_own_arrays_decodes_rows_one_at_a_time(tiny, monkeypatch):
    ref = tiny("gptoss_mxfp4")
    backend = Backend("own-arrays", backends.resolve("reference").ops)
    backend.arrays = _HostArrays()
    model = Model(ref.config, ref.weights, backend=backend)
    calls = []
    real = Model._run_rows
    monkeypatch.setattr(Model, "_run_rows", lambda self, *a: calls.append(1) or real(self, *a))
    want = [_single(ref, p, 6) for p in PROMPTS]
    assert gptevo.generate(model, PROMPTS, max_new_tokens=6, temperature=0.0) == want
    assert not calls                                      # never the stacked step


def test_other_model_objects_decode_one_sequence_at_a_time():
    from _gen_fakes import FakeModel                      # forward(ids, cache) and new_cache(n) only

    model = FakeModel(50, context=40, eos=(7,))
    prompts = [[1, 2, 3], [4], [9, 9, 9, 9, 9]]
    for kw in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 5}):
        want = [gptevo.generate(model, p, max_new_tokens=12, **kw) for p in prompts]
        assert gptevo.generate(model, prompts, max_new_tokens=12, **kw) == want


# -- continuous batching: join, leave, cancel --------------------------------------------------------
SCHEDULE = st.lists(st.tuples(st.integers(0, len(PROMPTS) - 1),      # prompt
                              st.integers(1, 8),                      # max_new_tokens
                              st.integers(0, 6),                      # step it is submitted before
                              st.one_of(st.none(), st.integers(0, 8)),  # steps after submit it is cancelled
                              st.booleans()),                         # stop at its 3rd greedy token
                    min_size=1, max_size=6)


@settings(max_examples=15, deadline=None)
@given(schedule=SCHEDULE, max_batch=st.integers(1, 4))
def test_join_and_leave_give_single_sequence_outputs(tiny, schedule, max_batch):
    model = tiny("gptoss_mxfp4")
    decoder = BatchDecoder(model, max_batch=max_batch)
    plan = []                                              # (id or None, prompt, n, stops, submit, cancel)
    for p, n, at, cancel_after, stop_early in schedule:
        stops = ()
        if stop_early:
            alone = _single(model, PROMPTS[p], 8)
            stops = (alone[2],) if len(alone) > 2 else ()
        plan.append([None, PROMPTS[p], n, stops, at, None if cancel_after is None else at + cancel_after])
    outputs, cancelled = {}, {}
    for step in range(60):
        for item in plan:
            rid, prompt, n, stops, at, cancel_at = item
            if step == at:
                item[0] = decoder.submit(prompt, max_new_tokens=n, sampling=GREEDY, stop_token_ids=stops)
            if rid is not None and step == cancel_at:
                decoder.cancel(rid)
                cancelled[rid] = len(outputs.get(rid, []))
        for ev in decoder.step():
            assert ev.request_id not in cancelled, "no event after cancel"
            outputs.setdefault(ev.request_id, []).append(ev.token_id)
        assert decoder.running <= max_batch
    assert decoder.running == 0 and decoder.pending == 0
    for rid, prompt, n, stops, _, _ in plan:
        want = _single(model, prompt, n, stop_token_ids=stops)
        got = outputs.get(rid, [])
        if rid in cancelled:
            assert got == want[:len(got)] and len(got) == cancelled[rid]
        else:
            assert got == want


def test_finish_reasons_and_one_event_per_request_per_step(tiny):
    model = tiny("llama_f32")
    alone = _single(model, PROMPTS[2], 6)
    d = BatchDecoder(model, max_batch=8)
    a = d.submit(PROMPTS[2], max_new_tokens=6, sampling=GREEDY)
    b = d.submit(PROMPTS[2], max_new_tokens=6, sampling=GREEDY, stop_token_ids=[alone[3]])
    first = d.step()                                       # prefill events only
    assert [(e.request_id, e.token_id) for e in first] == [(a, alone[0]), (b, alone[0])]
    assert d.running == 2 and d.pending == 0
    events = [first]
    while d.running:
        events.append(d.step())
    last = {e.request_id: e for step in events for e in step if e.finished}
    assert last[b].finish_reason == "stop" and last[b].token_id == alone[3]
    assert last[a].finish_reason == "length" and last[a].token_id == alone[5]
    assert [len(s) for s in events] == [2, 2, 2, 2, 1, 1]


@pytest.mark.parametrize("name", ["gpt2_f32", "llama_f32", "gptoss_mxfp4"])
def test_context_full_ends_with_length_and_growing_caches(tiny, monkeypatch, name):
    monkeypatch.setattr(batching, "INITIAL_ROOM", 1)      # caches start with one free slot and grow
    model = tiny(name)                                     # full layers, and rings (W=4, W=3) that grow to W
    context = model.config.context_length
    prompt = T.IDS[:2]
    d = BatchDecoder(model)
    rid = d.submit(prompt, max_new_tokens=None, sampling=GREEDY, ignore_eos=True)
    other = d.submit(PROMPTS[3], max_new_tokens=15, sampling=GREEDY)
    out = _drain(d)
    assert len(out[rid]) == context - 2
    assert out[rid] == gptevo.generate(model, prompt, max_new_tokens=context - 2, temperature=0.0)
    assert out[other] == _single(model, PROMPTS[3], 15)


def test_append_one_equals_view_then_commit():
    config = T.LLAMA                                       # layer 0 sliding (W=4), layer 1 full
    fused, plain = KVCache(config, 9), KVCache(config, 9)
    rng = np.random.default_rng(0)
    for p in range(9):
        for layer in range(config.num_layers):
            k, v = rng.standard_normal((2, 1, config.num_kv_heads, config.head_dim)).astype(np.float32)
            got = fused.append_one(layer, k, v)
            pos = np.array([p])
            want = [np.array(a) for a in plain.view(layer, k, v, pos)]
            plain.commit(layer, k, v, pos)
            for g, w in zip(got, want):
                assert np.array_equal(g, w)
    assert fused.length == plain.length == 9
    for a, b in zip(fused.keys + fused.positions, plain.keys + plain.positions):
        assert np.array_equal(a, b)
    with pytest.raises(RequestError, match="overflow"):
        fused.append_one(0, k, v)
    with pytest.raises(RequestError, match="shapes"):
        KVCache(config, 2).append_one(0, k[:, :1], v)
    fused.broken = "test"
    with pytest.raises(RequestError, match="incomplete"):
        fused.append_one(1, k, v)


def test_kv_cache_grow_keeps_contents_and_refuses_shrinking(tiny):
    model = tiny("llama_f32")                              # layer 0 sliding (W=4), layer 1 full
    grown, whole = model.new_cache(2), model.new_cache(12)
    for n, t in enumerate(T.IDS):
        if grown.length == grown.max_tokens:
            grown.grow(grown.max_tokens + 1 + n % 3)
        assert _rel(model.forward([t], grown), model.forward([t], whole)) < 1e-6
    assert [k.shape[0] for k in grown.keys] == [4, grown.max_tokens]
    with pytest.raises(RequestError, match="grow: max_tokens must be"):
        grown.grow(grown.max_tokens - 1)


@settings(max_examples=6, deadline=None)
@given(company=st.lists(st.sampled_from(range(len(PROMPTS))), max_size=4), max_batch=st.integers(1, 5))
def test_seeded_sampling_is_independent_of_the_batch(tiny, company, max_batch):
    model = tiny("qwen3_bf16")
    sampling = check_sampling(1.0, None, 0.95, 1234)
    want = _single(model, PROMPTS[1], 8, sampling)
    d = BatchDecoder(model, max_batch=max_batch)
    others = [d.submit(PROMPTS[p], max_new_tokens=5, sampling=check_sampling(0.8, seed=i)) for i, p in
              enumerate(company)]
    rid = d.submit(PROMPTS[1], max_new_tokens=8, sampling=sampling)
    out = _drain(d)
    assert out[rid] == want
    assert all(len(out[o]) <= 5 for o in others)


def test_submit_and_cancel_from_other_threads(tiny):
    model = tiny("llama_f32")
    d = BatchDecoder(model, max_batch=3)
    want = [_single(model, p, 30) for p in PROMPTS]
    outputs: dict[int, list[int]] = {}
    done, errors = threading.Event(), []

    def stepper():                             # one thread steps while the main thread submits/cancels
        try:
            while not done.is_set() or d.running or d.pending:
                for ev in d.step():
                    outputs.setdefault(ev.request_id, []).append(ev.token_id)
        except BaseException as exc:           # reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=stepper)
    thread.start()
    try:
        ids = [d.submit(p, max_new_tokens=30, sampling=GREEDY) for p in PROMPTS]
        victim = ids[0]
        for _ in range(10_000):                # cancel the first request once it has produced a token
            if outputs.get(victim):
                break
            threading.Event().wait(0.001)
        d.cancel(victim)
        at_cancel = len(outputs.get(victim, []))
    finally:
        done.set()
        thread.join(timeout=120)
    assert not thread.is_alive() and not errors
    got = outputs.get(victim, [])
    assert got == want[0][:len(got)] and len(got) <= at_cancel + 1   # at most the event in flight
    assert [outputs[r] for r in ids[1:]] == want[1:]
    assert d.running == 0 and d.pending == 0


def _with_nan_token(model, token):
    """The same model with token ``token``'s embedding row NaN (its logits rows become non-finite)."""
    embed = np.array(model.weights.embed, dtype=np.float32, copy=True)                 # [V,D]
    embed[token] = np.nan
    weights = dataclasses.replace(model.weights, embed=embed)
    return Model(model.config, weights, backend=model.backend, path=model.path)


def test_non_finite_request_is_dropped_and_others_keep_their_events(tiny):
    clean = tiny("llama_f32")
    want = _single(clean, PROMPTS[1], 6)
    nan_token = max(set(range(64)) - set(want) - set(PROMPTS[1]))      # never fed by the good request
    model = _with_nan_token(clean, nan_token)
    assert not model.weights.tied
    d = BatchDecoder(model, max_batch=4)
    good = d.submit(PROMPTS[1], max_new_tokens=6, sampling=GREEDY)
    assert [e.token_id for e in d.step()] == want[:1]
    bad = d.submit([1, nan_token, 2], max_new_tokens=6, sampling=GREEDY)
    with pytest.raises(NumericalError, match=f"request {bad}: non-finite") as info:
        d.step()
    assert info.value.request_ids == (bad,)
    assert d.running == 1                         # the bad request left, its cache freed
    events = d.step() + _drain_events(d)          # the kept-back event first, then this step's
    assert {e.request_id for e in events} == {good}
    assert [e.token_id for e in events] == want[1:]
    c1, c2 = model.new_cache(8), model.new_cache(8)
    model.forward([1], c1)
    model.forward([2], c2)
    with pytest.raises(NumericalError, match=r"batch row 1"):
        model.forward_batch([5, nan_token], [c1, c2])


def test_failed_forward_drops_broken_requests_and_keeps_other_events(tiny, monkeypatch):
    model = tiny("llama_f32")
    want = [_single(model, p, 5) for p in PROMPTS[:3]]
    d = BatchDecoder(model, max_batch=4)
    a, b = (d.submit(p, max_new_tokens=5, sampling=GREEDY) for p in PROMPTS[:2])
    d.step()                                      # a and b prefilled
    c = d.submit(PROMPTS[2], max_new_tokens=5, sampling=GREEDY)
    real = type(model)._attention_rows

    def fail_in_layer_1(self, i, *args):          # layer 0 has committed every row: caches left broken
        if i == 1:
            raise RuntimeError("interrupted")
        return real(self, i, *args)

    monkeypatch.setattr(type(model), "_attention_rows", fail_in_layer_1)
    with pytest.raises(RuntimeError, match="interrupted") as info:
        d.step()                                  # c's prefill succeeds, the batched step over a, b fails
    monkeypatch.undo()
    assert sorted(info.value.request_ids) == [a, b]
    assert d.running == 1 and d.pending == 0
    kept = d.step()                               # c's first token (kept back), then its second
    assert [(e.request_id, e.token_id) for e in kept] == [(c, want[2][0]), (c, want[2][1])]
    assert [e.token_id for e in _drain_events(d)] == want[2][2:]
    e = d.submit(PROMPTS[0], max_new_tokens=5, sampling=GREEDY)     # the decoder still works
    assert _drain(d)[e] == want[0]


def _drain_events(decoder):
    events = []
    while decoder.running or decoder.pending:
        events += decoder.step()
    return events


# -- bad input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"prompt_ids": []}, "empty"),
    ({"prompt_ids": [1, 64]}, r"64.*\[0, 64\)"),
    ({"prompt_ids": [1, "a"]}, "integers"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 2.5}, "max_new_tokens"),
    ({"max_new_tokens": 60}, r"exceeds the model's context of 64"),
    ({"prompt_ids": list(range(64)), "max_new_tokens": None}, "no room"),
    ({"sampling": {"temperature": 0}}, "Sampling"),
    ({"stop_token_ids": [99]}, "stop_token_ids"),
])
def test_submit_rejects_bad_requests(tiny, kwargs, match):
    d = BatchDecoder(tiny("llama_f32"))
    args = {"prompt_ids": [1, 2, 3, 4, 5], "max_new_tokens": 4, "sampling": GREEDY, **kwargs}
    prompt = args.pop("prompt_ids")
    with pytest.raises(RequestError, match=match):
        d.submit(prompt, **args)
    assert d.pending == 0 and d.running == 0


def test_decoder_and_forward_batch_reject_bad_arguments(tiny):
    model = tiny("llama_f32")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(RequestError, match="max_batch"):
            BatchDecoder(model, max_batch=bad)
    with pytest.raises(RequestError, match="needs a loaded model"):
        BatchDecoder(object())
    d = BatchDecoder(model)
    d.cancel(12345)                                        # unknown ids are ignored
    assert d.step() == []
    c1, c2 = model.new_cache(4), model.new_cache(4)
    model.forward([1, 2], c1)
    model.forward([3], c2)
    with pytest.raises(RequestError, match="2 token ids for 1 caches"):
        model.forward_batch([1, 2], [c1])
    with pytest.raises(RequestError, match="distinct"):
        model.forward_batch([1, 2], [c1, c1])
    with pytest.raises(RequestError, match=r"caches\[1\] must be a KVCache"):
        model.forward_batch([1, 2], [c1, "cache"])
    with pytest.raises(RequestError, match=r"out of range"):
        model.forward_batch([1, 64], [c1, c2])
    model.forward([4, 5], c1)                               # c1 now full (4 of 4)
    with pytest.raises(RequestError, match=r"overflow in caches\[0\]"):
        model.forward_batch([1, 2], [c1, c2])
    assert c2.length == 1                                   # nothing was run


def test_generate_list_errors_name_the_prompt(tiny):
    model = tiny("llama_f32")
    with pytest.raises(RequestError, match="prompt 1:.*out of range"):
        gptevo.generate(model, [[1, 2], [3, 99]], max_new_tokens=2)
    with pytest.raises(RequestError, match="prompt 0:.*stop strings"):
        gptevo.generate(model, [[1, 2]], max_new_tokens=2, stop=["x"])
    with pytest.raises(RequestError, match="stream"):
        gptevo.generate(model, [[1, 2], [3]], max_new_tokens=2, stream=True)
    with pytest.raises(GptevoError):
        gptevo.generate(model, [[1, 2], 3], max_new_tokens=2)
