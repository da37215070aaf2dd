"""Embedding lookups, the sinusoidal table and ALiBi, checked against hand-written formulas."""
import math

import ml_dtypes
import numpy as np
import pytest

from gptevo.errors import RequestError
from gptevo.ops import REGISTRY
from gptevo.ops.embedding import (alibi_bias, alibi_slopes, embedding, learned_positions,
                                  sinusoidal_positions)

OPS = ["embedding", "learned_positions", "sinusoidal_positions", "alibi_slopes", "alibi_bias"]


@pytest.mark.parametrize("name", OPS)
def test_cases_are_well_formed(name):
    spec = REGISTRY[name]
    cases = list(spec.cases(np.random.default_rng(0)))
    assert 4 <= len(cases) <= 10
    assert len({c.label for c in cases}) == len(cases)
    for c in cases:
        out = spec.reference(**c.kwargs)
        assert np.all(np.isfinite(out))


# --- embedding / learned_positions -------------------------------------------------------------

def test_embedding_rows_match_a_loop():
    rng = np.random.default_rng(1)
    table = rng.standard_normal((10, 6)).astype(np.float32)
    ids = np.array([3, 0, 9, 3])
    out = embedding(table=table, ids=ids)
    assert out.shape == (4, 6) and out.dtype == np.float32
    for t, i in enumerate([3, 0, 9, 3]):
        assert np.array_equal(out[t], table[i])


def test_embedding_widens_bf16_exactly_and_keeps_f64():
    table = np.array([[1.0, -2.5], [0.15625, 3.0]], dtype=ml_dtypes.bfloat16)
    out = embedding(table=table, ids=np.array([1]))
    assert out.dtype == np.float32
    assert out.tolist() == [[0.15625, 3.0]]
    assert embedding(table=np.eye(3), ids=np.array([2])).dtype == np.float64


@pytest.mark.parametrize("bad", [[5], [-1], [0, 7]])
def test_embedding_rejects_ids_out_of_range(bad):
    with pytest.raises(RequestError, match=r"ids\[\d\] = -?\d+ is outside \[0, 5\)"):
        embedding(table=np.zeros((5, 2), np.float32), ids=np.array(bad))


def test_embedding_rejects_float_ids_and_bad_table():
    with pytest.raises(RequestError, match="integers"):
        embedding(table=np.zeros((5, 2), np.float32), ids=np.array([1.0]))
    with pytest.raises(RequestError, match="2-D"):
        embedding(table=np.zeros(5, np.float32), ids=np.array([1]))


def test_learned_positions_lookup_and_no_extrapolation():
    table = np.arange(12, dtype=np.float32).reshape(4, 3)
    assert learned_positions(table=table, positions=np.array([2, 3])).tolist() == [[6, 7, 8], [9, 10, 11]]
    with pytest.raises(RequestError, match="max_position_embeddings"):
        learned_positions(table=table, positions=np.array([4]))


# --- sinusoidal ---------------------------------------------------------------------------------

def test_sinusoidal_position_zero_is_sin0_cos0():
    out = sinusoidal_positions(positions=np.array([0]), dim=8)
    assert out.dtype == np.float32 and out.shape == (1, 8)
    assert out[0].tolist() == [0, 1, 0, 1, 0, 1, 0, 1]


def test_sinusoidal_position_one_known_values():
    out = sinusoidal_positions(positions=np.array([1]), dim=4, dtype="float64")[0]
    # dim 4, base 10000: pair 0 has frequency 1, pair 1 has 10000^(-2/4) = 1/100.
    expected = [math.sin(1.0), math.cos(1.0), math.sin(0.01), math.cos(0.01)]
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-15)
    assert expected[0] == pytest.approx(0.8414709848078965)


