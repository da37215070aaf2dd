"""RoPE: frequencies per scaling rule, the cos/sin table, and the rotation.

Expected values come from independent float64 formulas written here, from published numbers
(gpt-oss YaRN, Llama 3.1), or from properties (relative positions, norms, pairing permutation).
"""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from gptevo.errors import ConfigError, RequestError
from gptevo.ops.rope import apply_rope, rope_cos_sin, rope_frequencies

GPT_OSS_YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "original_max_position_embeddings": 4096, "truncate": False}
LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}


def plain_inv_freq(theta, dim):
    """theta ** (-2i/dim) in float64."""
    return np.array([theta ** (-2.0 * i / dim) for i in range(dim // 2)])


def rotate(x, positions, theta=10000.0, interleaved=False, rotary_dim=None, dtype=np.float64):
    inv, factor = rope_frequencies(x.shape[-1], theta, rotary_dim=rotary_dim)
    cos, sin = rope_cos_sin(np.asarray(positions), inv.astype(dtype), factor)
    return apply_rope(x, cos, sin, interleaved=interleaved)


# ---------------------------------------------------------------------------- properties
rope_layouts = st.sampled_from([(8, None), (16, 16), (12, 6), (10, 4), (6, 2)])   # (Dh, R)


@given(layout=rope_layouts, interleaved=st.booleans(), p=st.integers(0, 3000), m=st.integers(0, 3000),
       shift=st.integers(-500, 3000), seed=st.integers(0, 2**16))
def test_scores_depend_only_on_relative_distance(layout, interleaved, p, m, shift, seed):
    dh, r = layout
    p2, m2 = max(p + shift, 0), max(m + shift, 0)
    shift = (p2 - p) if (p2 - p) == (m2 - m) else 0
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, 1, 1, dh))
    s1 = np.sum(rotate(q, [p], interleaved=interleaved, rotary_dim=r)
                * rotate(k, [m], interleaved=interleaved, rotary_dim=r))
    s2 = np.sum(rotate(q, [p + shift], interleaved=interleaved, rotary_dim=r)
                * rotate(k, [m + shift], interleaved=interleaved, rotary_dim=r))
    assert s1 == pytest.approx(s2, abs=1e-9 * (1 + abs(s1)))


@given(layout=rope_layouts, interleaved=st.booleans(), seed=st.integers(0, 2**16))
def test_rotation_changes_scores_for_different_distances(layout, interleaved, seed):
    # guards the test above against a no-op rotation
    dh, r = layout
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, 1, 1, dh))
    s = [np.sum(rotate(q, [d], interleaved=interleaved, rotary_dim=r) * rotate(k, [0], interleaved=interleaved,
                                                                              rotary_dim=r)) for d in (0, 1)]
    assert abs(s[0] - s[1]) > 1e-6


@given(layout=rope_layouts, interleaved=st.booleans(), seed=st.integers(0, 2**16), p=st.integers(0, 10**5))
def test_rotation_keeps_norms_and_passes_the_rest_through(layout, interleaved, seed, p):
    dh, r = layout
    r = dh if r is None else r
    x = np.random.default_rng(seed).standard_normal((3, 2, dh))
    y = rotate(x, [p, p + 1, p + 7], interleaved=interleaved, rotary_dim=r)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-12)
    np.testing.assert_array_equal(y[..., r:], x[..., r:])                 # partial rotary: untouched
    if p > 0:
        assert not np.allclose(y[..., :r], x[..., :r])


@given(layout=rope_layouts, seed=st.integers(0, 2**16))
def test_interleaved_and_half_split_differ_by_a_fixed_permutation(layout, seed):
    dh, r = layout
    r = dh if r is None else r
    half = r // 2
    # half-split pairs (i, i+R/2); interleaved pairs (2i, 2i+1): perm puts pair i at dims 2i, 2i+1
    perm = np.concatenate([np.stack([np.arange(half), np.arange(half) + half], axis=1).ravel(),
                           np.arange(r, dh)])
    x = np.random.default_rng(seed).standard_normal((4, 3, dh)).astype(np.float32)
    rng = np.random.default_rng(seed + 1)
    ang = rng.uniform(-4, 4, (4, half))
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    half_split = apply_rope(x, cos, sin, interleaved=False)
    inter = apply_rope(x[..., perm], cos, sin, interleaved=True)
    np.testing.assert_array_equal(inter, half_split[..., perm])
    if half > 1:  # with a single pair (R=2) the two conventions coincide
        assert not np.allclose(apply_rope(x, cos, sin, interleaved=True), half_split)


