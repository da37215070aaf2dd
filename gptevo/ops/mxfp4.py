"""MXFP4: 4-bit E2M1 elements in blocks of 32 that share one E8M0 power-of-two scale.

Written spec: ``spec/ops/mxfp4.md``. Sources: OCP Microscaling Formats (MX) Specification v1.0
(E2M1 element, E8M0 scale, block size 32, conversion rule of section 6.3); the gpt-oss checkpoint
layout and nibble order (openai/gpt-oss ``gpt_oss/torch/weights.py``; the seed's "MXFP4
Quantization Innovation" section names the format but gives no bit layout).

Layout of one tensor with logical shape ``[..., N]`` (N = G*32, blocks run along the last axis):
``blocks`` uint8 ``[..., G, 16]`` (two codes per byte: low nibble = element 2j, high nibble =
element 2j+1) and ``scales`` uint8 ``[..., G]`` (biased exponent: scale value = 2**(s - 127)).
"""
from __future__ import annotations

import numpy as np

from gptevo.errors import CheckpointError, RequestError
from gptevo.ops.spec import Case, op, unchecked

# E2M1 value of each 4-bit code. Bit 3 is the sign; bits 2..1 the exponent (bias 1); bit 0 the
# mantissa. Code 8 is -0.0 (kept: it decodes to a negative zero).
FP4_VALUES = np.array([+0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float64)
SCALE_BIAS = 127          # E8M0: value = 2**(byte - 127)
SCALE_NAN = 255           # E8M0 0xFF is NaN (OCP MX v1.0); the whole block decodes to NaN
BLOCK_SIZE = 32           # elements per block
BLOCK_BYTES = 16          # bytes per block (two elements per byte)
E2M1_EMAX = 2             # exponent of the largest E2M1 power of two (4 = 2**2); max value 6
E2M1_MAX = 6.0

_DECODE_DTYPES = ("float32", "float64")


def _decode_dtype(dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in _DECODE_DTYPES:
        raise RequestError(f"mxfp4_decode: dtype must be one of {_DECODE_DTYPES}, got {dtype!r}")
    return dt


def _check_packed(blocks, scales, what: str, error=RequestError) -> None:
    """Raise ``error`` unless blocks is uint8 [..., G, 16] and scales is uint8 [..., G]."""
    if not isinstance(blocks, np.ndarray) or not isinstance(scales, np.ndarray):
        raise error(f"{what}: blocks and scales must be numpy arrays, got "
                    f"{type(blocks).__name__} and {type(scales).__name__}")
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise error(f"{what}: blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.ndim < 2 or blocks.shape[-1] != BLOCK_BYTES:
        raise error(f"{what}: blocks must have shape [..., G, {BLOCK_BYTES}], got {list(blocks.shape)}")
    if blocks.shape[:-1] != scales.shape:
        raise error(f"{what}: scales shape {list(scales.shape)} does not match blocks shape "
                    f"{list(blocks.shape)} (expected scales {list(blocks.shape[:-1])})")


def check_mxfp4_decode_args(blocks, scales, dtype="float32") -> dict:
    """blocks uint8 [..., G, 16] and scales uint8 [..., G], NumPy arrays; dtype "float32" or
    "float64" (returned as that name)."""
    _check_packed(blocks, scales, "mxfp4_decode")
    return {"blocks": blocks, "scales": scales, "dtype": _decode_dtype(dtype).name}


def _mxfp4_decode_cases(rng: np.random.Generator):
    every_byte = np.arange(256, dtype=np.uint8).reshape(16, 16)
    yield Case("all-256-bytes,scale=127", {"blocks": every_byte,
                                           "scales": np.full(16, 127, np.uint8)})
    # One block per scale value 0..255 (253/254 overflow to +-inf in float32, 255 is NaN).
    yield Case("every-scale,G=256", {"blocks": rng.integers(0, 256, (256, 16), dtype=np.uint8),
                                     "scales": np.arange(256, dtype=np.uint8)})
    yield Case("every-scale,G=256,dtype=f64", {
        "blocks": rng.integers(0, 256, (256, 16), dtype=np.uint8),
        "scales": np.arange(256, dtype=np.uint8), "dtype": "float64"})
    yield Case("shape=[3,5,2],scales~U(100,140)", {
        "blocks": rng.integers(0, 256, (3, 5, 2, 16), dtype=np.uint8),
        "scales": rng.integers(100, 141, (3, 5, 2), dtype=np.uint8)})
    yield Case("shape=[4,7,3],experts", {
        "blocks": rng.integers(0, 256, (4, 7, 3, 16), dtype=np.uint8),
        "scales": rng.integers(110, 130, (4, 7, 3), dtype=np.uint8)})
    yield Case("shape=[1,1],single-block", {
        "blocks": rng.integers(0, 256, (1, 16), dtype=np.uint8), "scales": np.array([120], np.uint8)})
    yield Case("shape=[2,0],empty", {"blocks": np.zeros((2, 0, 16), np.uint8),
                                     "scales": np.zeros((2, 0), np.uint8)})


@op("mxfp4_decode",
    signature='mxfp4_decode(blocks[...,G,16] u8, scales[...,G] u8, dtype="float32") -> [...,G*32]',
    dtypes="blocks: u8; scales: u8 (E8M0); out: f32|f64",
    tolerance={"float32": 0.0, "float64": 0.0},
    cases=_mxfp4_decode_cases,
    source="OCP MX v1.0 (E2M1, E8M0, k=32); nibble order from openai/gpt-oss gpt_oss/torch/weights.py",
    spec_file="spec/ops/mxfp4.md", exact=True,
    bytes=lambda blocks, scales, dtype="float32": blocks.nbytes + scales.nbytes
    + blocks.size * 2 * np.dtype(dtype).itemsize, check=check_mxfp4_decode_args)
def mxfp4_decode(blocks, scales, dtype="float32"):
    """Decode packed MXFP4 to floats, exactly: out[..., 32g + i] = FP4_VALUES[code_i] * 2**(s_g - 127).

    blocks: uint8 [..., G, 16]; byte j of a block holds element 2j in its low nibble (b & 0xF) and
    element 2j+1 in its high nibble (b >> 4). scales: uint8 [..., G]. dtype: "float32" | "float64".
    Returns [..., G*32] of ``dtype``.

    Every finite result is exact (one significant bit times a power of two; the smallest magnitude,
    0.5 * 2**-127 = 2**-128, is a float32 subnormal). Edge cases: in float32 the products
    {2,3,4,6} * 2**127 (scale 254) and {4,6} * 2**126 (scale 253) overflow to +-inf; scale 255
    (E8M0 NaN) makes all 32 elements of its block NaN, zeros included, so a bad scale can never
    pass as a finite weight (``gptevo.load(..., check_weights=True)`` rejects such tensors;
    otherwise the forward raises NumericalError on the non-finite logits they cause).
    Code 8 decodes to -0.0.
    """
    dt = np.dtype(dtype)
    table = FP4_VALUES.astype(dt)                                    # [16]
    lo = table[blocks & 0x0F]                                        # [..., G, 16] elements 0, 2, ..
    hi = table[blocks >> 4]                                          # [..., G, 16] elements 1, 3, ..
    mant = np.stack([lo, hi], axis=-1).reshape(*blocks.shape[:-1], BLOCK_SIZE)   # [..., G, 32]
    exp = scales.astype(np.int32) - SCALE_BIAS                       # [..., G]
    with np.errstate(over="ignore"):                                 # documented: overflow -> +-inf
        vals = np.ldexp(mant, exp[..., None])                        # [..., G, 32]
    vals = np.where((scales == SCALE_NAN)[..., None], dt.type(np.nan), vals)      # [..., G, 32]
    return vals.reshape(*scales.shape[:-1], scales.shape[-1] * BLOCK_SIZE)       # [..., G*32]


def _floor_log2(a: np.ndarray) -> np.ndarray:
    """floor(log2(a)) for finite a > 0, exactly (frexp: a = m * 2**e with m in [0.5, 1))."""
    _, e = np.frexp(a)
    return e.astype(np.int64) - 1


# Magnitudes of codes 0..7 and the midpoints between neighbours, for rounding to nearest.
_GRID = FP4_VALUES[:8]                                               # [8]
_MIDPOINTS = (_GRID[:-1] + _GRID[1:]) / 2                            # [7]: .25 .75 1.25 1.75 2.5 3.5 5


def _round_to_e2m1(scaled: np.ndarray) -> np.ndarray:
    """4-bit codes of the E2M1 values nearest to ``scaled`` (ties to the even code; |x| > 6 -> 6)."""
    mag = np.abs(scaled)
    idx = np.searchsorted(_MIDPOINTS, mag, side="left")             # midpoints strictly below |x|
    # On a midpoint, searchsorted picked the lower neighbour; move up when that code is odd.
    on_tie = (idx < _MIDPOINTS.size) & (mag == _MIDPOINTS[np.minimum(idx, _MIDPOINTS.size - 1)])
    idx = np.where(on_tie & (idx % 2 == 1), idx + 1, idx)            # idx 7 is +6: saturation
    sign = np.signbit(scaled).astype(np.uint8) << 3
    return idx.astype(np.uint8) | sign


def _mxfp4_encode_cases(rng: np.random.Generator):
    yield Case("shape=[4,64]", {"w": rng.standard_normal((4, 64)).astype(np.float32)})
    yield Case("shape=[2,3,32],zeros", {"w": np.zeros((2, 3, 32), np.float32)})


@op("mxfp4_encode",
    signature="mxfp4_encode(w[...,N]) -> (blocks[...,N/32,16] u8, scales[...,N/32] u8)",
    dtypes="w: f32|f64|f16|bf16 (finite)",
    tolerance={"float32": 0.0, "float64": 0.0},
    cases=_mxfp4_encode_cases,
    source="OCP MX v1.0 section 6.3 (shared exponent = floor(log2(amax)) - emax_elem)",
    spec_file="spec/ops/mxfp4.md", backend_op=False)
def mxfp4_encode(w):
    """Quantize ``w[..., N]`` (N a multiple of 32) to MXFP4 (blocks, scales), the OCP MX way.

    Per block of 32 along the last axis: amax = max|w|; the shared exponent is
    X = floor(log2(amax)) - 2 (E2M1's largest power of two is 2**2), so amax / 2**X lies in [4, 8);
    the stored scale byte is X + 127 clamped to [0, 254]. Each element w / 2**X is rounded to the
    nearest E2M1 value, ties to the even code (IEEE round-half-even on the E2M1 grid), and
    magnitudes above 6 saturate to 6. The sign is kept even when the magnitude rounds to 0 (-0.0 is
    code 8). An all-zero block gets scale 127 (2**0) and zero codes (keeping signs of -0.0).

    Raises RequestError when N is not a multiple of 32 or ``w`` holds NaN or inf.
    A tool for building test checkpoints; not a backend op.
    """
    w = np.asarray(w)
    if w.ndim < 1 or w.shape[-1] % BLOCK_SIZE != 0:
        raise RequestError(f"mxfp4_encode: the last axis must be a multiple of {BLOCK_SIZE}, "
                           f"got shape {list(w.shape)}")
    w64 = w.astype(np.float64)                                       # exact for f16/bf16/f32/f64
    if not np.all(np.isfinite(w64)):
        raise RequestError("mxfp4_encode: w contains NaN or inf; MXFP4 elements must be finite")
    groups = w64.reshape(*w.shape[:-1], w.shape[-1] // BLOCK_SIZE, BLOCK_SIZE)  # [..., G, 32]
    amax = np.abs(groups).max(axis=-1, initial=0.0)                  # [..., G]
    nonzero = amax > 0
    shared = np.where(nonzero, _floor_log2(np.where(nonzero, amax, 1.0)) - E2M1_EMAX, 0)  # [..., G]
    scales = np.clip(shared + SCALE_BIAS, 0, 2 * SCALE_BIAS)         # [..., G] in 0..254
    scaled = np.ldexp(groups, -(scales - SCALE_BIAS)[..., None].astype(np.int32))  # [..., G, 32] exact
    codes = _round_to_e2m1(scaled)                                   # [..., G, 32] u8 in 0..15
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)              # [..., G, 16]
    return blocks.astype(np.uint8), scales.astype(np.uint8)


class Mxfp4Weight:
    """A packed MXFP4 weight: ``blocks`` uint8 [..., G, 16] and ``scales`` uint8 [..., G].

    Never decoded at construction (the arrays may be memory-mapped); ops decode what they use via
    ``decode(dtype)`` (``gptevo.ops.spec.widen`` calls it). ``shape`` is the logical shape
    [..., G*32]; ``dtype`` is the string "mxfp4"; ``nbytes`` is the packed size. ``w[e]`` (or a
    slice) selects along the leading axis, e.g. one expert, without decoding anything.
    ``name`` is used in error messages (the checkpoint tensor name).
    """

    __slots__ = ("_blocks", "_scales", "_name")

    def __init__(self, blocks, scales, name: str = "mxfp4 weight"):
        _check_packed(blocks, scales, name, error=CheckpointError)
        object.__setattr__(self, "_blocks", blocks)
        object.__setattr__(self, "_scales", scales)
        object.__setattr__(self, "_name", name)

    def __setattr__(self, key, value):
        raise AttributeError(f"Mxfp4Weight is immutable (cannot set {key!r})")

    @property
    def blocks(self) -> np.ndarray:
        return self._blocks

    @property
    def scales(self) -> np.ndarray:
        return self._scales

    @property
    def name(self) -> str:
        return self._name

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self._scales.shape[:-1], self._scales.shape[-1] * BLOCK_SIZE)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> str:
        return "mxfp4"

    @property
    def nbytes(self) -> int:
        return int(self._blocks.nbytes + self._scales.nbytes)

    def __len__(self) -> int:
        return self.shape[0]

    def decode(self, dtype="float32") -> np.ndarray:
        """The decoded weight [..., G*32] in ``dtype`` (float32 or float64); see mxfp4_decode. Blocks
        and scales were checked when the weight was made, so only ``dtype`` is checked here."""
        return unchecked(mxfp4_decode)(blocks=self._blocks, scales=self._scales, dtype=_decode_dtype(dtype).name)

    def check_scales(self) -> None:
        """Raise CheckpointError if any scale byte is 255 (E8M0 NaN). Reads the scales (1/16 of the size)."""
        bad = int(np.count_nonzero(self._scales == SCALE_NAN))
        if bad:
            raise CheckpointError(f"{self._name}: {bad} MXFP4 scale byte(s) are 255 (E8M0 NaN); "
                                  f"expected 0..254")

    def __getitem__(self, index) -> "Mxfp4Weight":
        if self.ndim < 2:
            raise RequestError(f"{self._name}: cannot index a 1-D MXFP4 weight of shape {list(self.shape)}")
        if isinstance(index, slice):
            return Mxfp4Weight(self._blocks[index], self._scales[index], self._name)
        if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
            n = self.shape[0]
            if not -n <= index < n:
                raise RequestError(f"{self._name}: index {int(index)} is out of range for leading axis of "
                                   f"size {n}")
            i = int(index)
            return Mxfp4Weight(self._blocks[i], self._scales[i], f"{self._name}[{i}]")
        raise RequestError(f"{self._name}: Mxfp4Weight supports an int or a slice on the leading axis, "
                           f"got {type(index).__name__}")

    def __repr__(self) -> str:
        return f"Mxfp4Weight({self._name!r}, shape={list(self.shape)}, nbytes={self.nbytes})"
