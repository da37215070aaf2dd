"""MXFP4 decode/encode and Mxfp4Weight, checked against ml_dtypes, Python floats and the OCP rule."""
import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from gptevo.errors import CheckpointError, RequestError
from gptevo.ops import REGISTRY, widen
from gptevo.ops.mxfp4 import Mxfp4Weight, mxfp4_decode, mxfp4_encode

# E2M1 magnitudes of codes 0..7, written out here (not imported) so the tests stay independent.
GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def code_value(code: int) -> float:
    return math.copysign(GRID[code & 7], -1.0 if code & 8 else 1.0)


def pack(codes: np.ndarray) -> np.ndarray:
    """codes [..., G, 32] in 0..15 -> bytes [..., G, 16]: element 2j low nibble, 2j+1 high nibble."""
    codes = codes.astype(np.uint8)
    return (codes[..., 0::2] + 16 * codes[..., 1::2]).astype(np.uint8)


def test_registered():
    assert REGISTRY["mxfp4_decode"].exact and REGISTRY["mxfp4_decode"].backend_op
    assert not REGISTRY["mxfp4_encode"].backend_op


def test_decode_all_256_bytes_matches_ml_dtypes():
    blocks = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = mxfp4_decode(blocks=blocks, scales=np.full(16, 127, np.uint8))
    assert out.shape == (512,) and out.dtype == np.float32
    nibbles = np.empty(512, np.uint8)
    nibbles[0::2] = np.arange(256) & 0xF            # low nibble first
    nibbles[1::2] = np.arange(256) >> 4
    expected = nibbles.view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(np.signbit(out), np.signbit(expected))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_decode_every_scale_is_table_times_power_of_two(dtype):
    codes = np.tile(np.r_[np.arange(16), np.arange(16)[::-1]], (255, 1))   # [255, 32]
    scales = np.arange(255, dtype=np.uint8)
    out = mxfp4_decode(blocks=pack(codes), scales=scales, dtype=dtype).reshape(255, 32)
    assert out.dtype == np.dtype(dtype)
    fmax = float(np.finfo(dtype).max)
    e8m0 = scales.view(ml_dtypes.float8_e8m0fnu).astype(np.float64)
    for s in range(255):
        assert e8m0[s] == 2.0 ** (s - 127)                  # our reading of the scale byte
        for i in range(32):
            v = math.ldexp(code_value(int(codes[s, i])), s - 127)             # exact Python float
            want = v if abs(v) <= fmax else math.copysign(math.inf, v)
            got = float(out[s, i])
            assert got == want and math.copysign(1, got) == math.copysign(1, want), (s, i, got, want)


def test_decode_float32_overflows_only_at_top_scales():
    codes = np.tile(np.arange(16).repeat(2), (3, 1))         # [3, 32]
    out = mxfp4_decode(blocks=pack(codes), scales=np.array([252, 253, 254], np.uint8)).reshape(3, 32)
    assert np.isfinite(out[0]).all()
    assert np.isinf(out[1]).sum() == 8                        # codes 6, 7, 14, 15 (x2 elements)
    assert np.isinf(out[2]).sum() == 16                       # codes 4..7, 12..15
    assert out[2, 0] == 0.0 and out[2, 2] == 2.0 ** 126


def test_decode_scale_255_is_nan_for_the_whole_block():
    blocks = np.zeros((3, 16), np.uint8)                      # all zero codes
    out = mxfp4_decode(blocks=blocks, scales=np.array([127, 255, 0], np.uint8)).reshape(3, 32)
    assert np.isnan(out[1]).all()
    assert not np.isnan(out[[0, 2]]).any()


def test_decode_odd_leading_shapes_elementwise():
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (3, 5, 2, 16), dtype=np.uint8)
    scales = rng.integers(100, 150, (3, 5, 2), dtype=np.uint8)
    out = mxfp4_decode(blocks=blocks, scales=scales, dtype="float64")
    assert out.shape == (3, 5, 64)
    for a, b, g, j in np.ndindex(3, 5, 2, 16):
        byte, s = int(blocks[a, b, g, j]), int(scales[a, b, g]) - 127
        assert out[a, b, 32 * g + 2 * j] == math.ldexp(code_value(byte & 15), s)
        assert out[a, b, 32 * g + 2 * j + 1] == math.ldexp(code_value(byte >> 4), s)