def test_known_rotation_of_unit_vectors():
    ang = np.array([[0.3, 1.1]])                                   # T=1, R/2 = 2, Dh = 4
    cos, sin = np.cos(ang), np.sin(ang)
    e0 = np.array([[[1.0, 0, 0, 0]]])
    # half-split: dim 0 pairs with dim 2 (angle 0.3)
    np.testing.assert_allclose(apply_rope(e0, cos, sin)[0, 0], [math.cos(0.3), 0, math.sin(0.3), 0], atol=1e-15)
    # interleaved: dim 0 pairs with dim 1 (angle 0.3); dim 2 with dim 3 (angle 1.1)
    e2 = np.array([[[0, 0, 1.0, 0]]])
    np.testing.assert_allclose(apply_rope(e2, cos, sin, interleaved=True)[0, 0],
                               [0, 0, math.cos(1.1), math.sin(1.1)], atol=1e-15)


def test_apply_rope_dtypes_and_errors():
    x = np.ones((2, 3, 8), np.float32)
    cos, sin = np.ones((2, 4), np.float64), np.zeros((2, 4), np.float64)
    assert apply_rope(x, cos, sin).dtype == np.float32
    assert apply_rope(x.astype(np.float64), cos, sin).dtype == np.float64
    with pytest.raises(RequestError, match="head_dim"):
        apply_rope(x, np.ones((2, 5)), np.ones((2, 5)))
    with pytest.raises(RequestError, match="cos and sin"):
        apply_rope(x, np.ones((3, 4)), np.ones((3, 4)))
    with pytest.raises(RequestError, match=r"\[T,H,Dh\]"):
        apply_rope(x[0], cos, sin)


# ---------------------------------------------------------------------------- cos/sin table
def test_cos_sin_match_float64_formula_and_carry_the_factor():
    inv, _ = rope_frequencies(64, 10000.0)
    pos = np.array([0, 1, 17, 511, 4095])
    cos, sin = rope_cos_sin(pos, inv, attention_factor=1.25)
    assert cos.dtype == sin.dtype == np.float32 and cos.shape == (5, 32)
    ang = pos[:, None] * plain_inv_freq(10000.0, 64)[None, :]
    # float32 inv_freq (rel 6e-8) times positions < 4096 puts the angle within ~2.5e-4 of exact
    np.testing.assert_allclose(cos, 1.25 * np.cos(ang), atol=4e-4)
    np.testing.assert_allclose(sin, 1.25 * np.sin(ang), atol=4e-4)
    np.testing.assert_allclose(cos[:2], 1.25 * np.cos(ang[:2]), atol=1e-6)


def test_cos_sin_float32_angle_is_the_float32_product():
    inv = np.array([0.123456789, 1.0e-3], dtype=np.float32)
    cos, _ = rope_cos_sin(np.array([3001]), inv)
    angle32 = np.float32(3001) * inv                                     # rounded once in float32
    np.testing.assert_allclose(cos[0], np.cos(angle32.astype(np.float64)), rtol=0, atol=6e-8)


def test_cos_sin_rejects_bad_positions():
    with pytest.raises(RequestError, match="positions"):
        rope_cos_sin(np.array([0.5]), np.ones(2, np.float32))
    with pytest.raises(RequestError, match="inv_freq"):
        rope_cos_sin(np.array([1]), np.ones((2, 2), np.float32))


