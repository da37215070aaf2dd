"""The numba MXFP4 decode GEMV (gptevo/backends/numba/_mxfp4_gemv.py) against the reference decode.

Every variant the host can run: exact mode must match ``mxfp4_decode`` + matmul up to summation
order (normalized error <= 1e-5, inf/NaN in the same places); int8 mode within 2e-2.
"""
import numpy as np
import pytest

pytest.importorskip("numba")

from gptevo.backends.numba import _mxfp4_gemv as mg  # noqa: E402
from gptevo.backends.numba import _simd  # noqa: E402
from gptevo.ops.mxfp4 import Mxfp4Weight, mxfp4_decode, mxfp4_encode  # noqa: E402

EXACT = mg.host_variants("exact")
INT8 = mg.host_variants("int8")


def _ref(blocks, scales, experts, x, bias=None):
    """float64 matmul of the reference float32 decode: [U, N]."""
    w = mxfp4_decode(blocks[experts], scales[experts]).astype(np.float64)        # [U,N,K]
    xx = x.astype(np.float64)
    xx = np.broadcast_to(xx, (len(experts), xx.shape[1])) if xx.shape[0] == 1 else xx
    with np.errstate(invalid="ignore", over="ignore"):
        out = np.einsum("unk,uk->un", w, xx)
    if bias is not None:
        out = out + bias[experts]
    return out


def _nerr(out, ref):
    return float(np.linalg.norm(out.astype(np.float64) - ref) / max(np.linalg.norm(ref), 1e-30))


def _packed(rng, e, n, g, lo=110, hi=140):
    return (rng.integers(0, 256, (e, n, g, 16), dtype=np.uint8),
            rng.integers(lo, hi, (e, n, g), dtype=np.uint8))


def test_features_are_detected():
    assert isinstance(_simd.host_features(), frozenset)
    assert "portable" in EXACT
    assert mg.default_variant("exact") in EXACT
    assert _simd.has_vnni() <= _simd.has_avx512()


@pytest.mark.parametrize("variant", EXACT)
@pytest.mark.parametrize("n,g,u,shared,bias", [(1, 1, 1, True, False), (7, 3, 2, True, True),
                                              (37, 5, 3, False, False), (33, 90, 4, True, True),
                                              (65, 13, 4, False, True)])
def test_exact_matches_reference(variant, n, g, u, shared, bias):
    rng = np.random.default_rng(n * 1000 + g)
    e = 5
    blocks, scales = _packed(rng, e, n, g)
    experts = rng.choice(e, u, replace=False)
    x = rng.standard_normal((1 if shared else u, 32 * g)).astype(np.float32)
    b = rng.standard_normal((e, n)).astype(np.float32) if bias else None
    out = mg.mxfp4_gemv(blocks, scales, experts, x, mode="exact", bias=b, variant=variant)
    assert out.shape == (u, n) and out.dtype == np.float32
    assert _nerr(out, _ref(blocks, scales, experts, x, b)) <= 1e-5


@pytest.mark.parametrize("variant", EXACT)
def test_exact_every_scale_byte(variant):
    """Scales 0..254 (the smallest subnormal values and the 253/254 overflows to inf) and 255 (NaN)."""
    rng = np.random.default_rng(7)
    n, g = 256, 3
    blocks, scales = _packed(rng, 1, n, g)
    scales[0, :, 1] = np.arange(256, dtype=np.uint8)          # row r has one block with scale byte r
    scales[0, :, 0] = rng.integers(0, 253, n)
    x = (1e-6 * rng.standard_normal((1, 32 * g))).astype(np.float32)
    out = mg.mxfp4_gemv(blocks, scales, np.array([0]), x, variant=variant)
    ref = _ref(blocks, scales, np.array([0]), x)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    np.testing.assert_array_equal(np.isposinf(out), np.isposinf(ref))
    np.testing.assert_array_equal(np.isneginf(out), np.isneginf(ref))
    assert np.isnan(out[0, 255])                              # scale 255: NaN whatever the codes
    fin = np.isfinite(ref)
    assert fin[:, :253].all()
    assert _nerr(out[fin], ref[fin]) <= 1e-5
    # tiny scales alone (2**-127 ...): subnormal weights times ordinary x, still exact up to order
    small = np.zeros_like(scales) + np.uint8(0)
    small[0, :, :] = rng.integers(0, 4, (n, g))
    xb = rng.standard_normal((1, 32 * g)).astype(np.float32) * np.float32(2 ** 100)
    out = mg.mxfp4_gemv(blocks, small, np.array([0]), xb, variant=variant)
    assert _nerr(out, _ref(blocks, small, np.array([0]), xb)) <= 1e-5