@pytest.mark.parametrize("blocks,scales", [
    (np.zeros((2, 16), np.int8), np.zeros(2, np.uint8)),      # wrong dtype
    (np.zeros((2, 15), np.uint8), np.zeros(2, np.uint8)),     # 15 bytes per block
    (np.zeros((2, 16), np.uint8), np.zeros(3, np.uint8)),     # scales shape mismatch
    (np.zeros(16, np.uint8), np.zeros((), np.uint8)),         # no block axis
])
def test_decode_rejects_bad_packing(blocks, scales):
    with pytest.raises(RequestError):
        mxfp4_decode(blocks=blocks, scales=scales)


def test_decode_rejects_bad_dtype():
    with pytest.raises(RequestError):
        mxfp4_decode(blocks=np.zeros((1, 16), np.uint8), scales=np.zeros(1, np.uint8), dtype="float16")


# ------------------------------------------------------------------ encode

def ocp_scale_byte(block) -> int:
    """Independent OCP MX rule: 2**e <= amax < 2**(e+1), shared exponent e - 2, biased, clamped."""
    amax = max(abs(float(v)) for v in block)
    if amax == 0.0:
        return 127
    e = int(math.floor(math.log2(amax)))
    while 2.0 ** e > amax:
        e -= 1
    while 2.0 ** (e + 1) <= amax:
        e += 1
    return min(max(e - 2 + 127, 0), 254)


@st.composite
def representable(draw):
    nb = draw(st.integers(1, 4))
    codes = draw(hnp.arrays(np.uint8, (nb, 32), elements=st.integers(0, 15)))
    scales = draw(hnp.arrays(np.uint8, (nb,), elements=st.integers(0, 252)))
    return codes, scales


@given(representable())
def test_encode_decode_exact_on_representable_values(data):
    codes, scales = data
    x = mxfp4_decode(blocks=pack(codes), scales=scales)                     # [nb*32] f32, exact
    blocks2, scales2 = mxfp4_encode(x.reshape(-1, 32))                     # [nb, 1, 16], [nb, 1]
    blocks2, scales2 = blocks2[:, 0], scales2[:, 0]
    y = mxfp4_decode(blocks=blocks2, scales=scales2).reshape(-1)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(np.signbit(y), np.signbit(x))
    # A block whose largest code is 4 or 6 keeps its scale, hence its bytes.
    big = (codes & 7).max(axis=1) >= 6
    np.testing.assert_array_equal(scales2[big], scales[big])
    np.testing.assert_array_equal(blocks2[big], pack(codes)[big])


finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


@st.composite
def float_blocks(draw):
    nb = draw(st.integers(1, 3))
    base = draw(hnp.arrays(np.float32, (nb, 32), elements=finite32))
    shift = draw(st.integers(-140, 0))               # also reach small-magnitude blocks
    return np.ldexp(base, shift).astype(np.float32) if draw(st.booleans()) else base


@given(float_blocks())
def test_encode_is_nearest_on_the_grid_or_saturates(x):
    blocks, scales = mxfp4_encode(x)                                        # scales [nb, 1]
    assert blocks.shape == (x.shape[0], 1, 16) and scales.shape == (x.shape[0], 1)
    y = mxfp4_decode(blocks=blocks, scales=scales, dtype="float64").reshape(x.shape)
    for b in range(x.shape[0]):
        assert int(scales[b, 0]) == ocp_scale_byte(x[b])
        scale = 2.0 ** (int(scales[b, 0]) - 127)
        for i in range(32):
            xi, yi = float(x[b, i]), float(y[b, i])
            a = abs(xi) / scale
            if a > 6.0:
                assert yi == math.copysign(6.0 * scale, xi)
                continue
            lo = max(g for g in GRID if g <= a)
            hi = min(g for g in GRID if g >= a)
            assert abs(yi) / scale in (lo, hi)
            assert abs(yi - xi) <= (hi - lo) / 2 * scale
            assert math.copysign(1, yi) == math.copysign(1, xi)


def test_encode_rounds_ties_to_even_codes_and_saturates():
    # amax = 7 -> shared exponent floor(log2 7) - 2 = 0 -> scale byte 127, elements unscaled.
    x = np.zeros(32, np.float32)
    x[:8] = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0]
    x[8:16] = -x[:8]
    blocks, scales = mxfp4_encode(x)
    assert scales.tolist() == [127]
    y = mxfp4_decode(blocks=blocks, scales=scales)
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]      # ties go to the even code
    np.testing.assert_array_equal(y[:8], expected)
    np.testing.assert_array_equal(y[8:16], [-v for v in expected])


