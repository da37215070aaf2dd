"""The op registry: one :class:`OpSpec` per operator.

An op is defined once. Its spec entry carries the signature (with shapes), the dtypes it accepts,
the tolerance a backend must meet per compute dtype, a generator of test cases, and the NumPy
reference implementation, which is the executable half of the written spec in ``spec/ops/``.

Backends implement the same op names with the same keyword signatures; the conformance suite
(``gptevo.conformance``) runs every case of every op on a backend and compares with the reference.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import numpy as np

# Compute dtypes the references support. float32 is the default; float64 is for checking the
# float32 path itself (and for peers that run in double).
COMPUTE_DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class Case:
    """One concrete call of an op: keyword arguments plus a readable label.

    ``kwargs`` holds numpy arrays and plain Python scalars only, so the same case can be handed to
    any backend. ``label`` reads like ``shape=[5,7,13],dtype=bf16w``; the conformance suite uses it in
    test ids.
    """

    label: str
    kwargs: Mapping[str, Any]


@dataclass(frozen=True)
class OpSpec:
    """The spec entry of one operator.

    name:        the op's name, shared by every backend (``rms_norm``).
    reference:   the NumPy reference implementation (keyword arguments as in ``signature``).
    signature:   human-readable signature with shapes, e.g. ``rms_norm(x[...,D], weight[D], eps) -> [...,D]``.
    dtypes:      dtypes accepted for activations/weights, in words (``x: f32|f64; weight: f32|f16|bf16``).
    tolerance:   max normalized error allowed per compute dtype name (see gptevo.conformance.compare).
    cases:       ``cases(rng) -> iterator of Case``: power-of-two and odd shapes, T=1 and T>1, etc.
    source:      where the equation comes from (seed section, paper, official code).
    spec_file:   the file in ``spec/ops/`` that describes the op in words.
    flops/bytes: optional ``f(**kwargs) -> int`` cost models used by benchmarks.
    exact:       True when backends must match bit for bit (e.g. MXFP4 decode).
    """

    name: str
    reference: Callable[..., Any]
    signature: str
    dtypes: str
    tolerance: Mapping[str, float]
    cases: Callable[[np.random.Generator], Iterator[Case]]
    source: str
    spec_file: str
    flops: Callable[..., int] | None = None
    bytes: Callable[..., int] | None = None
    exact: bool = False
    backend_op: bool = True
    notes: str = field(default="")


REGISTRY: dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    """Add ``spec`` to the registry; a second entry with the same name is a programming error."""
    if spec.name in REGISTRY:
        raise RuntimeError(f"op {spec.name!r} registered twice")
    REGISTRY[spec.name] = spec
    return spec


def op(name: str, *, signature: str, dtypes: str, tolerance: Mapping[str, float], cases, source: str,
       spec_file: str, flops=None, bytes=None, exact: bool = False, backend_op: bool = True, notes: str = ""):
    """Decorator form of :func:`register` for a reference function."""

    def wrap(fn):
        register(OpSpec(name=name, reference=fn, signature=signature, dtypes=dtypes,
                        tolerance=dict(tolerance), cases=cases, source=source, spec_file=spec_file,
                        flops=flops, bytes=bytes, exact=exact, backend_op=backend_op, notes=notes))
        return fn

    return wrap


def compute_dtype(x) -> np.dtype:
    """The compute dtype for an activation: float64 stays float64, everything else computes in float32."""
    dt = np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype
    return np.dtype(np.float64) if dt == np.float64 else np.dtype(np.float32)


def widen(w, dtype) -> np.ndarray:
    """Widen a stored weight (f32, f16, bf16 via ml_dtypes, ...) to the compute dtype ``dtype``.

    Widening bf16/f16 to f32 is exact. Packed MXFP4 weights are decoded by ``gptevo.ops.mxfp4``;
    objects with a ``decode(dtype)`` method are decoded through it.
    """
    if hasattr(w, "decode"):
        return w.decode(dtype)
    return np.asarray(w).astype(dtype, copy=False)
