"""numba moe_experts for several tokens with MXFP4 experts (the grouped GEMM) vs the reference:
each weight row decoded once for all rows of a large group, the streaming GEMV for small groups,
both in one call."""
import numpy as np
import pytest

from gptevo import backends
from gptevo.ops.moe import moe_experts as reference_moe
from gptevo.ops.mxfp4 import Mxfp4Weight

pytestmark = pytest.mark.skipif("numba" not in backends.available(), reason="numba is not installed")


def _mxfp4(rng, *shape, scale_lo=118, scale_hi=126):
    *lead, k = shape
    return Mxfp4Weight(rng.integers(0, 256, (*lead, k // 32, 16), dtype=np.uint8),
                       rng.integers(scale_lo, scale_hi, (*lead, k // 32), dtype=np.uint8), name="w")


def _error(got, want):
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1.0))


@pytest.mark.parametrize("n_tokens,n_experts,k", [(2, 4, 2), (9, 4, 2), (33, 8, 4), (300, 6, 3)])
@pytest.mark.parametrize("activation", ["clamped_swiglu", "swiglu"])
def test_grouped_equals_reference(n_tokens, n_experts, k, activation):
    from gptevo.backends.numba import _moe_grouped
    rng = np.random.default_rng(n_tokens * 7 + k)
    d, i = 96, 64
    x = rng.standard_normal((n_tokens, d)).astype(np.float32)
    ids = np.stack([rng.permutation(n_experts)[:k] for _ in range(n_tokens)]).astype(np.int64)
    if n_tokens == 33:
        ids[:, 0] = 5                    # one expert in every token: a large group beside small ones
    w = rng.random((n_tokens, k)).astype(np.float32)
    kw = dict(x=x, weights=w, ids=ids, w_gate_up=_mxfp4(rng, n_experts, 2 * i, d),
              b_gate_up=rng.standard_normal((n_experts, 2 * i)).astype(np.float32),
              w_down=_mxfp4(rng, n_experts, d, i), b_down=rng.standard_normal((n_experts, d)).astype(np.float32),
              activation=activation)
    got = backends.get("numba").moe_experts(**kw)
    want = reference_moe(**kw)
    assert got.shape == want.shape and got.dtype == np.float32
    assert _error(got, want) < 1e-5
    counts = np.bincount(ids.ravel(), minlength=n_experts)
    if n_tokens >= 33:
        assert counts.max() >= _moe_grouped.TILE_MIN_ROWS        # the grouped (decode once) path ran
    if n_tokens <= 9:
        assert counts.min() < _moe_grouped.TILE_MIN_ROWS         # a streaming path ran (1 row: GEMV, 2-3: rows)


def test_scale_extremes_keep_the_reference_infinities_and_nans():
    rng = np.random.default_rng(1)
    n_t, n_e, k, d, i = 12, 2, 2, 64, 32
    gu = _mxfp4(rng, n_e, 2 * i, d)
    gu.scales[1, 3, 0] = 255                                  # a NaN block in expert 1
    kw = dict(x=rng.standard_normal((n_t, d)).astype(np.float32), weights=np.full((n_t, k), 0.5, np.float32),
              ids=np.tile(np.array([[0, 1]]), (n_t, 1)), w_gate_up=gu, b_gate_up=None,
              w_down=_mxfp4(rng, n_e, d, i), b_down=None, activation="swiglu")
    got = backends.get("numba").moe_experts(**kw)
    want = reference_moe(**kw)
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.isnan(want).any()


@pytest.mark.parametrize("g", [1, 3, 4, 5, 13])
@pytest.mark.parametrize("n_out", [8, 37])
def test_both_expert_kernels_equal_the_decoded_product(g, n_out):
    """The AVX-512 register tiles (``_moe_tiles``) and the portable kernel each equal x @ decode(W).T
    (both run here when the host has AVX-512, so the portable one stays tested on such hosts)."""
    from gptevo.backends.numba import _moe_grouped, _moe_tiles, _simd
    from gptevo.ops.mxfp4 import FP4_VALUES, mxfp4_decode
    rng = np.random.default_rng(g * 100 + n_out)
    k = 96
    w = _mxfp4(rng, 3, n_out, k)
    x = rng.standard_normal((g, k)).astype(np.float32)
    values, powers = FP4_VALUES.astype(np.float32), _moe_grouped._powers()
    want = x.astype(np.float64) @ mxfp4_decode(w.blocks[1], w.scales[1]).astype(np.float64).T     # [g,N]
    kernels = {"portable": lambda out: _moe_grouped.expert_rows_gemm(w.blocks, w.scales, 1, x, values, powers,
                                                                      out, 8)}
    if _simd.has_avx512():
        kernels["tiles"] = lambda out: _moe_tiles.expert_tiles_gemm(w.blocks, w.scales, 1, _moe_tiles.permute_rows(x),
                                                                    values, powers, out, 8)
    for name, run in kernels.items():
        out = np.full((g, n_out), np.nan, np.float32)
        run(out)
        assert _error(out, want) < 1e-5, name


@pytest.mark.parametrize("g", [1, 2, 3, 4])
def test_streamed_rows_kernel_equals_the_decoded_product(g):
    """``_moe_tiles.expert_rows_stream`` (2-3 rows of one expert in one pass, batched decode)."""
    from gptevo.backends.numba import _moe_grouped, _moe_tiles, _simd
    from gptevo.ops.mxfp4 import FP4_VALUES, mxfp4_decode
    if not _simd.has_avx512():
        pytest.skip("the streamed-rows kernel is AVX-512 only; other hosts use the per-row GEMV")
    rng = np.random.default_rng(g)
    w = _mxfp4(rng, 2, 37, 128)
    x = rng.standard_normal((g, 128)).astype(np.float32)
    out = np.full((g, 37), np.nan, np.float32)
    _moe_tiles.expert_rows_stream(w.blocks, w.scales, 1, _moe_tiles.permute_rows(x), FP4_VALUES.astype(np.float32),
                                  _moe_grouped._powers(), out, 16)
    want = x.astype(np.float64) @ mxfp4_decode(w.blocks[1], w.scales[1]).astype(np.float64).T
    assert _error(out, want) < 1e-5


def _region_case(rng, sizes, n_experts=8, d=160, i=128):
    """Tokens whose pairs give expert groups of exactly ``sizes`` rows (experts 0, 1, ...), k = 2."""
    pairs = np.concatenate([np.full(s, e) for e, s in enumerate(sizes)])
    pairs = np.concatenate([pairs, np.full(len(pairs) % 2, len(sizes))])      # even count: k = 2 per token
    ids = rng.permutation(pairs).reshape(-1, 2)
    while (ids[:, 0] == ids[:, 1]).any():                                     # a token picks distinct experts
        ids = rng.permutation(pairs).reshape(-1, 2)
    n_t = ids.shape[0]
    return dict(x=rng.standard_normal((n_t, d)).astype(np.float32),
                weights=rng.random((n_t, 2)).astype(np.float32), ids=ids.astype(np.int64),
                w_gate_up=_mxfp4(rng, n_experts, 2 * i, d),
                b_gate_up=rng.standard_normal((n_experts, 2 * i)).astype(np.float32),
                w_down=_mxfp4(rng, n_experts, d, i), b_down=None, activation="clamped_swiglu")


@pytest.mark.parametrize("sizes", [(1, 2, 3, 4, 8, 1), (5, 1, 1, 3), (2, 2, 2, 2, 2, 2)])
@pytest.mark.parametrize("min_rows", [None, 4])
def test_one_region_per_half_equals_the_reference(sizes, min_rows, monkeypatch):
    """``_moe_region`` (AVX-512 hosts): groups of 1-3 rows streamed, 4+ tiled, a bias on gate_up only,
    items taken from a shared counter (whole experts at these sizes, or 4-row pieces of them);
    every pair equals the reference."""
    from gptevo.backends.numba import _moe_region, _simd
    if not _simd.has_avx512():
        pytest.skip("_moe_region runs on AVX-512 hosts only")
    if min_rows is not None:
        monkeypatch.setattr(_moe_region, "MIN_ROWS_PER_ITEM", min_rows)
        assert _moe_region._item_rows(160, 6, 2) < 160          # several items per expert here
    kw = _region_case(np.random.default_rng(len(sizes)), sizes)
    got = backends.get("numba").moe_experts(**kw)
    want = reference_moe(**kw)
    assert _error(got, want) < 1e-5


def test_int8_mode_for_many_tokens_equals_each_token_alone():
    """int8-prepared experts: a batch of tokens (groups of 1-8 rows) gives, row for row, what each
    token gives alone through the single-token int8 kernels (both halves have K >= 128, so both are
    int8), and is int8 (not exact) arithmetic."""
    from gptevo.backends.numba import _mxfp4_gemv as mg
    from gptevo.backends.numba import _simd
    if not _simd.has_avx512():
        pytest.skip("int8 mode needs AVX-512 (it falls back to exact elsewhere)")
    kw = _region_case(np.random.default_rng(3), (1, 2, 3, 4, 8, 1, 1))
    kw8 = dict(kw, w_gate_up=mg.prepare(kw["w_gate_up"], mode="int8"), w_down=mg.prepare(kw["w_down"], mode="int8"))
    numba_moe = backends.get("numba").moe_experts
    got = numba_moe(**kw8)
    for t in range(kw["x"].shape[0]):
        alone = numba_moe(**dict(kw8, x=kw["x"][t:t + 1], weights=kw["weights"][t:t + 1], ids=kw["ids"][t:t + 1]))
        np.testing.assert_array_equal(got[t], alone[0])     # the same int8 products, bit for bit
    exact = numba_moe(**kw)
    want = reference_moe(**kw)
    assert _error(exact, want) < 1e-5
    assert 1e-5 < _error(got, want) < 3e-2           # int8 rounding shows, within int8's budget


def test_int8_mode_prefill_takes_float_activations():
    """More tokens than a batched decode step has (> _gemm_small.MAX_ROWS, a prefill): int8-prepared
    experts run the exact kernels, as the int8 mode's dense rows take BLAS with float activations
    there; the result is bit for bit the exact mode's. Up to MAX_ROWS tokens stay int8."""
    from gptevo.backends.numba import _mxfp4_gemv as mg
    from gptevo.backends.numba import _simd
    from gptevo.backends.numba._gemm_small import MAX_ROWS
    if not _simd.has_avx512():
        pytest.skip("int8 mode needs AVX-512 (it falls back to exact elsewhere)")
    kw = _region_case(np.random.default_rng(4), (9, 7, 5, 4, 3, 2, 2, 1, 1), n_experts=10)   # 17 tokens
    assert kw["x"].shape[0] == MAX_ROWS + 1
    kw8 = dict(kw, w_gate_up=mg.prepare(kw["w_gate_up"], mode="int8"), w_down=mg.prepare(kw["w_down"], mode="int8"))
    numba_moe = backends.get("numba").moe_experts
    np.testing.assert_array_equal(numba_moe(**kw8), numba_moe(**kw))
    short = {n: kw8[n][:MAX_ROWS] for n in ("x", "weights", "ids")}
    assert _error(numba_moe(**dict(kw8, **short)), numba_moe(**dict(kw, **short))) > 1e-5
