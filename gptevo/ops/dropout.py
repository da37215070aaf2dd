"""Inverted dropout (spec: ``spec/ops/blocks.md``).

Modern GPTs run without dropout and every model here is inference-only, so ``training=False``
(the default) makes this the identity. The training form is kept so the seed's GPT-2-era equation
has an executable definition.
"""
from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np

from gptevo.errors import RequestError
from gptevo.ops.checks import real_array
from gptevo.ops.spec import Case, compute_dtype, op

SPEC = "spec/ops/blocks.md"


def check_dropout_args(x, p, seed, training=False) -> dict:
    """x real; p a probability in [0, 1) (as a float); seed an int >= 0; training as a bool."""
    if isinstance(p, bool) or not isinstance(p, Real) or not math.isfinite(p) or not 0.0 <= p < 1.0:
        raise RequestError(f"dropout: p must be a probability in [0, 1); found {p!r}")
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise RequestError(f"dropout: seed must be a non-negative integer; found {seed!r}")
    return {"x": real_array(x, "dropout: x"), "p": float(p), "seed": int(seed), "training": bool(training)}


def _dropout_cases(rng: np.random.Generator):
    for shape, dt, p, seed, training in [((1, 8), np.float32, 0.1, 0, False),
                                         ((5, 13), np.float32, 0.5, 1, True),
                                         ((3, 16), np.float64, 0.2, 7, True),
                                         ((4, 7), np.float64, 0.0, 3, True),
                                         ((2, 3, 5), np.float32, 0.9, 11, True)]:
        x = rng.standard_normal(shape).astype(dt)
        label = f"shape={list(shape)},dtype={'f64' if dt == np.float64 else 'f32'},p={p},training={training}"
        yield Case(label, {"x": x, "p": p, "seed": seed, "training": training})


@op("dropout",
    signature="dropout(x, p, seed, training=False) -> x.shape",
    dtypes="x: f32|f64 (f16/bf16 compute in f32); p: float in [0, 1); seed: int >= 0",
    tolerance={"float32": 1e-6, "float64": 1e-12},
    cases=_dropout_cases,
    source="seed '1. Dropout Elimination' (Dropout(x) = x/(1-p) with probability 1-p, else 0); "
           "Srivastava et al. 2014 (inverted scaling as in torch.nn.Dropout)",
    spec_file=SPEC, check=check_dropout_args)
def dropout(x, p, seed, training=False):
    """Inverted dropout: zero each element with probability ``p`` and scale the rest by ``1/(1-p)``.

    x: any shape; returns x.shape in x's compute dtype (a copy). Identity when ``training`` is
    False or ``p == 0``. The mask is defined by NumPy's generator so that it is reproducible:
    ``u = np.random.default_rng(seed).random(x.shape)`` (float64 in [0, 1)), element kept iff
    ``u >= p``; kept elements become ``x * (1 / (1 - p))``. Same seed, same mask.
    ``p`` outside [0, 1) or a negative/non-integer seed raise RequestError.
    """
    dtype = compute_dtype(x)
    out = x.astype(dtype, copy=True)  # [...]
    if not training or p == 0.0:
        return out
    keep = np.random.default_rng(seed).random(x.shape) >= p  # [...] bool
    scale = dtype.type(1.0 / (1.0 - p))
    return np.where(keep, out * scale, dtype.type(0.0)).astype(dtype, copy=False)  # [...]
