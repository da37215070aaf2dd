"""Blockwise int8 weights: the optional 8-bit mode for dense weights (spec: spec/ops/int8.md).

A weight ``W`` [..., K] is stored as int8 values ``q`` [..., K] and one float32 scale per 32
consecutive values along K, ``s`` [..., K/32] (the block size of MXFP4 and of GGUF's Q8_0):

    s[b] = max_j |W[32b + j]| / 127        (0 for an all-zero block)
    q[32b + j] = round_half_even(W[32b + j] / s[b])     in [-127, 127]
    decoded W'[32b + j] = float32(q[32b + j]) * s[b]    (rounded to the compute dtype)

The per-value error is at most s[b] / 2 = max|W in block| / 254 (0.4 % of the block's largest
magnitude). :func:`quantize_int8` refuses non-finite weights and K not divisible by 32, naming the
tensor. ``Int8Weight.decode`` is what every reference op sees (through ``gptevo.ops.spec.widen``),
so a model loaded with ``weights="int8"`` runs unchanged on the reference.
"""
from __future__ import annotations

import numpy as np

from gptevo.errors import CheckpointError, RequestError

INT8_BLOCK = 32
INT8_MAX = 127


class Int8Weight:
    """int8 ``values`` [..., K] and float32 ``scales`` [..., K/32]; logical shape [..., K].

    ``dtype`` is the string "int8_block32"; ``nbytes`` counts values and scales; ``decode(dtype)``
    gives the widened weight. ``name`` is used in error messages (the checkpoint tensor name).
    """

    __slots__ = ("values", "scales", "name")

    def __init__(self, values: np.ndarray, scales: np.ndarray, name: str = "int8 weight"):
        if values.dtype != np.int8 or scales.dtype != np.float32:
            raise RequestError(f"{name}: Int8Weight needs int8 values and float32 scales; found "
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
        w = blocks * self.scales[..., None]                                                 # [...,K/32,32]
        return w.reshape(self.values.shape).astype(dtype, copy=False)                      # [...,K]

    def __repr__(self) -> str:
        return f"Int8Weight({self.name!r}, shape={list(self.shape)}, nbytes={self.nbytes})"


def quantize_int8(w, name: str = "weight", rows_per_step: int = 4096) -> Int8Weight:
    """Quantize a float weight [..., K] (f32/f64/f16/bf16) to :class:`Int8Weight`, ``rows_per_step``
    rows at a time (bounded temporary memory). CheckpointError naming ``name`` for non-finite values
    or K not a multiple of 32."""
    arr = np.asarray(w)
    if arr.ndim < 1 or arr.shape[-1] % INT8_BLOCK:
        raise CheckpointError(f"{name}: int8 weights need the last axis divisible by {INT8_BLOCK}; "
                              f"shape is {list(arr.shape)}")
    k = arr.shape[-1]
    flat = arr.reshape(-1, k)                                                # [R,K]
    values = np.empty(flat.shape, np.int8)                                   # [R,K]
    scales = np.empty((flat.shape[0], k // INT8_BLOCK), np.float32)          # [R,K/32]
    for r0 in range(0, flat.shape[0], rows_per_step):
        part = flat[r0:r0 + rows_per_step].astype(np.float32)                # [r,K]
        if not np.isfinite(part).all():
            bad = r0 + int(np.nonzero(~np.isfinite(part).all(axis=1))[0][0])
            raise CheckpointError(f"{name}: row {bad} holds NaN or inf; int8 weights need finite values "
                                  f"(load with the stored weights, or fix the checkpoint)")
        blocks = part.reshape(part.shape[0], -1, INT8_BLOCK)                 # [r,K/32,32]
        s = np.abs(blocks).max(axis=2) / np.float32(INT8_MAX)                # [r,K/32]
        q = np.rint(np.divide(blocks, s[..., None], out=np.zeros_like(blocks),
                              where=s[..., None] > 0))                       # [r,K/32,32]
        values[r0:r0 + part.shape[0]] = np.clip(q, -INT8_MAX, INT8_MAX).reshape(part.shape)
        scales[r0:r0 + part.shape[0]] = s
    return Int8Weight(values.reshape(arr.shape), scales.reshape(*arr.shape[:-1], k // INT8_BLOCK), name)
