"""The numba backend: the ops compiled for the CPU with numba (the second tier after the reference).

Importing ``gptevo`` never imports numba: the backend registry imports this package only after
``importlib.util.find_spec("numba")`` found it, and :func:`probe` reports why it cannot be used
(numba missing or failing to import). ``OPS`` maps op names to implementations with exactly the
reference's keyword signatures and output dtypes; an op that is not here is simply absent.

Notes per op (where a numba op is not a plain kernel):
- linear, moe_experts: weights stay in their stored dtype (f32/f64/f16/bf16) or packed MXFP4 and are
  widened or decoded inside :func:`_linear.grouped_gemm`: row by row inside the dot product for a
  single input row (decode), or eight rows at a time into a cache-resident tile for several input
  rows (prefill, experts shared by several tokens). No weight is materialised in a wider dtype.
- attention: GQA, windows, positions (ring-buffer slots, empty slots < 0), sinks and ALiBi are all
  in the kernel; nothing is delegated to the reference. k/v stored as f16/bf16 are widened in the
  wrapper. Keys whose probability is exactly 0 (masked) are skipped in the value sum, so a NaN in a
  masked V slot does not leak (the reference's 0 * NaN would give NaN).
- gelu_mlp, swiglu_mlp, learned_positions: compositions of this backend's own kernels;
  alibi_slopes: H numbers computed in plain Python (nothing to compile).
- dropout is absent (training only; its random stream is the reference's by definition).
- Small vectors (norm weights/biases, sinks, router logits, routing weights) are widened in the
  wrapper.
- Decode (one input row): ``linear`` streams each weight kind through its own GEMV kernel
  (:mod:`_gemv`: float32/float64, bf16, f16, int8 blocks) and ``moe_experts`` through the explicit
  SIMD MXFP4 kernels (:mod:`_mxfp4_gemv`); these and attention use reassociating fast-math
  (spec/backends.md, "Numerical policy"). Several rows: BLAS on float32 weights or on bounded
  widened tiles of bf16/f16/int8 weights; other cases take :func:`_linear.grouped_gemm`.
- Kernels are compiled on first use and cached on disk (``cache=True``: ``__pycache__`` next to the
  sources, or numba's user cache directory when that is read-only), so a second process starts
  without compiling. :func:`prepare_weights` (the load-time hook) fuses q|k|v and gate|up and makes
  mapped weight pages resident.
- :func:`decode_program` (the fused-step hook): GPT-2-style models decode one token in a single
  parallel region with spin barriers between dependent steps (:mod:`_fused_decode`), instead of ~8
  regions per layer; other models, prefill and batched steps run the ops.
"""
from __future__ import annotations

import importlib.util

import os

# Worker threads of numba's OpenMP layer spin for a short while (20,000 iterations, tens of µs)
# after a parallel region ends, then sleep; libgomp's default spins 15x longer. Decode runs ~40
# short regions per token: GPT-2 decode on the 2-core machine, quiet, 3 rounds: 44.7-45.9 tok/s
# with this, 41.5-45.9 with the default, 38.7-41.9 with sleeping at once (OMP_WAIT_POLICY=passive);
# with another busy process the default spin once made it 9x slower. Read by libgomp when numba's
# OpenMP pool first loads, so it is set before any kernel runs; values the user set win
# (spec/backends.md, "Threads").
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "20000")

_IMPORT_ERROR: str | None = None
try:
    from gptevo.backends.numba._ops import OPS
except Exception as exc:  # numba missing or broken: the registry reports probe()'s reason instead
    OPS: dict = {}
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def prepare_weights(weights, config, mode="stored"):
    """Load-time preparation for this backend: q|k|v and gate|up fused into one matrix each (one
    streaming call instead of three), 16-bit expert biases widened to float32 (exact), MXFP4
    experts and the int8 dense weights marked for the int8-activation decode kernels when
    ``mode == "int8"`` (the opt-in 8-bit mode), and the memory-mapped weights copied into private
    memory (huge pages: no page faults and fewer TLB misses per decoded token; the mapped ranges are
    dropped as they are copied, see gptevo.prepare.make_private)."""
    from dataclasses import fields

    from gptevo.prepare import fuse_projections, make_private

    import numpy as np

    fuse_projections(weights)
    for layer in weights.layers:        # 16-bit expert biases widened once (exactly), not in every moe_experts call
        for name in ("experts_gate_up_bias", "experts_down_bias"):
            b = getattr(layer, name, None)
            if isinstance(b, np.ndarray) and b.dtype.name in ("bfloat16", "float16"):
                setattr(layer, name, np.ascontiguousarray(b, np.float32))
    if mode == "int8":
        from gptevo.backends.numba._gemv_q8 import mark
        from gptevo.backends.numba._mxfp4_gemv import prepare

        weights.lm_head = mark(weights.lm_head)
        for layer in weights.layers:
            for f in fields(layer):
                setattr(layer, f.name, mark(getattr(layer, f.name)))

        for layer in weights.layers:
            for name in ("experts_gate_up", "experts_down"):
                w = getattr(layer, name)
                if getattr(w, "dtype", None) == "mxfp4":
                    setattr(layer, name, prepare(w, mode="int8", copy=False))
    make_private(weights)
    return weights


def fused_decode_enabled() -> bool:
    """``GPTEVO_FUSED_DECODE``: unset, "1", "true", "yes", "on" -> True; "0", "false", "no", "off" ->
    False (any case); anything else is a ConfigError naming the variable and the accepted values."""
    from gptevo.errors import ConfigError

    value = os.environ.get("GPTEVO_FUSED_DECODE", "1").strip().lower()
    if value in ("", "1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"GPTEVO_FUSED_DECODE={os.environ['GPTEVO_FUSED_DECODE']!r}: expected 1/true/yes/on or "
                      f"0/false/no/off")


def decode_program(config, weights, dtype):
    """The fused decode step for this model (``_fused_decode.plan``: GPT-2- and gpt-oss-style models
    on an AVX-512 host, a whole token in one parallel region), or None. ``GPTEVO_FUSED_DECODE=0`` (or
    false/no/off) turns it off (the ops then run one by one, e.g. to compare the two)."""
    if not fused_decode_enabled() or _IMPORT_ERROR is not None:
        return None
    from gptevo.backends.numba._fused_decode import plan

    return plan(config, weights, dtype)


def probe() -> str | None:
    """None when numba imports and the kernels module loaded; else the reason in words."""
    if importlib.util.find_spec("numba") is None:
        return "the Python package 'numba' is not installed (pip install 'gptevo[numba]')"
    if _IMPORT_ERROR is not None:
        return f"numba is installed but the numba backend failed to import ({_IMPORT_ERROR})"
    return None