# ---------------------------------------------------------------------------- frequencies
def test_default_rule_matches_float64_formula():
    for theta, dim in [(10000.0, 64), (500000.0, 128), (1e6, 10)]:
        inv, factor = rope_frequencies(dim, theta)
        assert inv.dtype == np.float32 and inv.shape == (dim // 2,) and factor == 1.0
        # the float32 exponent 2i/R (as HF forms it) costs up to ~4e-7 relative for odd R/2
        np.testing.assert_allclose(inv, plain_inv_freq(theta, dim), rtol=1e-6)


def test_partial_rotary_uses_rotary_dim():
    inv, _ = rope_frequencies(32, 10000.0, rotary_dim=16)
    np.testing.assert_allclose(inv, plain_inv_freq(10000.0, 16), rtol=2e-7)
    for bad in (0, 7, 34):
        with pytest.raises(ConfigError, match="rotary_dim"):
            rope_frequencies(32, 10000.0, rotary_dim=bad)


def yarn_float64(dim, theta, factor, beta_fast, beta_slow, original, truncate):
    """YaRN NTK-by-parts from the paper / gpt-oss code, in float64; returns inv, low, high, keep-mask."""
    def correction(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low, high = correction(beta_fast), correction(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    freq = np.array([theta ** (2.0 * i / dim) for i in range(dim // 2)])
    keep = 1 - np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
    return (1 / (factor * freq)) * (1 - keep) + (1 / freq) * keep, low, high, keep


def test_yarn_gpt_oss_known_answer():
    inv, concentration = rope_frequencies(64, 150000.0, scaling=GPT_OSS_YARN)
    ref, low, high, keep = yarn_float64(64, 150000.0, 32.0, 32.0, 1.0, 4096, truncate=False)
    # the published numbers (facts/gptoss.md §2.3) pin the independent formula
    assert low == pytest.approx(8.092779, abs=1e-6) and high == pytest.approx(17.398025, abs=1e-6)
    published_mask = [1.0] * 9 + [.9025, .7950, .6876, .5801, .4726, .3652, .2577, .1502, .0428] + [0.0] * 14
    np.testing.assert_allclose(keep, published_mask, atol=5e-5)
    assert concentration == pytest.approx(1.3465736, abs=1e-7)
    assert concentration == pytest.approx(0.1 * math.log(32) + 1, rel=1e-15)
    np.testing.assert_allclose(inv, ref, rtol=3e-7)
    # the mask read back from the code's frequencies: keep = (inv - inv/s) / (inv_orig - inv/s)
    orig = 1 / np.array([150000.0 ** (2.0 * i / 64) for i in range(32)])
    np.testing.assert_allclose((inv - orig / 32) / (orig - orig / 32), published_mask, atol=5e-5)


def test_yarn_truncate_defaults_to_true_and_floors_the_bounds():
    no_trunc = {k: v for k, v in GPT_OSS_YARN.items() if k != "truncate"}
    inv, _ = rope_frequencies(64, 150000.0, scaling=no_trunc)
    ref, low, high, _ = yarn_float64(64, 150000.0, 32.0, 32.0, 1.0, 4096, truncate=True)
    assert (low, high) == (8, 18)
    np.testing.assert_allclose(inv, ref, rtol=3e-7)
    assert not np.allclose(inv, rope_frequencies(64, 150000.0, scaling=GPT_OSS_YARN)[0], rtol=1e-3)


def test_yarn_attention_factor_rules():
    base = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    assert rope_frequencies(32, 1e6, scaling=base)[1] == pytest.approx(0.1 * math.log(4) + 1)
    assert rope_frequencies(32, 1e6, scaling={**base, "attention_factor": 0.5})[1] == 0.5
    same = {**base, "mscale": 0.707, "mscale_all_dim": 0.707}
    assert rope_frequencies(32, 1e6, scaling=same)[1] == pytest.approx(1.0)
    mixed = {**base, "mscale": 1.0, "mscale_all_dim": 0.5}
    assert rope_frequencies(32, 1e6, scaling=mixed)[1] == pytest.approx(
        (0.1 * math.log(4) + 1) / (0.05 * math.log(4) + 1))
    assert rope_frequencies(32, 1e6, scaling={**base, "factor": 1.0})[1] == 1.0


def test_llama3_rule_from_published_parameters():
    inv, factor = rope_frequencies(128, 500000.0, scaling=LLAMA31)
    assert factor == 1.0
    base = plain_inv_freq(500000.0, 128)
    wavelen = 2 * math.pi / base
    expected = []
    for f, wl in zip(base, wavelen):
        if wl < 8192 / 4.0:            # high frequency: kept
            expected.append(f)
        elif wl > 8192 / 1.0:          # low frequency: divided by 8
            expected.append(f / 8.0)
        else:                          # blended
            smooth = (8192 / wl - 1.0) / (4.0 - 1.0)
            expected.append((1 - smooth) * f / 8.0 + smooth * f)
    expected = np.array(expected)
    np.testing.assert_allclose(inv, expected, rtol=1e-6)
    # all three bands are populated by these parameters
    assert (wavelen < 2048).sum() > 0 and (wavelen > 8192).sum() > 0
    assert ((wavelen >= 2048) & (wavelen <= 8192)).sum() > 0


def test_linear_rule_divides_positions_by_factor():
    inv, _ = rope_frequencies(32, 10000.0, scaling={"rope_type": "linear", "factor": 4.0})
    pos = np.arange(0, 400, 7)
    cos, sin = rope_cos_sin(pos, inv)
    ang = (pos[:, None] / 4.0) * plain_inv_freq(10000.0, 32)[None, :]
    np.testing.assert_allclose(cos, np.cos(ang), atol=3e-6)
    np.testing.assert_allclose(sin, np.sin(ang), atol=3e-6)


def test_legacy_type_key_is_read():
    a = rope_frequencies(16, 10000.0, scaling={"type": "linear", "factor": 2.0})[0]
    np.testing.assert_allclose(a, plain_inv_freq(10000.0, 16) / 2, rtol=2e-7)


def test_dynamic_ntk_equals_default_up_to_max_positions_and_grows_beyond():
    scaling = {"rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": 2048}
    default = rope_frequencies(64, 10000.0)[0]
    for seq_len in (None, 1, 100, 2048):
        np.testing.assert_array_equal(rope_frequencies(64, 10000.0, scaling=scaling, seq_len=seq_len)[0], default)
    grown = rope_frequencies(64, 10000.0, scaling=scaling, seq_len=4096)[0]
    base = 10000.0 * ((2.0 * 4096 / 2048) - (2.0 - 1)) ** (64 / 62)
    np.testing.assert_allclose(grown, plain_inv_freq(base, 64), rtol=2e-7)
    assert grown[0] == default[0] and np.all(grown[1:] < default[1:])


def test_longrope_switches_factors_after_original_length():
    short = [1.0, 1.1, 1.2, 1.5]
    long = [1.0, 1.5, 2.0, 3.0]
    scaling = {"rope_type": "longrope", "short_factor": short, "long_factor": long,
               "original_max_position_embeddings": 64, "max_position_embeddings": 256}
    base = plain_inv_freq(10000.0, 8)
    inv_s, af = rope_frequencies(8, 10000.0, scaling=scaling, seq_len=64)
    inv_l, _ = rope_frequencies(8, 10000.0, scaling=scaling, seq_len=65)
    np.testing.assert_allclose(inv_s, base / short, rtol=3e-7)
    np.testing.assert_allclose(inv_l, base / long, rtol=3e-7)
    assert af == pytest.approx(math.sqrt(1 + math.log(4) / math.log(64)))


def test_unknown_rule_and_bad_fields_raise_config_error():
    with pytest.raises(ConfigError, match="'ntk-by-parts-v9'"):
        rope_frequencies(64, 10000.0, scaling={"rope_type": "ntk-by-parts-v9"})
    with pytest.raises(ConfigError, match="'factor'"):
        rope_frequencies(64, 10000.0, scaling={"rope_type": "linear"})
    with pytest.raises(ConfigError, match="low_freq_factor"):
        rope_frequencies(64, 10000.0, scaling={**LLAMA31, "low_freq_factor": "1"})
    with pytest.raises(ConfigError, match="rope_theta"):
        rope_frequencies(64, -1.0)
    with pytest.raises(ConfigError, match="truncate"):
        rope_frequencies(64, 150000.0, scaling={**GPT_OSS_YARN, "truncate": "no"})
    with pytest.raises(ConfigError, match="short_factor"):
        rope_frequencies(8, 1e4, scaling={"rope_type": "longrope", "short_factor": [1, "x", 1, 1],
                                          "long_factor": [1] * 4, "original_max_position_embeddings": 64})
    with pytest.raises(RequestError, match="seq_len"):
        rope_frequencies(64, 10000.0, seq_len=-1)


def test_scaling_accepts_model_config_pairs():
    pairs = tuple(sorted(GPT_OSS_YARN.items()))
    a = rope_frequencies(64, 150000.0, scaling=pairs)
    b = rope_frequencies(64, 150000.0, scaling=GPT_OSS_YARN)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]
