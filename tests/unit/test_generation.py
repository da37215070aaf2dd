"""gptevo.generate: sampling, KV-cache decode loop, stopping, streaming, context and bad inputs (F1-F7).

Expected values come from the fake models' own definitions (a greedy re-run over full-sequence
logits, the scripted token list, float64 softmax probabilities written out here), never from the
sampler under test.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import gptevo
from gptevo.errors import GptevoError, NumericalError, RequestError
from gptevo.generation import Sampling, check_sampling, generate, sample_token
from gptevo.tokenizer import load_tokenizer

from _gen_fakes import FakeModel, ScriptedModel, byte_tokenizer_json, vocab_size_of, write_tokenizer

V = 40
PROMPT = [5, 9, 2, 17]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer(d)
    return load_tokenizer(d)


def scripted(tok, text: str, **kw) -> ScriptedModel:
    """A model whose output is the bytes of ``text`` (token id = byte value), then eos."""
    eos = tok.token_to_id("<|endoftext|>")
    V = vocab_size_of(byte_tokenizer_json())
    return ScriptedModel(V, list(text.encode("utf-8")), after=eos, eos=(eos,), tokenizer=tok, context=128, **kw)


def greedy_by_full_logits(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.argmax(model.logits(seq)[-1])))
    return seq[len(prompt):]


# -- greedy, seeds, KV cache use --------------------------------------------------------------------
def test_greedy_matches_argmax_of_full_sequence_logits():
    m = FakeModel(V)
    out = generate(m, PROMPT, max_new_tokens=12, temperature=0.0)
    assert out == greedy_by_full_logits(FakeModel(V), PROMPT, 12)
    assert generate(m, PROMPT, max_new_tokens=12, temperature=0.0) == out


def test_prefill_once_then_one_token_per_step_and_last_token_not_fed():
    m = FakeModel(V)
    generate(m, PROMPT, max_new_tokens=6, temperature=0.0)
    assert m.forward_sizes == [len(PROMPT), 1, 1, 1, 1, 1]


def test_greedy_ties_go_to_the_lowest_id():
    row = np.zeros(10)
    row[[7, 3, 8]] = 5.0
    assert sample_token(row, Sampling(temperature=0.0), None) == 3


def test_same_seed_same_output_and_different_seeds_differ():
    m = FakeModel(V)
    a = generate(m, PROMPT, max_new_tokens=20, temperature=1.0, seed=123)
    assert generate(m, PROMPT, max_new_tokens=20, temperature=1.0, seed=123) == a
    others = {tuple(generate(m, PROMPT, max_new_tokens=20, temperature=1.0, seed=s)) for s in range(5)}
    assert len(others) > 1


def test_temperature_zero_ignores_the_seed():
    m = FakeModel(V)
    assert generate(m, PROMPT, max_new_tokens=8, temperature=0, seed=1) == \
        generate(m, PROMPT, max_new_tokens=8, temperature=0, seed=2)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_top_k_1_and_tiny_top_p_equal_greedy(seed):
    m = FakeModel(V)
    greedy = generate(m, PROMPT, max_new_tokens=10, temperature=0.0)
    assert generate(m, PROMPT, max_new_tokens=10, temperature=1.5, top_k=1, seed=seed) == greedy
    assert generate(m, PROMPT, max_new_tokens=10, temperature=1.5, top_p=1e-9, seed=seed) == greedy


# -- the sampler's distribution (float64 softmax written out here) ---------------------------------
def _frequencies(row, sampling, n=4000):
    rng = np.random.default_rng(0)
    counts = np.zeros(len(row))
    for _ in range(n):
        counts[sample_token(np.array(row), sampling, rng)] += 1
    return counts / n


def _softmax(xs):
    e = [math.exp(x - max(xs)) for x in xs]
    return [v / sum(e) for v in e]


def test_temperature_scales_the_softmax():
    row = [2.0, 1.0, 0.0, -1.0]
    f = _frequencies(row, Sampling(temperature=2.0))
    assert np.allclose(f, _softmax([x / 2.0 for x in row]), atol=0.03)


def test_top_k_keeps_the_k_largest_and_renormalizes():
    row = [0.0, 2.0, -1.0, 1.0, 0.5]
    f = _frequencies(row, Sampling(temperature=1.0, top_k=2))
    p = _softmax([2.0, 1.0])
    assert f[[0, 2, 4]].sum() == 0
    assert abs(f[1] - p[0]) < 0.03 and abs(f[3] - p[1]) < 0.03


@pytest.mark.parametrize("top_p, kept", [(0.5, 1), (0.8, 2), (0.9, 3), (1.0, 4)])
def test_top_p_keeps_the_smallest_nucleus(top_p, kept):
    row = [3.0, 2.0, 1.0, 0.0]          # probabilities 0.644, 0.237, 0.087, 0.032
    p = _softmax(row)
    f = _frequencies(row, Sampling(temperature=1.0, top_p=top_p))
    want = np.array(p[:kept] + [0.0] * (4 - kept)) / sum(p[:kept])
    assert np.allclose(f, want, atol=0.03)
    assert (f[kept:] == 0).all()


@settings(max_examples=30)
@given(st.lists(st.floats(-20, 20), min_size=2, max_size=12), st.integers(0, 12),
       st.floats(0.01, 1.0), st.integers(0, 2**32))
def test_sampled_token_is_always_allowed(row, k, p, seed):
    k = min(k, len(row))
    t = sample_token(np.array(row), check_sampling(0.7, k, p, seed, len(row)), np.random.default_rng(seed))
    assert 0 <= t < len(row)
    if k:
        assert sum(x > row[t] for x in row) < k       # at most k-1 logits are strictly larger


# -- text, streaming, stopping ---------------------------------------------------------------------
def test_text_prompt_returns_text_and_stream_matches(tok):
    text = "h\u00e9llo \u20acuro \u2713 ok"                       # 2- and 3-byte characters
    out = generate(scripted(tok, text), "hi", max_new_tokens=64, temperature=0)
    assert out == text
    pieces = list(generate(scripted(tok, text), "hi", max_new_tokens=64, temperature=0, stream=True))
    assert "".join(pieces) == text and len(pieces) > 3
    assert all(isinstance(p, str) and p and "\ufffd" not in p for p in pieces)


def test_stream_equals_non_stream_when_sampling(tok):
    m = FakeModel(vocab_size_of(byte_tokenizer_json()), context=128, tokenizer=tok)
    kw = dict(max_new_tokens=40, temperature=1.3, seed=5)
    assert "".join(generate(m, "abc", stream=True, **kw)) == generate(m, "abc", **kw)


def test_invalid_bytes_are_replaced_not_lost(tok):
    m = ScriptedModel(vocab_size_of(byte_tokenizer_json()), [ord("a"), 0xE2, 0x82, ord("b")], after=ord("c"),
                      tokenizer=tok)
    out = generate(m, "x", max_new_tokens=5, temperature=0)
    assert out == "a\ufffdbc"                                        # an incomplete 3-byte sequence
    assert "".join(generate(m, "x", max_new_tokens=5, temperature=0, stream=True)) == out


def test_stop_string_ends_text_before_it_and_stops_early(tok):
    m = scripted(tok, "Hello world. And more text here")
    assert generate(m, "x", max_new_tokens=40, temperature=0, stop=".") == "Hello world"
    assert len(m.forward_sizes) == len("Hello world.")                # no token after the stop
    assert generate(scripted(tok, "Hello world"), "x", max_new_tokens=40, temperature=0,
                    stop=["lo w", "zzz"]) == "Hel"


def test_partial_stop_string_is_held_back_then_released(tok):
    pieces = list(generate(scripted(tok, "one wor two"), "x", max_new_tokens=40, temperature=0,
                           stop="world", stream=True))
    assert "".join(pieces) == "one wor two"
    pieces = list(generate(scripted(tok, "one world two"), "x", max_new_tokens=40, temperature=0,
                           stop="world", stream=True))
    assert "".join(pieces) == "one " and not any("w" in p for p in pieces)


def test_eos_stops_and_is_included_in_ids_but_not_text(tok):
    eos = tok.token_to_id("<|endoftext|>")
    m = scripted(tok, "ab")
    assert generate(m, [1, 2], max_new_tokens=10, temperature=0) == [ord("a"), ord("b"), eos]
    assert generate(scripted(tok, "ab"), "q", max_new_tokens=10, temperature=0) == "ab"


def test_stop_token_ids(tok):
    m = scripted(tok, "abcdef")
    assert generate(m, [1], max_new_tokens=10, temperature=0, stop_token_ids=[ord("c")]) == \
        [ord("a"), ord("b"), ord("c")]
    assert generate(scripted(tok, "abcdef"), "q", max_new_tokens=10, temperature=0,
                    stop_token_ids=ord("d")) == "abc"


def test_max_new_tokens_limits_output(tok):
    assert generate(scripted(tok, "abcdef"), "q", max_new_tokens=3, temperature=0) == "abc"


def test_stream_with_ids_yields_the_same_ids():
    m = FakeModel(V)
    assert list(generate(m, PROMPT, max_new_tokens=7, temperature=0.9, seed=3, stream=True)) == \
        generate(m, PROMPT, max_new_tokens=7, temperature=0.9, seed=3)


# -- context (F1, F7) ----------------------------------------------------------------------------
def test_context_overflow_names_both_numbers():
    m = FakeModel(V, context=16)
    with pytest.raises(RequestError) as e:
        generate(m, list(range(10)), max_new_tokens=7)
    assert "10" in str(e.value) and "max_new_tokens=7" in str(e.value) and "16" in str(e.value)


def test_prompt_as_long_as_the_context_is_rejected():
    with pytest.raises(RequestError, match="16"):
        generate(FakeModel(V, context=16), [1] * 16, max_new_tokens=1)


def test_truncation_left_keeps_the_last_prompt_tokens():
    prompt = list(range(1, 13))                                      # 12 tokens, context 16, 7 new
    out = generate(FakeModel(V, context=16), prompt, max_new_tokens=7, temperature=0, truncation="left")
    m = FakeModel(V, context=16)
    assert out == generate(m, prompt[-9:], max_new_tokens=7, temperature=0)
    assert m.forward_sizes[0] == 9
    with pytest.raises(RequestError, match="truncation"):
        generate(FakeModel(V), PROMPT, truncation="right")
    with pytest.raises(RequestError):
        generate(FakeModel(V, context=16), prompt, max_new_tokens=16, truncation="left")


def test_max_new_tokens_reaching_exactly_the_context():
    m = FakeModel(V, context=16)
    out = generate(m, list(range(10)), max_new_tokens=6, temperature=0)   # 10 + 6 == 16
    assert len(out) == 6
    assert sum(m.forward_sizes) == 15                                # position 16 is never written


# -- bad inputs (F2, F3, F4, F5) --------------------------------------------------------------------
@pytest.mark.parametrize("prompt", [[-1], [V], [2**40], [1.0], [True], [np.float32(2)], [1, "2"], [[1], 2],
                                    [[[1]]]])   # a list of id lists is a batch of prompts (test_batching.py)
def test_invalid_prompt_ids(prompt):
    with pytest.raises(RequestError, match="prompt"):
        generate(FakeModel(V), prompt, max_new_tokens=2)


def test_numpy_integer_ids_are_accepted():
    assert len(generate(FakeModel(V), np.array(PROMPT, dtype=np.int32), max_new_tokens=2, temperature=0)) == 2


@pytest.mark.parametrize("prompt", ["", [], np.array([], dtype=np.int64)])
def test_empty_prompt(prompt, tok):
    with pytest.raises(RequestError, match="empty"):
        generate(FakeModel(vocab_size_of(byte_tokenizer_json()), tokenizer=tok), prompt)


@pytest.mark.parametrize("kw, name", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(temperature="1"), "temperature"),
    (dict(temperature=True), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=float("nan")), "top_p"),
    (dict(top_p=-0.1), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(top_k=V + 1), "top_k"), (dict(top_k=1.5), "top_k"),
    (dict(top_k=True), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=-3), "max_new_tokens"),
    (dict(max_new_tokens=10**12), "max_new_tokens"), (dict(max_new_tokens=2.0), "max_new_tokens"),
    (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"),
    (dict(stop_token_ids=[V]), "stop_token_ids"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(stream="yes"), "stream"),
])
def test_bad_parameters_name_the_parameter(kw, name):
    with pytest.raises(RequestError, match=name):
        generate(FakeModel(V), PROMPT, **kw)


def test_validation_happens_at_the_call_even_when_streaming():
    with pytest.raises(RequestError, match="temperature"):
        generate(FakeModel(V), PROMPT, temperature=-1, stream=True)


def test_stop_strings_need_a_text_prompt_and_must_be_non_empty(tok):
    with pytest.raises(RequestError, match="stop"):
        generate(FakeModel(V), PROMPT, stop=".")
    with pytest.raises(RequestError, match="stop"):
        generate(FakeModel(vocab_size_of(byte_tokenizer_json()), tokenizer=tok), "a", stop=[""])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_raise_numerical_error(tok, bad):
    m = scripted(tok, "abcdef", nan_at=2)
    if not np.isnan(bad):
        orig = m.forward

        def forward(ids, cache):
            out = orig(ids, cache)
            out[np.isnan(out)] = bad
            return out
        m.forward = forward
    with pytest.raises(NumericalError, match="step 2"):
        generate(m, "x", max_new_tokens=10, temperature=0)
    with pytest.raises(NumericalError):
        list(generate(scripted(tok, "abcdef", nan_at=0), "x", max_new_tokens=10, stream=True))
    assert issubclass(NumericalError, GptevoError)
    assert generate(scripted(tok, "ab"), "x", max_new_tokens=10, temperature=0) == "ab"   # still usable


def test_text_prompt_without_a_tokenizer_or_with_lone_surrogate(tok):
    with pytest.raises(RequestError, match="token ids"):
        generate(FakeModel(V), "hello")
    with pytest.raises(RequestError, match="Unicode"):
        generate(FakeModel(vocab_size_of(byte_tokenizer_json()), tokenizer=tok), "a\ud800b")


def test_bad_weights_argument():
    with pytest.raises(RequestError, match="weights"):
        generate(42, PROMPT)
    with pytest.raises(GptevoError):
        generate("/nonexistent/model/dir", PROMPT)


def test_public_generate_is_this_function():
    m = FakeModel(V)
    assert gptevo.generate(m, PROMPT, max_new_tokens=5, temperature=0) == \
        generate(m, PROMPT, max_new_tokens=5, temperature=0)
    assert gptevo.NumericalError is NumericalError


@settings(max_examples=40)
@given(st.lists(st.one_of(st.integers(0, 255), st.sampled_from(list(b"ab. \xc3\xa9\xe2\x82\xac"))), min_size=1,
                max_size=24),
       st.one_of(st.none(), st.sampled_from([".", "ab", "b.", " a", "\u00e9"])))
def test_stream_equals_text_equals_lossy_decode_of_the_bytes(tok, script, stop):
    """Any byte sequence the model emits: stream == non-stream == the UTF-8 (lossy) decode of those
    bytes, cut before the first stop string."""
    eos = tok.token_to_id("<|endoftext|>")
    make = lambda: ScriptedModel(vocab_size_of(byte_tokenizer_json()), script, after=eos, eos=(eos,),  # noqa
                                 tokenizer=tok, context=64)
    full = bytes(script).decode("utf-8", errors="replace")
    want = full if stop is None or stop not in full else full[:full.index(stop)]
    kw = dict(max_new_tokens=30, temperature=0, stop=stop)
    pieces = list(generate(make(), "x", stream=True, **kw))
    assert "".join(pieces) == generate(make(), "x", **kw) == want

