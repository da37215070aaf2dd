"""Model weights in their stored dtype, built from a checkpoint and a layout (llama2.c's TransformerWeights).

Every tensor keeps the dtype it has on disk (bf16 stays ``ml_dtypes.bfloat16``, MXFP4 experts stay packed
as :class:`gptevo.ops.mxfp4.Mxfp4Weight`); the ops widen them to the compute dtype. Memory-mapped arrays
are kept as they are, except where the layout needs a transform: GPT-2's 2-D Conv1D weights are
transposed into contiguous copies; HF gpt-oss dequantized experts ``[E, in, out]`` become transposed
views (``moe_experts`` widens one expert at a time); a row slice (fused qkv) is a view; per-expert
tensors (Mixtral, Qwen3-MoE) are wrapped in an :class:`ExpertStack` that reads like ``[E, 2I, D]``
without copying every expert.

Every tensor's shape and dtype is checked against the layout (which derives it from the config) from the
checkpoint header (``checkpoint.info``) BEFORE any data is read.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from gptevo.errors import CheckpointError
from gptevo.layouts import Layout, Mxfp4, Source, Stacked, Tensor

FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
_DTYPE_ALIASES = {
    "f32": "float32", "float": "float32", "f16": "float16", "half": "float16", "bf16": "bfloat16",
    "f64": "float64", "double": "float64", "u8": "uint8", "i8": "int8", "i32": "int32", "i64": "int64",
    "bool": "bool",
}


@dataclass
class LayerWeights:
    """One transformer block. Linear weights are ``(out, in)``; None where the model has no such tensor."""

    attn_norm: Any = None
    attn_norm_bias: Any = None
    wq: Any = None           # [H*Dh, D]
    wk: Any = None           # [G*Dh, D]
    wv: Any = None           # [G*Dh, D]
    wo: Any = None           # [D, H*Dh]
    bq: Any = None
    bk: Any = None
    bv: Any = None
    bo: Any = None
    q_norm: Any = None       # [Dh] (Qwen3)
    k_norm: Any = None       # [Dh]
    sinks: Any = None        # [H] (gpt-oss)
    mlp_norm: Any = None
    mlp_norm_bias: Any = None
    # dense gated MLP (SwiGLU / GeGLU)
    w_gate: Any = None       # [I, D]
    w_up: Any = None         # [I, D]
    w_down: Any = None       # [D, I]
    b_gate: Any = None
    b_up: Any = None
    b_down: Any = None
    # dense GELU MLP (GPT-2)
    w_fc: Any = None         # [I, D]
    b_fc: Any = None
    w_proj: Any = None       # [D, I]
    b_proj: Any = None
    # mixture of experts
    router: Any = None                 # [E, D]
    router_bias: Any = None            # [E]
    experts_gate_up: Any = None        # [E, 2I, D] (array or Mxfp4Weight)
    experts_gate_up_bias: Any = None   # [E, 2I]
    experts_down: Any = None           # [E, D, I]
    experts_down_bias: Any = None      # [E, D]

    @property
    def is_moe(self) -> bool:
        return self.router is not None


@dataclass
class ModelWeights:
    """All weights: embedding, optional learned positions, layers, final norm and output head."""

    embed: Any                          # [V, D]
    final_norm: Any                     # [D]
    lm_head: Any                        # [V, D] (the embedding itself when tied)
    layers: list[LayerWeights] = field(default_factory=list)
    pos_embed: Any = None               # [P, D] (GPT-2)
    final_norm_bias: Any = None
    tied: bool = False

    def nbytes(self) -> int:
        """Bytes of weight data held (a tied head counted once)."""
        seen, total = set(), 0
        arrays = [self.embed, self.final_norm, self.lm_head, self.pos_embed, self.final_norm_bias]
        arrays += [getattr(layer, f.name) for layer in self.layers for f in fields(layer)]
        for a in arrays:
            if a is None or id(a) in seen:
                continue
            seen.add(id(a))
            total += int(getattr(a, "nbytes", 0))
        return total


class ExpertStack:
    """Per-expert tensors seen as one ``[E, rows, in]`` weight without copying them all.

    ``parts[e]`` lists expert e's stored arrays (Mixtral ``w1``, ``w3``: concatenated on axis 0 when
    an expert is selected). ``w[e]`` returns expert e (a copy only when it has several parts), so
    ``moe_experts`` touches only the experts it routes to; ``np.asarray(w)`` builds the whole stack for
    backends that want one array. ``shape``, ``dtype``, ``ndim``, ``nbytes`` and ``len`` work as for
    an ndarray.
    """

    def __init__(self, parts):
        self.parts = [list(p) for p in parts]
        first = self.parts[0]
        self.shape = (len(self.parts), sum(a.shape[0] for a in first), *first[0].shape[1:])
        self.dtype = first[0].dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for p in self.parts for a in p)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, e):
        if isinstance(e, (int, np.integer)) and not isinstance(e, bool):
            p = self.parts[int(e)]
            return p[0] if len(p) == 1 else np.concatenate(p, axis=0)        # [rows, in]
        return np.asarray(self)[e]

    def __array__(self, dtype=None, copy=None):
        out = np.stack([self[e] for e in range(len(self))], axis=0)          # [E, rows, in]
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"ExpertStack(shape={list(self.shape)}, dtype={self.dtype})"


# -- header checks -------------------------------------------------------------------------------
def _dtype_name(dtype) -> str:
    """A canonical dtype name ("bfloat16", "float32", "uint8", ...) from whatever ``info`` reports."""
    if isinstance(dtype, str):        # safetensors names ("BF16", "F32", "U8"); never np.dtype("U8")
        name = dtype.lower()
        return _DTYPE_ALIASES.get(name, name)
    return np.dtype(dtype).name


def _info(ckpt, name: str) -> tuple[str, tuple[int, ...]]:
    """(dtype name, shape) of ``name`` from the checkpoint header, whatever form ``info`` returns."""
    info = ckpt.info(name)
    if hasattr(info, "shape") and hasattr(info, "dtype"):
        dtype, shape = info.dtype, info.shape
    elif isinstance(info, dict):
        dtype, shape = info.get("dtype"), info.get("shape")
    else:
        dtype, shape = info
    return _dtype_name(dtype), tuple(int(s) for s in shape)


def _check(ckpt, name: str, shape: tuple[int, ...], allowed: tuple[str, ...]) -> None:
    dtype, found = _info(ckpt, name)
    if found != tuple(shape):
        raise CheckpointError(f"tensor {name!r} has shape {list(found)}, expected {list(shape)} from the config")
    if dtype not in allowed:
        raise CheckpointError(f"tensor {name!r} has dtype {dtype}, expected one of {', '.join(allowed)}")


def check_source(ckpt, src: Source) -> None:
    """Raise CheckpointError when a source's stored tensors disagree with the layout (header only)."""
    if isinstance(src, Tensor):
        _check(ckpt, src.name, src.shape, FLOAT_DTYPES)
    elif isinstance(src, Mxfp4):
        _check(ckpt, src.blocks, src.blocks_shape, ("uint8",))
        _check(ckpt, src.scales, src.scales_shape, ("uint8",))
    else:
        dtypes = set()
        for expert in src.parts:
            for t in expert:
                _check(ckpt, t.name, t.shape, FLOAT_DTYPES)
                dtypes.add(_info(ckpt, t.name)[0])
        if len(dtypes) > 1:
            raise CheckpointError(f"per-expert tensors such as {src.parts[0][0].name!r} mix dtypes "
                                  f"{sorted(dtypes)}; expected one dtype")


