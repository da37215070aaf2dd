"""Blockwise int8 weights: the optional 8-bit mode for dense weights (spec: spec/ops/int8.md).

A weight ``W`` [..., K] is stored as int8 values ``q`` [..., K] and one float16 scale per 32
consecutive values along K, ``s`` [..., K/32] (the block size of MXFP4 and of GGUF's Q8_0, whose
scales are float16 too: 34 bytes per 32 values):

    s[b] = the smallest float16 >= max_j |W[32b + j]| / 127   (computed in float32; 0 for an all-zero block)
    q[32b + j] = round_half_even(W[32b + j] / s[b])     in [-127, 127]
    decoded W'[32b + j] = float32(q[32b + j]) * float32(s[b])   (exact: 7 x 11 significant bits)

Rounding the scale up keeps every |W / s| <= 127, so no value is clipped and the per-value error
is at most s[b] / 2 (about max|W in block| / 254, 0.4 % of the block's largest magnitude; a tiny
block whose max / 127 is below float16's smallest subnormal, 6e-8, gets that subnormal as its scale).
:func:`quantize_int8` refuses non-finite weights, K not divisible by 32 and blocks whose scale
would overflow float16 (max |W| above 127 * 65504, about 8.3e6), naming the tensor.
``Int8Weight.decode`` is what every reference op sees (through ``gptevo.ops.spec.widen``), so a
model loaded with ``weights="int8"`` runs unchanged on the reference.
"""
from __future__ import annotations

import numpy as np

from gptevo.errors import CheckpointError, RequestError

INT8_BLOCK = 32
INT8_MAX = 127
SCALE_MAX = float(np.finfo(np.float16).max)        # 65504


def scale_up(s32: np.ndarray) -> np.ndarray:
    """The smallest float16 >= each float32 in ``s32`` (>= 0): the scale that keeps |W / s| <= 127;
    inf where it exceeds float16's range."""
    with np.errstate(over="ignore"):
        s16 = s32.astype(np.float16)                                         # round to nearest
    low = s16.astype(np.float32) < s32
    s16[low] = np.nextafter(s16[low], np.float16(np.inf))
    return s16


class Int8Weight:
    """int8 ``values`` [..., K] and float16 ``scales`` [..., K/32]; logical shape [..., K].

    ``dtype`` is the string "int8_block32"; ``nbytes`` counts values and scales; ``decode(dtype)``
    gives the widened weight. ``name`` is used in error messages (the checkpoint tensor name).
    """

    __slots__ = ("values", "scales", "name")

    def __init__(self, values: np.ndarray, scales: np.ndarray, name: str = "int8 weight"):
        if values.dtype != np.int8 or scales.dtype != np.float16:
            raise RequestError(f"{name}: Int8Weight needs int8 values and float16 scales; found "
                               f"{values.dtype} and {scales.dtype}")
        if values.shape[:-1] != scales.shape[:-1] or values.shape[-1] != INT8_BLOCK * scales.shape[-1]:
            raise RequestError(f"{name}: values {list(values.shape)} and scales {list(scales.shape)} do not "
                               f"match (need scales [..., K/{INT8_BLOCK}])")
        self.values = values
        self.scales = scales
        self.name = name

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def ndim(self) -> int:
        return self.values.ndim

    @property
    def dtype(self) -> str:
        return "int8_block32"

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + self.scales.nbytes)

    def decode(self, dtype="float32") -> np.ndarray:
        """The weight as ``dtype`` [..., K]: float32(q) * s per block, then cast to ``dtype``."""
        blocks = self.values.reshape(*self.scales.shape, INT8_BLOCK).astype(np.float32)   # [...,K/32,32]
        w = blocks * self.scales[..., None].astype(np.float32)                              # [...,K/32,32]
        return w.reshape(self.values.shape).astype(dtype, copy=False)                      # [...,K]

    def __repr__(self) -> str:
        return f"Int8Weight({self.name!r}, shape={list(self.shape)}, nbytes={self.nbytes})"


def quantize_int8(w, name: str = "weight", rows_per_step: int = 4096) -> Int8Weight:
    """Quantize a float weight [..., K] (f32/f64/f16/bf16) to :class:`Int8Weight`, ``rows_per_step``
    rows at a time (bounded temporary memory). CheckpointError naming ``name`` for non-finite values,
    K not a multiple of 32, or a block too large for a float16 scale."""
    arr = np.asarray(w)
    if arr.ndim < 1 or arr.shape[-1] % INT8_BLOCK:
        raise CheckpointError(f"{name}: int8 weights need the last axis divisible by {INT8_BLOCK}; "
                              f"shape is {list(arr.shape)}")
    k = arr.shape[-1]
    flat = arr.reshape(-1, k)                                                # [R,K]
    values = np.empty(flat.shape, np.int8)                                   # [R,K]
    scales = np.empty((flat.shape[0], k // INT8_BLOCK), np.float16)          # [R,K/32]
    for r0 in range(0, flat.shape[0], rows_per_step):
        part = flat[r0:r0 + rows_per_step].astype(np.float32)                # [r,K]
        if not np.isfinite(part).all():
            bad = r0 + int(np.nonzero(~np.isfinite(part).all(axis=1))[0][0])
            raise CheckpointError(f"{name}: row {bad} holds NaN or inf; int8 weights need finite values "
                                  f"(load with the stored weights, or fix the checkpoint)")
        blocks = part.reshape(part.shape[0], -1, INT8_BLOCK)                 # [r,K/32,32]
        s = scale_up(np.abs(blocks).max(axis=2) / np.float32(INT8_MAX))      # [r,K/32] float16
        if not np.isfinite(s).all():
            bad = r0 + int(np.nonzero(~np.isfinite(s).all(axis=1))[0][0])
            raise CheckpointError(f"{name}: row {bad} has a value beyond {INT8_MAX * SCALE_MAX:.4g} in magnitude; "
                                  f"int8 weights keep one float16 scale per {INT8_BLOCK} values (load with "
                                  f"the stored weights)")
        s32 = s.astype(np.float32)[..., None]                                # [r,K/32,1]
        q = np.rint(np.divide(blocks, s32, out=np.zeros_like(blocks), where=s32 > 0))   # [r,K/32,32]
        values[r0:r0 + part.shape[0]] = np.clip(q, -INT8_MAX, INT8_MAX).reshape(part.shape)
        scales[r0:r0 + part.shape[0]] = s
    return Int8Weight(values.reshape(arr.shape), scales.reshape(*arr.shape[:-1], k // INT8_BLOCK), name)