@pytest.mark.parametrize("variant", INT8)
@pytest.mark.parametrize("n,g,u,shared", [(9, 4, 1, True), (31, 5, 2, True), (40, 90, 4, True),
                                          (17, 11, 3, False), (8, 7, 4, False), (12, 16, 2, False),
                                          (10, 19, 3, False), (6, 32, 1, True)])
def test_int8_within_bound(variant, n, g, u, shared):
    rng = np.random.default_rng(n + 100 * g)
    e = 4
    blocks, scales = _packed(rng, e, n, g)
    experts = rng.choice(e, u, replace=False)
    x = rng.standard_normal((1 if shared else u, 32 * g)).astype(np.float32)
    b = rng.standard_normal((e, n)).astype(np.float32)
    out = mg.mxfp4_gemv(blocks, scales, experts, x, mode="int8", bias=b, variant=variant)
    ref = _ref(blocks, scales, experts, x, b)
    assert _nerr(out, ref) <= 2e-2
    assert _nerr(out, ref) > 0                                 # it really is the quantized path


def _int8_model(blocks, scales, experts, x):
    """The int8 mode's arithmetic in float64: x quantized per 32-value block as the kernel does
    (d = max|x| / 127 in float32, q = round half even(x * (1/d))), then per block the exact integer
    dot with the E2M1 values, times 2**(s - 127) * d."""
    k = x.shape[1]
    xb = x.reshape(x.shape[0], k // 32, 32)                                   # [M,G,32]
    d = (np.abs(xb).max(-1) / np.float32(127)).astype(np.float32)              # [M,G]
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    q = np.round(xb * inv[..., None]).astype(np.float64)                      # [M,G,32]
    out = np.empty((len(experts), scales.shape[1]))
    for u, e in enumerate(experts):
        w = mxfp4_decode(blocks[e], np.full_like(scales[e], 127)).astype(np.float64)   # [N,K] E2M1 values
        wb = w.reshape(w.shape[0], k // 32, 32)
        m = u if x.shape[0] > 1 else 0
        per_block = np.einsum("ngj,gj->ng", wb, q[m])                          # [N,G] integer sums
        out[u] = (per_block * np.ldexp(1.0, scales[e].astype(np.int64) - 127) * d[m]).sum(-1)
    return out


@pytest.mark.parametrize("variant", INT8)
@pytest.mark.parametrize("g", [4, 15, 16, 17, 35, 90])
def test_int8_equals_its_arithmetic_model(variant, g):
    """Pins the int8 rows to their definition (1e-5, float32 sums), so a block paired with another
    block's scale (16-block steps, their lane reductions, the tail windows) cannot hide in the
    2 % budget of the test above."""
    rng = np.random.default_rng(g)
    blocks, scales = _packed(rng, 3, 21, g, 120, 134)
    experts = np.array([2, 0])
    x = rng.standard_normal((2, 32 * g)).astype(np.float32)
    out = mg.mxfp4_gemv(blocks, scales, experts, x, mode="int8", variant=variant)
    assert _nerr(out, _int8_model(blocks, scales, experts, x)) <= 1e-5


def test_int8_small_k_falls_back_to_exact():
    rng = np.random.default_rng(3)
    blocks, scales = _packed(rng, 2, 5, 3)                    # K = 96 < 128
    x = rng.standard_normal((1, 96)).astype(np.float32)
    out = mg.mxfp4_gemv(blocks, scales, np.array([1, 0]), x, mode="int8")
    assert _nerr(out, _ref(blocks, scales, np.array([1, 0]), x)) <= 1e-5


def test_bad_arguments():
    from gptevo.errors import RequestError

    rng = np.random.default_rng(0)
    blocks, scales = _packed(rng, 2, 4, 2)
    x = np.zeros((1, 64), np.float32)
    with pytest.raises(RequestError):
        mg.mxfp4_gemv(blocks, scales, np.array([2]), x)
    with pytest.raises(RequestError):
        mg.mxfp4_gemv(blocks, scales, np.array([0]), np.zeros((1, 32), np.float32))
    with pytest.raises(RequestError):
        mg.mxfp4_gemv(blocks, scales, np.array([0]), x, mode="fp8")


def _moe_case(rng, e=6, d=128, i=96, k=4):
    gu = Mxfp4Weight(*mxfp4_encode((0.3 * rng.standard_normal((e, 2 * i, d))).astype(np.float32)))
    dn = Mxfp4Weight(*mxfp4_encode((0.3 * rng.standard_normal((e, d, i))).astype(np.float32)))
    x = rng.standard_normal((1, d)).astype(np.float32)
    ids = rng.choice(e, (1, k), replace=False).astype(np.int64)
    w = rng.random((1, k)).astype(np.float32)
    w /= w.sum()
    return x, w, ids, gu, (0.1 * rng.standard_normal((e, 2 * i))).astype(np.float32), dn, \
        (0.1 * rng.standard_normal((e, d))).astype(np.float32)


@pytest.mark.parametrize("activation", ["clamped_swiglu", "swiglu"])
def test_moe_experts_decode_path(activation):
    from gptevo.backends.numba import _moe
    from gptevo.ops.moe import moe_experts as ref_moe

    rng = np.random.default_rng(11)
    x, w, ids, gu, bgu, dn, bdn = _moe_case(rng)
    ref = ref_moe(x, w, ids, gu, bgu, dn, bdn, activation=activation).astype(np.float64)
    out = _moe.moe_experts(x, w, ids, gu, bgu, dn, bdn, activation=activation)
    assert out.shape == (1, x.shape[1]) and out.dtype == np.float32
    assert _nerr(out, ref) <= 1e-5
    # int8 mode through prepared weights (falls back to exact where the host has no AVX-512)
    gu8, dn8 = mg.prepare(gu, mode="int8"), mg.prepare(dn, mode="int8")
    assert mg.weight_mode(gu8, dn8) == "int8" and mg.weight_mode(gu8, dn) == "exact"
    out8 = _moe.moe_experts(x, w, ids, gu8, bgu, dn8, bdn, activation=activation)
    assert _nerr(out8, ref) <= 2e-2


def test_prepare_and_default_mode():
    rng = np.random.default_rng(5)
    blocks, scales = _packed(rng, 2, 3, 4)
    scales[1, 2, 3] = 255
    p = mg.prepare(Mxfp4Weight(blocks, scales), mode="int8")
    assert p.has_nan_scale and mg.weight_mode(p, p) == "exact"      # NaN scales keep exact semantics
    assert p.shape == (2, 3, 128) and p.dtype == "mxfp4" and p.nbytes == blocks.nbytes + scales.nbytes
    assert not np.shares_memory(p.blocks, blocks)
    np.testing.assert_array_equal(p[1].decode(), mxfp4_decode(blocks[1], scales[1]))
    assert mg.get_default_mode() == "exact"
    mg.set_default_mode("int8")
    try:
        assert mg.weight_mode(Mxfp4Weight(blocks, scales)) == "int8"
    finally:
        mg.set_default_mode("exact")
