"""repetition_penalty, min_p, max_new_tokens=None, generation_config.json defaults, per-sequence state,
and the device sampler's host fallback.

Expected values are worked out by hand in the comments (small logit rows whose softmax is written
down), or come from Hugging Face's own logits processors when transformers is installed; never from
the sampler under test.
"""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

import gptevo
from gptevo.errors import ConfigError, RequestError
from gptevo.generation import (Sampling, TokenSampler, Timings, apply_repetition_penalty, check_sampling,
                               generate, sample_token, sampling_for, token_distribution)

from _gen_fakes import FakeModel

V = 40
PROMPT = [5, 9, 2, 17]


class FixedDraws:
    """A stand-in for np.random.Generator whose ``random()`` returns the given values in turn."""

    def __init__(self, *values):
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


# -- repetition_penalty ------------------------------------------------------------------------------
def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    z = np.array([2.0, -1.0, 0.5, 3.0, 0.0])
    # seen ids 0, 1 and 4 (0 twice): 2 / 2 = 1, -1 * 2 = -2, 0 stays 0; ids 2 and 3 unseen
    out = apply_repetition_penalty(z, [0, 1, 0, 4], 2.0)
    assert out.tolist() == [1.0, -2.0, 0.5, 3.0, 0.0]
    assert z.tolist() == [2.0, -1.0, 0.5, 3.0, 0.0]                     # the input is not modified
    # a penalty below 1 favours seen tokens: 1 / 0.5 = 2, -4 * 0.5 = -2
    assert apply_repetition_penalty(np.array([1.0, -4.0]), {0, 1}, 0.5).tolist() == [2.0, -2.0]


def test_repetition_penalty_changes_the_greedy_choice():
    z = np.array([2.0, -1.0, 1.5])
    plain = Sampling(temperature=0.0)
    penalized = Sampling(temperature=0.0, repetition_penalty=2.0)
    assert sample_token(z, plain, None, seen=[0]) == 0                  # penalty off: argmax 2.0
    assert sample_token(z, penalized, None, seen=[0, 0]) == 2           # 2.0 / 2 = 1.0 < 1.5 (once, not 0.5)
    assert sample_token(z, penalized, None, seen=[1]) == 0              # only id 1 penalized


def test_repetition_penalty_in_the_sampled_distribution():
    # logits [ln 2, ln 2] with id 0 seen and p = 2: ln2 / 2 = ln sqrt2; probabilities sqrt2 : 2
    z = np.log([2.0, 2.0])
    ids, p = token_distribution(z, Sampling(temperature=1.0, repetition_penalty=2.0), seen=[0])
    assert ids.tolist() == [0, 1]
    want = np.array([math.sqrt(2), 2.0]) / (math.sqrt(2) + 2.0)
    np.testing.assert_allclose(p, want, rtol=1e-12)


def test_generate_penalizes_the_prompt_and_generated_tokens():
    """Greedy with repetition_penalty equals a greedy re-run that applies the HF rule by hand."""
    m = FakeModel(V)
    got = generate(m, PROMPT, max_new_tokens=12, temperature=0, repetition_penalty=1.7)
    seq = list(PROMPT)
    for _ in range(12):
        z = m.logits(seq)[-1].astype(np.float64)
        for t in set(seq):
            z[t] = z[t] / 1.7 if z[t] > 0 else z[t] * 1.7
        seq.append(int(np.argmax(z)))
    assert got == seq[len(PROMPT):]
    assert got != generate(m, PROMPT, max_new_tokens=12, temperature=0)   # the penalty matters here


# -- min_p -----------------------------------------------------------------------------------------
def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability():
    z = np.log([0.5, 0.3, 0.15, 0.05])
    # min_p 0.2: threshold 0.2 * 0.5 = 0.1 keeps 0.5, 0.3, 0.15 and drops 0.05
    ids, p = token_distribution(z, Sampling(temperature=1.0, min_p=0.2))
    assert ids.tolist() == [0, 1, 2]
    np.testing.assert_allclose(p, np.array([0.5, 0.3, 0.15]) / 0.95, rtol=1e-12)
    # the draw u = 0.96 lands on id 3 without min_p (cum 0.5, 0.8, 0.95, 1) and on id 2 with it
    # (cum 0.526, 0.842, 1)
    assert sample_token(z, Sampling(temperature=1.0), FixedDraws(0.96)) == 3
    assert sample_token(z, Sampling(temperature=1.0, min_p=0.2), FixedDraws(0.96)) == 2