def test_encode_scale_edges():
    x = np.zeros((4, 32))
    x[1, 3] = 1e300                      # far above 6 * 2**127: scale clamps to 254, saturates
    x[2, 5] = 2.0 ** -140                # below 2**-127 * 0.25: scale clamps to 0, rounds to 0
    x[3, :] = -0.0
    blocks, scales = mxfp4_encode(x)
    assert scales[:, 0].tolist() == [127, 254, 0, 127]
    y = mxfp4_decode(blocks=blocks, scales=scales, dtype="float64").reshape(4, 32)
    assert y[1, 3] == 6.0 * 2.0 ** 127 and y[2, 5] == 0.0
    assert np.signbit(y[3]).all()        # -0.0 keeps its sign (code 8)
    assert np.count_nonzero(y) == 1


def test_encode_accepts_bf16_and_keeps_shape():
    x = np.random.default_rng(2).standard_normal((2, 3, 64)).astype(ml_dtypes.bfloat16)
    blocks, scales = mxfp4_encode(x)
    assert blocks.shape == (2, 3, 2, 16) and scales.shape == (2, 3, 2)
    assert blocks.dtype == np.uint8 and scales.dtype == np.uint8


@pytest.mark.parametrize("w", [np.zeros((2, 33)), np.zeros(31), np.float32(1.0),
                               np.r_[np.zeros(31), np.nan], np.r_[np.zeros(31), -np.inf]])
def test_encode_rejects(w):
    with pytest.raises(RequestError):
        mxfp4_encode(w)


# ------------------------------------------------------------------ Mxfp4Weight

def make_weight(rng, shape=(3, 4, 2), name="w"):
    blocks = rng.integers(0, 256, (*shape, 16), dtype=np.uint8)
    scales = rng.integers(118, 130, shape, dtype=np.uint8)
    return Mxfp4Weight(blocks, scales, name=name)


def test_weight_properties_and_expert_indexing():
    rng = np.random.default_rng(3)
    w = make_weight(rng)
    assert w.shape == (3, 4, 64) and w.ndim == 3 and len(w) == 3 and w.dtype == "mxfp4"
    assert w.nbytes == 3 * 4 * 2 * 17
    full = w.decode("float32")
    assert full.shape == w.shape and full.dtype == np.float32
    for e in range(3):
        np.testing.assert_array_equal(w[e].decode("float32"), full[e])
    np.testing.assert_array_equal(w[np.int64(-1)].decode("float64"), full[-1].astype(np.float64))
    np.testing.assert_array_equal(w[1:3].decode("float32"), full[1:3])
    np.testing.assert_array_equal(widen(w, np.dtype(np.float32)), full)
    with pytest.raises(AttributeError):
        w.blocks = None


def test_weight_index_errors():
    w = make_weight(np.random.default_rng(4))
    for bad in (3, -4, 1.0, (0, 1), None):
        with pytest.raises(RequestError):
            w[bad]


def test_weight_keeps_memmap_and_does_not_copy(tmp_path):
    rng = np.random.default_rng(5)
    path = tmp_path / "blocks.bin"
    rng.integers(0, 256, (2, 3, 1, 16), dtype=np.uint8).tofile(path)
    blocks = np.memmap(path, dtype=np.uint8, mode="r", shape=(2, 3, 1, 16))
    w = Mxfp4Weight(blocks, np.full((2, 3, 1), 127, np.uint8))
    assert w.blocks is blocks
    assert np.shares_memory(w[1].blocks, blocks)


@pytest.mark.parametrize("blocks,scales", [
    (np.zeros((2, 16), np.float32), np.zeros(2, np.uint8)),
    (np.zeros((2, 16), np.uint8), np.zeros(2, np.int32)),
    (np.zeros((2, 8), np.uint8), np.zeros(2, np.uint8)),
    (np.zeros((2, 3, 16), np.uint8), np.zeros((3, 2), np.uint8)),
    ([[0] * 16], np.zeros(1, np.uint8)),
])
def test_weight_validation(blocks, scales):
    with pytest.raises(CheckpointError, match="tensor.x"):
        Mxfp4Weight(blocks, scales, name="tensor.x")


def test_weight_check_scales():
    w = Mxfp4Weight(np.zeros((2, 16), np.uint8), np.array([127, 255], np.uint8), name="t")
    with pytest.raises(CheckpointError, match="255"):
        w.check_scales()
    Mxfp4Weight(np.zeros((2, 16), np.uint8), np.array([0, 254], np.uint8)).check_scales()