def test_sinusoidal_matches_paper_formula_loop_including_odd_dim():
    positions = np.array([0, 3, 17, 250])
    for dim, base in [(6, 10000.0), (7, 10000.0), (12, 500.0)]:
        out = sinusoidal_positions(positions=positions, dim=dim, base=base, dtype="float64")
        assert out.shape == (4, dim)
        for r, pos in enumerate(positions):
            for j in range(dim):
                i = j // 2
                angle = pos / base ** (2 * i / dim)
                want = math.sin(angle) if j % 2 == 0 else math.cos(angle)
                assert out[r, j] == pytest.approx(want, abs=1e-13)


@pytest.mark.parametrize("kwargs", [{"dim": 0}, {"dim": 2.0}, {"dim": 4, "dtype": "float16"},
                                    {"dim": 4, "dtype": None}, {"dim": 4, "base": -1.0}])
def test_sinusoidal_rejects_bad_arguments(kwargs):
    with pytest.raises(RequestError):
        sinusoidal_positions(positions=np.arange(3), **kwargs)


# --- ALiBi --------------------------------------------------------------------------------------

def test_alibi_slopes_8_heads_are_powers_of_one_half():
    assert alibi_slopes(8).tolist() == [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256]
    assert alibi_slopes(8).dtype == np.float64


def test_alibi_slopes_16_heads_start_at_2_to_minus_half():
    np.testing.assert_allclose(alibi_slopes(16), [2.0 ** (-0.5 * (h + 1)) for h in range(16)], rtol=1e-15)


def test_alibi_slopes_12_heads_follow_the_non_power_of_two_rule():
    # 8-head slopes, then every other slope of the 16-head sequence: 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5.
    expected = [2.0 ** -k for k in range(1, 9)] + [2.0 ** -0.5, 2.0 ** -1.5, 2.0 ** -2.5, 2.0 ** -3.5]
    np.testing.assert_allclose(alibi_slopes(12), expected, rtol=1e-15)


def _paper_slopes(n):
    """The published recursion (Press et al., official get_slopes), restated: start = ratio = 2^(-8/n)."""
    def power_of_two(n):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_two(n)
    m = 2 ** math.floor(math.log2(n))
    return power_of_two(m) + _paper_slopes(2 * m)[0::2][: n - m]


@pytest.mark.parametrize("n", list(range(1, 41)) + [64, 96, 100])
def test_alibi_slopes_match_the_published_recursion(n):
    np.testing.assert_allclose(alibi_slopes(n), _paper_slopes(n), rtol=1e-13)


@pytest.mark.parametrize("bad", [0, -4, 2.0, True, "8"])
def test_alibi_slopes_rejects_bad_head_counts(bad):
    with pytest.raises(RequestError, match="num_heads"):
        alibi_slopes(bad)


def test_alibi_bias_matches_loop_and_decode_row():
    slopes = alibi_slopes(4)
    q, k = np.arange(5), np.arange(5)
    out = alibi_bias(slopes=slopes, q_positions=q, k_positions=k)
    assert out.shape == (4, 5, 5) and out.dtype == np.float64
    for h in range(4):
        for i in range(5):
            for j in range(5):
                assert out[h, i, j] == -slopes[h] * (i - j)
    # visible keys (j <= i): non-positive and linear in distance
    assert np.all(out[:, np.tril_indices(5)[0], np.tril_indices(5)[1]] <= 0)
    # decode step at position 4 reproduces the last prefill row
    step = alibi_bias(slopes=slopes, q_positions=np.array([4]), k_positions=k)
    assert np.array_equal(step[:, 0], out[:, 4])


def test_alibi_bias_dtype_follows_slopes():
    out = alibi_bias(slopes=alibi_slopes(2).astype(np.float32), q_positions=np.arange(2), k_positions=np.arange(3))
    assert out.dtype == np.float32 and out.shape == (2, 2, 3)
    with pytest.raises(RequestError, match="slopes"):
        alibi_bias(slopes=np.ones((2, 2)), q_positions=np.arange(2), k_positions=np.arange(2))