def test_min_p_acts_after_temperature_and_keeps_the_top_token():
    z = np.log([0.5, 0.3, 0.15, 0.05])
    # temperature 0.5 squares the ratios: 1, 0.36, 0.09, 0.01 of the top; min_p 0.2 keeps two
    ids, _ = token_distribution(z, Sampling(temperature=0.5, min_p=0.2))
    assert ids.tolist() == [0, 1]
    ids, p = token_distribution(z, Sampling(temperature=1.0, min_p=1.0))
    assert ids.tolist() == [0] and p.tolist() == [1.0]


def test_processors_agree_with_hugging_face():
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(0)
    for trial in range(20):
        z = rng.normal(scale=3.0, size=50)
        seen = rng.integers(0, 50, size=12)
        penalty = float(rng.choice([0.6, 1.3, 2.5]))
        hf = lp.RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(seen)[None], torch.tensor(z)[None])[0]
        np.testing.assert_allclose(apply_repetition_penalty(z, seen, penalty), hf.numpy(), rtol=1e-12)
        min_p, temperature = float(rng.choice([0.05, 0.2, 0.6])), float(rng.choice([0.5, 1.0, 1.7]))
        scores = torch.tensor(z / temperature)[None]
        kept = lp.MinPLogitsWarper(min_p)(torch.tensor([[0]]), scores)[0]
        ids, _ = token_distribution(z, Sampling(temperature=temperature, min_p=min_p))
        assert ids.tolist() == np.flatnonzero(np.isfinite(kept.numpy())).tolist(), trial


# -- checks ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, name", [
    (dict(min_p=-0.1), "min_p"), (dict(min_p=1.5), "min_p"), (dict(min_p=float("nan")), "min_p"),
    (dict(min_p="0.1"), "min_p"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(repetition_penalty=True), "repetition_penalty"),
])
def test_bad_new_parameters_name_themselves(kw, name):
    with pytest.raises(RequestError, match=name):
        check_sampling(1.0, **kw)
    with pytest.raises(RequestError, match=name):
        generate(FakeModel(V), PROMPT, max_new_tokens=2, **kw)


# -- max_new_tokens=None ---------------------------------------------------------------------------
def test_max_new_tokens_none_runs_to_the_end_of_the_context():
    m = FakeModel(V, context=16)
    new = generate(m, PROMPT, max_new_tokens=None, temperature=0)
    assert len(new) == 16 - len(PROMPT)                                  # no eos: until the context is full
    assert m.forward_sizes == [len(PROMPT)] + [1] * (len(new) - 1)


def test_max_new_tokens_none_stops_at_eos():
    m = FakeModel(V, context=64)
    first = generate(m, PROMPT, max_new_tokens=1, temperature=0)[0]
    m.config = m.config.replace(eos_token_ids=(first,))
    assert generate(m, PROMPT, max_new_tokens=None, temperature=0) == [first]


def test_max_new_tokens_none_with_a_full_prompt_is_an_error():
    m = FakeModel(V, context=8)
    with pytest.raises(RequestError, match="fills the model's context of 8"):
        generate(m, list(range(8)), max_new_tokens=None)


# -- generation_config.json defaults ---------------------------------------------------------------
def _model_with_generation_config(tmp_path, values: dict) -> FakeModel:
    (tmp_path / "generation_config.json").write_text(json.dumps(values))
    m = FakeModel(V)
    m.path = str(tmp_path)
    return m


def test_generation_config_supplies_defaults_and_arguments_win(tmp_path):
    m = _model_with_generation_config(tmp_path, {"temperature": 0.7, "top_k": 5, "top_p": 0.9, "min_p": 0.05,
                                                 "repetition_penalty": 1.3, "do_sample": True, "eos_token_id": 3})
    assert sampling_for(m) == Sampling(0.7, 5, 0.9, None, 0.05, 1.3)
    assert sampling_for(m, temperature=1.0, top_k=0, seed=4) == Sampling(1.0, 0, 0.9, 4, 0.05, 1.3)
    assert sampling_for(m, top_p=1.0, min_p=0.0, repetition_penalty=1.0) == Sampling(0.7, 5, 1.0, None, 0.0, 1.0)
    # generate uses them: the defaults give the same tokens as the same values passed explicitly
    explicit = dict(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.3)
    assert generate(m, PROMPT, max_new_tokens=8, seed=2) == \
        generate(FakeModel(V), PROMPT, max_new_tokens=8, seed=2, **explicit)


def test_do_sample_false_makes_greedy_the_default(tmp_path):
    m = _model_with_generation_config(tmp_path, {"do_sample": False, "temperature": 0.6})
    assert sampling_for(m).greedy
    assert generate(m, PROMPT, max_new_tokens=6, seed=1) == generate(FakeModel(V), PROMPT, max_new_tokens=6,
                                                                    temperature=0)
    assert sampling_for(m, temperature=0.8).temperature == 0.8