# -- materialising -------------------------------------------------------------------------------
class _Reader:
    """Reads each stored tensor (and each transposed copy) once, so fused tensors are shared by roles."""

    def __init__(self, ckpt):
        self.ckpt = ckpt
        self.cache: dict[tuple[str, bool], Any] = {}

    def get(self, name: str, transpose: bool = False):
        key = (name, transpose)
        if key not in self.cache:
            a = self.ckpt.get(name)
            if transpose:
                a = np.swapaxes(a, -1, -2)                           # (in, out) -> (out, in), a view
                if a.ndim == 2:                                      # Conv1D: small, make it contiguous
                    a = np.ascontiguousarray(a)
            self.cache[key] = a
        return self.cache[key]


def read_source(reader: _Reader, src: Source):
    """The array (or Mxfp4Weight) for ``src`` in the engine's convention, in its stored dtype."""
    if isinstance(src, Tensor):
        a = reader.get(src.name, src.transpose)
        if src.rows is not None:
            a = a[src.rows[0]:src.rows[1]]                         # view into the fused tensor
        return a
    if isinstance(src, Mxfp4):
        from gptevo.ops.mxfp4 import Mxfp4Weight

        return Mxfp4Weight(reader.get(src.blocks), reader.get(src.scales))
    if isinstance(src, Stacked):
        return ExpertStack([[reader.get(t.name) for t in parts] for parts in src.parts])
    raise TypeError(f"unknown source {src!r}")  # pragma: no cover (programming error)


def load_weights(ckpt, layout: Layout) -> ModelWeights:
    """Check every tensor's header, then read them into a ModelWeights (fused tensors read once)."""
    for src in layout.globals.values():
        check_source(ckpt, src)
    for layer in layout.layers:
        for src in layer.values():
            check_source(ckpt, src)

    reader = _Reader(ckpt)
    g = {role: read_source(reader, src) for role, src in layout.globals.items()}
    if layout.tied:
        g["lm_head"] = g["embed"]
    layers = []
    for spec in layout.layers:
        reader.cache.clear()
        layers.append(LayerWeights(**{role: read_source(reader, src) for role, src in spec.items()}))
    return ModelWeights(embed=g["embed"], final_norm=g["final_norm"], lm_head=g["lm_head"], layers=layers,
                        pos_embed=g.get("pos_embed"), final_norm_bias=g.get("final_norm_bias"), tied=layout.tied)
