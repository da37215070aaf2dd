"""Model weights in their stored dtype, built from a checkpoint and a layout (llama2.c's TransformerWeights).

Every tensor keeps the dtype it has on disk (bf16 stays ``ml_dtypes.bfloat16``, MXFP4 experts stay packed
as :class:`gptevo.ops.mxfp4.Mxfp4Weight`); the ops widen them to the compute dtype. Memory-mapped arrays
are kept as they are, except where the layout needs a transform: GPT-2's 2-D Conv1D weights are
transposed into contiguous copies; HF gpt-oss dequantized experts ``[E, in, out]`` become transposed
views (``moe_experts`` widens one expert at a time); a row slice (fused qkv) is a view; per-expert
tensors (Mixtral, Qwen3-MoE) are wrapped in an :class:`ExpertStack` that reads like ``[E, 2I, D]``
without copying every expert.

Every tensor's shape and dtype is checked against the layout (which derives it from the config) from the
checkpoint header (``checkpoint.info``) BEFORE any data is read. Tensors no role uses are never read.

Values are not read at load time unless asked: ``check_weights`` (``gptevo.load(..., check_weights=True)``)
scans every used floating tensor for NaN/inf in bounded chunks and every MXFP4 scale tensor for E8M0
NaN (255) and for blocks that overflow float32 when decoded (spec/formats.md, "Weight values").
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from gptevo.errors import CheckpointError, GptevoError
from gptevo.layouts import Layout, Mxfp4, Source, Stacked, Tensor

FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
_DTYPE_ALIASES = {
    "f32": "float32", "float": "float32", "f16": "float16", "half": "float16", "bf16": "bfloat16",
    "f64": "float64", "double": "float64", "u8": "uint8", "i8": "int8", "i32": "int32", "i64": "int64",
    "bool": "bool", "i16": "int16", "f8_e4m3": "float8_e4m3fn", "f8_e5m2": "float8_e5m2",
}
_ST_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "uint8": "U8"}


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
    # fused projections, made at load time when the backend asks for them (gptevo.prepare); the
    # separate tensors above then become row views of these, so no byte is held twice
    wqkv: Any = None                   # [(H+2G)*Dh, D] = wq | wk | wv
    bqkv: Any = None                   # [(H+2G)*Dh]
    w_gate_up: Any = None              # [2I, D] = w_gate | w_up (dense gated MLP)
    b_gate_up: Any = None              # [2I]

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
        fused = ("wqkv", "bqkv", "w_gate_up", "b_gate_up")          # before the views made of them
        arrays += [getattr(layer, name) for layer in self.layers for name in fused]
        arrays += [getattr(layer, f.name) for layer in self.layers for f in fields(layer)]
        for a in arrays:
            if a is None or id(a) in seen:
                continue
            seen.add(id(a))
            storage = getattr(a, "values", a)          # Int8Weight keeps its rows in .values
            seen.add(id(storage))
            if isinstance(storage, np.ndarray) and storage.base is not None and id(storage.base) in seen:
                continue        # a row view of a fused weight counted already
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


def _info(ckpt, name: str, raw: bool = False) -> tuple[str, tuple[int, ...]]:
    """(dtype name, shape) of ``name`` from the checkpoint header, whatever form ``info`` returns.

    The dtype is canonical ("bfloat16", "uint8", ...), or as the header spells it with ``raw=True``."""
    info = ckpt.info(name)
    if hasattr(info, "shape") and hasattr(info, "dtype"):
        dtype, shape = info.dtype, info.shape
    elif isinstance(info, dict):
        dtype, shape = info.get("dtype"), info.get("shape")
    else:
        dtype, shape = info
    return (str(dtype) if raw else _dtype_name(dtype)), tuple(int(s) for s in shape)


def _where(ckpt, name: str) -> str:
    """``"<file>: "`` holding ``name`` when the checkpoint can tell, else ``""`` (for error messages)."""
    source = getattr(ckpt, "source", None)
    if callable(source):
        try:
            return f"{source(name)}: "
        except GptevoError:     # a message prefix only; the check itself reports a missing tensor
            return ""
    return ""


def _check(ckpt, name: str, shape: tuple[int, ...], allowed: tuple[str, ...]) -> None:
    dtype, found = _info(ckpt, name)
    if found != tuple(shape):
        raise CheckpointError(f"{_where(ckpt, name)}tensor {name!r} has shape {list(found)}, expected "
                              f"{list(shape)} from the config")
    if dtype not in allowed:
        stored = _info(ckpt, name, raw=True)[0]
        shown = stored if stored == dtype else f"{stored} ({dtype})"
        raise CheckpointError(f"{_where(ckpt, name)}tensor {name!r} has dtype {shown}, expected one of "
                              f"{', '.join(f'{_ST_NAMES.get(a, a)} ({a})' for a in allowed)}")


def check_source(ckpt, src: Source) -> None:
    """Raise CheckpointError when a source's stored tensors disagree with the layout (header only)."""
    if isinstance(src, Tensor):
        _check(ckpt, src.name, src.shape, FLOAT_DTYPES)
    elif isinstance(src, Mxfp4):
        if src.shape[-1] % (2 * src.blocks_shape[-1]) or src.shape[-1] == 0:
            raise CheckpointError(f"{_where(ckpt, src.blocks)}tensor {src.blocks!r} is MXFP4 (blocks of "
                                  f"{2 * src.blocks_shape[-1]} values along the input axis), but the config "
                                  f"gives an input width of {src.shape[-1]}; expected a positive multiple of "
                                  f"{2 * src.blocks_shape[-1]}")
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

        return Mxfp4Weight(reader.get(src.blocks), reader.get(src.scales), name=src.blocks)
    if isinstance(src, Stacked):
        return ExpertStack([[reader.get(t.name) for t in parts] for parts in src.parts])
    raise TypeError(f"unknown source {src!r}")  # pragma: no cover (programming error)


