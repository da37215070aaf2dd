"""The op registry: one :class:`OpSpec` per operator.

An op is defined once. Its spec entry carries the signature (with shapes), the dtypes it accepts,
the tolerance a backend must meet per compute dtype, a generator of test cases, and the NumPy
reference implementation, which is the executable half of the written spec in ``spec/ops/``.

Backends implement the same op names with the same keyword signatures; the conformance suite
(``gptevo.conformance``) runs every case of every op on a backend and compares with the reference.

Argument checks (the one validation layer, spec/backends.md): each backend op has one
``check_<op>_args`` next to its reference, with the op's signature, returning the op's keyword
arguments in canonical form (or raising RequestError). :func:`validated` pairs a check with an
implementation; the public reference functions are such pairs, and the backend registry wraps
every backend's ops the same way, so a call through a backend is checked exactly once and the
implementations themselves (``OpSpec.kernel``, a backend's ``OPS``) contain no checks.
"""
from __future__ import annotations

import functools
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
    check:       ``check(**kwargs) -> dict``: the op's argument check (same signature as the op),
                 returning canonical keyword arguments; None only for ops that are not backend ops.
    kernel:      the reference's body on canonical arguments (no checks): the reference backend's op.
                 ``reference`` is the public function, ``validated(check, kernel)``.
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
    check: Callable[..., dict] | None = None
    kernel: Callable[..., Any] | None = None


REGISTRY: dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    """Add ``spec`` to the registry; a second entry with the same name is a programming error."""
    if spec.name in REGISTRY:
        raise RuntimeError(f"op {spec.name!r} registered twice")
    REGISTRY[spec.name] = spec
    return spec


def op(name: str, *, signature: str, dtypes: str, tolerance: Mapping[str, float], cases, source: str,
       spec_file: str, flops=None, bytes=None, exact: bool = False, backend_op: bool = True, notes: str = "",
       check: Callable[..., dict] | None = None):
    """Decorator form of :func:`register` for a reference function.

    With ``check``, the decorated function is the op's body on canonical arguments (``kernel``) and
    the name it is bound to becomes the public, checked function ``validated(check, body)``.
    A backend op must have a check.
    """

    def wrap(fn):
        if backend_op and check is None:
            raise RuntimeError(f"backend op {name!r} registered without an argument check")
        public = fn if check is None else validated(check, fn)
        register(OpSpec(name=name, reference=public, signature=signature, dtypes=dtypes,
                        tolerance=dict(tolerance), cases=cases, source=source, spec_file=spec_file,
                        flops=flops, bytes=bytes, exact=exact, backend_op=backend_op, notes=notes,
                        check=check, kernel=fn))
        return public

    return wrap


def validated(check: Callable[..., dict], impl: Callable[..., Any]) -> Callable[..., Any]:
    """``impl`` behind ``check``: ``call(*args, **kwargs) = impl(**check(*args, **kwargs))``.

    The result carries ``__wrapped__ = impl`` (so ``inspect.signature`` shows impl's signature) and
    ``__gptevo_check__ = check``; :func:`unchecked` gives impl back, so wrapping never nests.
    """
    impl = unchecked(impl)

    @functools.wraps(impl)
    def call(*args, **kwargs):
        return impl(**check(*args, **kwargs))

    call.__gptevo_check__ = check
    return call


def unchecked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The implementation behind a :func:`validated` function; any other callable unchanged."""
    return fn.__wrapped__ if getattr(fn, "__gptevo_check__", None) is not None else fn


def compute_dtype(*arrays) -> np.dtype:
    """The compute dtype of activations: float64 when any is float64, else float32 (f16/bf16/int
    compute in float32)."""
    for x in arrays:
        if (x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype) == np.float64:
            return np.dtype(np.float64)
    return np.dtype(np.float32)


def widen(w, dtype) -> np.ndarray:
    """Widen a stored weight (f32, f16, bf16 via ml_dtypes, ...) to the compute dtype ``dtype``.

    Widening bf16/f16 to f32 is exact. Packed MXFP4 weights are decoded by ``gptevo.ops.mxfp4``;
    objects with a ``decode(dtype)`` method are decoded through it.
    """
    if hasattr(w, "decode"):
        return w.decode(dtype)
    return np.asarray(w).astype(dtype, copy=False)