def test_no_generation_config_means_the_built_in_defaults(tmp_path):
    m = FakeModel(V)
    m.path = str(tmp_path)                                               # a directory without the file
    assert sampling_for(m) == Sampling(1.0, 0, 1.0, None, 0.0, 1.0)
    m2 = _model_with_generation_config(tmp_path, {"top_k": 10_000})      # larger than the vocabulary: off
    assert sampling_for(m2).top_k == 0


@pytest.mark.parametrize("values, field", [
    ({"temperature": -1}, "temperature"), ({"top_k": 2.5}, "top_k"), ({"top_p": 0}, "top_p"),
    ({"min_p": 2}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty"), ({"temperature": "hot"}, "temperature"),
    ({"do_sample": "yes"}, "do_sample"),
])
def test_bad_generation_config_names_the_file_and_field(tmp_path, values, field):
    m = _model_with_generation_config(tmp_path, values)
    with pytest.raises(ConfigError, match=f"generation_config.json: field '{field}'"):
        generate(m, PROMPT, max_new_tokens=2)


def test_bundled_generation_config_is_read():
    from gptevo.generation_config import read_defaults

    bundled = gptevo.load()
    assert sampling_for(bundled) == check_sampling(vocab_size=4096, seed=None, **read_defaults(bundled.path))
    assert read_defaults(bundled.path), "the bundled model ships sampling defaults"


# -- per-sequence state ----------------------------------------------------------------------------
def test_token_samplers_keep_their_state_apart():
    """Two sequences stepped in turns give what each gives alone (generator and seen ids per sequence)."""
    rows = np.random.default_rng(1).normal(size=(2, 6, V))
    s = Sampling(temperature=0.9, repetition_penalty=1.5, min_p=0.05, seed=7)

    def alone(row_set, prompt):
        sampler = TokenSampler(s, prompt)
        return [sampler(r) for r in row_set]

    a, b = TokenSampler(s, [1, 2]), TokenSampler(s, [3])
    together = [(a(rows[0][i]), b(rows[1][i])) for i in range(6)]
    assert [x for x, _ in together] == alone(rows[0], [1, 2])
    assert [y for _, y in together] == alone(rows[1], [3])


def test_timings_count_the_prompt_and_new_tokens():
    t = Timings()
    new = generate(FakeModel(V), PROMPT, max_new_tokens=5, temperature=0, timings=t)
    assert (t.prompt_tokens, t.new_tokens, t.decode_steps) == (len(PROMPT), len(new), len(new) - 1)
    assert t.prompt_s > 0 and t.decode_s > 0


# -- device sampling falls back to the host for rules its kernel lacks -------------------------------
class _DeviceArrays:
    """The array functions of a fake device backend whose sampling kernel handles temperature/top-k/top-p."""

    def __init__(self):
        self.kernel_calls = 0
        self.downloads = 0

    def to_host(self, a):
        self.downloads += 1
        return np.asarray(a)

    def sample_token(self, row, temperature, top_k, top_p, u):
        self.kernel_calls += 1
        return sample_token(np.asarray(row), Sampling(temperature, top_k, top_p), FixedDraws(u)), -1


class _DeviceModel(FakeModel):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.arrays = _DeviceArrays()
        self.backend = SimpleNamespace(name="fake-device", arrays=self.arrays)

    def forward_on_backend(self, ids, cache, logits="all"):
        return self.forward(ids, cache)


@pytest.mark.parametrize("kw", [dict(min_p=0.1), dict(repetition_penalty=1.4),
                                dict(temperature=0, repetition_penalty=1.4)])
def test_device_sampler_hands_unsupported_rules_to_the_host(kw):
    m = _DeviceModel(V)
    args = dict(temperature=0.8, seed=3, **kw) if "temperature" not in kw else dict(seed=3, **kw)
    got = generate(m, PROMPT, max_new_tokens=8, **args)
    assert m.arrays.kernel_calls == 0 and m.arrays.downloads == len(got)
    assert got == generate(FakeModel(V), PROMPT, max_new_tokens=8, **args)


def test_device_sampler_still_used_for_the_rules_it_has():
    m = _DeviceModel(V)
    got = generate(m, PROMPT, max_new_tokens=8, temperature=0.8, top_k=10, seed=3)
    assert m.arrays.kernel_calls == len(got) and m.arrays.downloads == 0
    assert got == generate(FakeModel(V), PROMPT, max_new_tokens=8, temperature=0.8, top_k=10, seed=3)