def load_weights(ckpt, layout: Layout, check_weights: bool = False) -> ModelWeights:
    """Check every tensor's header, then read them into a ModelWeights (fused tensors read once).

    ``check_weights=True`` also scans the values (``check_values``) before building anything.
    """
    for src in layout.globals.values():
        check_source(ckpt, src)
    for layer in layout.layers:
        for src in layer.values():
            check_source(ckpt, src)
    if check_weights:
        check_values(ckpt, layout)

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


# -- value scan (opt-in) ---------------------------------------------------------------------------
SCAN_CHUNK = 1 << 22          # elements per chunk: bounded temporaries (a few MB) whatever the tensor size
SCAN_BLOCKS = 1 << 20         # MXFP4 scale bytes per chunk (gathers at most 16 MB of blocks)
# Magnitudes of the E2M1 codes 0..7 (bit 3 is the sign). E8M0 scale bytes whose blocks can overflow
# float32 when decoded: value = code_value * 2**(s - 127) and float32 max is (2 - 2**-23) * 2**127, so
# s = 254 overflows for |code value| >= 2 (codes 4..7) and s = 253 for |code value| >= 4 (codes 6, 7);
# s = 255 is the E8M0 NaN (OCP MX v1.0).
_FP4_MAGNITUDE = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _index(shape: tuple[int, ...], flat: int) -> list[int]:
    return [int(i) for i in np.unravel_index(flat, shape)] if shape else []


def scan_finite(a, name: str, where: str = "") -> None:
    """CheckpointError naming ``name`` and the first index when floating array ``a`` holds NaN or inf.

    Reads ``a`` in chunks of SCAN_CHUNK elements, so the temporaries stay small for any tensor size.
    """
    flat = np.asarray(a).reshape(-1)                                 # [N] (a view of a contiguous map)
    for start in range(0, flat.size, SCAN_CHUNK):
        chunk = flat[start:start + SCAN_CHUNK]                       # [<=SCAN_CHUNK]
        ok = np.isfinite(chunk)
        if not ok.all():
            bad = np.flatnonzero(~ok)                                # positions in this chunk
            first = start + int(bad[0])
            value = float(chunk[int(bad[0])])
            raise CheckpointError(f"{where}tensor {name!r} holds {value} at index {_index(a.shape, first)} "
                                  f"({bad.size} non-finite value(s) in elements {start}..{start + chunk.size - 1}); "
                                  f"expected finite weights")


def scan_mxfp4(blocks, scales, blocks_name: str, scales_name: str, where: str = "") -> None:
    """CheckpointError when an MXFP4 weight has a scale byte 255 (NaN) or a block that decodes to inf.

    Only the scales are read in full (1/16 of the blocks' bytes); blocks are read only where the scale
    is 253 or 254 (rare), to see whether their largest element overflows float32.
    """
    s_flat = np.asarray(scales).reshape(-1)                          # [E*N*G]
    b_rows = np.asarray(blocks).reshape(-1, blocks.shape[-1])        # [E*N*G, 16]
    for start in range(0, s_flat.size, SCAN_BLOCKS):
        chunk = s_flat[start:start + SCAN_BLOCKS]                    # [<=SCAN_BLOCKS] u8
        high = np.flatnonzero(chunk >= 253)                          # candidates only
        if high.size == 0:
            continue
        nan = high[chunk[high] == 255]
        if nan.size:
            first = start + int(nan[0])
            raise CheckpointError(f"{where}tensor {scales_name!r} has MXFP4 scale byte 255 (E8M0 NaN) at "
                                  f"block {_index(scales.shape, first)} ({nan.size} such block(s) in this chunk); "
                                  f"expected scale bytes 0..254")
        cand = start + high                                          # flat block indices, scale 253/254
        rows = b_rows[cand]                                          # [n, 16] (n <= SCAN_BLOCKS)
        top = np.maximum(rows & 0x07, (rows >> 4) & 0x07).max(axis=1)    # [n] largest magnitude code
        limit = np.where(chunk[high] == 254, 4, 6)                   # [n] first overflowing code
        over = np.flatnonzero(top >= limit)
        if over.size:
            g, s, t = int(cand[over[0]]), int(chunk[high[over[0]]]), int(top[over[0]])
            raise CheckpointError(
                f"{where}tensor {blocks_name!r} block {_index(scales.shape, g)} has scale byte {s} and an "
                f"element of magnitude {_FP4_MAGNITUDE[t]}: {_FP4_MAGNITUDE[t]} * 2**{s - 127} overflows "
                f"float32 ({over.size} such block(s) in this chunk); expected finite decoded weights")


def check_values(ckpt, layout: Layout) -> None:
    """Scan the values of every tensor the layout uses (each stored tensor once); CheckpointError on the
    first NaN/inf float weight or bad MXFP4 scale, naming the file and tensor. Unused tensors are not read.
    """
    seen: set[str] = set()
    sources = list(layout.globals.values()) + [src for layer in layout.layers for src in layer.values()]
    for src in sources:
        if isinstance(src, Mxfp4):
            if src.scales not in seen:
                seen.update(src.names)
                scan_mxfp4(ckpt.get(src.blocks), ckpt.get(src.scales), src.blocks, src.scales,
                           _where(ckpt, src.scales))
            continue
        for name in src.names:
            if name not in seen:
                seen.add(name)
                scan_finite(ckpt.get(name), name, _where(ckpt, name))
