"""Helpers of the per-op argument checks (the one validation layer; spec/backends.md).

Every backend op has one ``check_<op>_args`` next to its reference in ``gptevo/ops/<module>.py``;
these helpers are what those checks share. They read only the metadata (``shape``, ``dtype``) of an
array that is not a NumPy array, so a backend's device arrays (CuPy) are checked without a host
transfer; values are read only from NumPy arrays (index ranges of ids). Nothing here converts
dtypes or copies data: canonical arguments are the caller's arrays, checked.
"""
from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np

from gptevo.errors import RequestError


def array(a):
    """``a`` itself when it is an array object (has ``shape`` and ``dtype``: a NumPy array, a
    backend's device array, a packed weight), else ``np.asarray(a)`` (lists, Python scalars)."""
    if type(a) is np.ndarray or (hasattr(a, "shape") and hasattr(a, "dtype")):
        return a
    return np.asarray(a)


def on_host(a) -> bool:
    """True for a NumPy array: the only kind whose values a check may read."""
    return isinstance(a, np.ndarray)


def all_in_range(ids: np.ndarray, n: int) -> bool:
    """True when every value of the NumPy integer array ``ids`` lies in [0, n). A few ids (a decode
    step's) are compared as Python ints, which is several times faster than NumPy reductions."""
    if ids.size <= 16:
        values = ids.reshape(-1).tolist()
        return min(values) >= 0 and max(values) < n
    return bool(ids.min() >= 0) and bool(ids.max() < n)


def shape_of(a) -> tuple:
    """``a.shape`` as a tuple (``np.shape`` for lists and scalars); never reads values."""
    return tuple(a.shape) if hasattr(a, "shape") else np.shape(a)


def is_real(dtype) -> bool:
    """A real numeric dtype: float, signed or unsigned int, or bfloat16 (ml_dtypes)."""
    return isinstance(dtype, np.dtype) and (dtype.kind in "iuf" or dtype.name == "bfloat16")


_REAL_KINDS = frozenset("iuf")


def real_array(a, what: str):
    """``array(a)``; RequestError naming ``what`` unless its dtype is real (see :func:`is_real`)."""
    if type(a) is not np.ndarray:
        a = array(a)
    dtype = a.dtype
    if dtype.kind not in _REAL_KINDS and not is_real(dtype):       # kind first: the common case is fast
        raise RequestError(f"{what} must be a real-valued array; found dtype {a.dtype}")
    return a


def integer_positions(p, what: str):
    """``array(p)`` as 1-D integer positions; RequestError naming ``what`` otherwise."""
    p = array(p)
    if len(p.shape) != 1 or p.dtype.kind not in "iu":
        raise RequestError(f"{what} must be a 1-D integer array, got shape {tuple(p.shape)} dtype {p.dtype}")
    return p


def weight(w, ndim: int, what: str, rank_message: str):
    """A weight: a real array or a packed weight object (``decode(dtype)`` and ``shape``: MXFP4,
    int8 blocks) of rank ``ndim``. ``rank_message`` is the error for another rank (``{shape}`` is
    filled in)."""
    packed = type(w) is not np.ndarray and hasattr(w, "decode")
    if packed and not hasattr(w, "shape"):
        raise RequestError(f"{what}: a packed weight ({type(w).__name__}) must have a shape (its logical shape)")
    if not packed:
        w = array(w)
    if len(w.shape) != ndim:
        raise RequestError(rank_message.format(shape=tuple(w.shape)))
    if not packed and not is_real(w.dtype):
        raise RequestError(f"{what} has dtype {w.dtype}; expected float32, float64, float16, bfloat16 or a "
                           f"packed weight (MXFP4, int8 blocks)")
    return w


def finite_real(value, what: str) -> float:
    """``value`` as a Python float; RequestError unless it is a finite real number (not a bool)."""
    kind = type(value)
    if kind is float or kind is int:                      # fast path: no ABC isinstance (bool is not int here)
        if math.isfinite(value):
            return float(value)
    elif not isinstance(value, (bool, np.bool_)) and isinstance(value, Real) and math.isfinite(value):
        return float(value)
    raise RequestError(f"{what} must be a finite real number; found {value!r}")


def positive_int(value, what: str) -> int:
    """``value`` as a Python int >= 1; RequestError otherwise (bools refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Integral) or value < 1:
        raise RequestError(f"{what} must be a positive integer; found {value!r}")
    return int(value)


def one_of(value, choices: tuple, message: str):
    """``value`` when it is one of ``choices``; else RequestError ``message`` (``{value!r}`` filled in)."""
    if not isinstance(value, str) or value not in choices:
        raise RequestError(message.format(value=value))
    return value
