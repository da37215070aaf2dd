"""Softmax over the last axis, with optional attention sinks (gpt-oss).

Written spec: ``spec/ops/attention.md`` §Softmax. Sources: the seed's attention equation
(``softmax(QK^T / sqrt(d_k)) V``); the sink rule is from the official gpt-oss code
(``gpt_oss/torch/model.py`` ``sdpa``: a per-head logit appended as one extra column whose
probability is dropped after the softmax).
"""
from __future__ import annotations

import numpy as np

from gptevo.errors import RequestError
from gptevo.ops.checks import array, real_array, shape_of
from gptevo.ops.spec import Case, compute_dtype, op


def check_softmax_args(x, sinks=None) -> dict:
    """x real with at least one axis; sinks None or an array that broadcasts to ``x.shape[:-1]``
    (returned as given: a backend broadcasts it)."""
    x = real_array(x, "softmax: x")
    if len(x.shape) == 0:
        raise RequestError("softmax: x must have at least one axis (the axis normalised over)")
    if sinks is not None:
        sinks = array(sinks)
        rows = tuple(x.shape[:-1])
        try:
            fits = np.broadcast_shapes(shape_of(sinks), rows) == rows
        except ValueError:
            fits = False
        if not fits:
            raise RequestError(f"softmax: sinks of shape {shape_of(sinks)} do not broadcast to the rows "
                               f"of x, shape {rows}")
    return {"x": x, "sinks": sinks}


def _cases(rng):
    """Rows of several lengths, with and without sinks, masked entries, fully masked rows."""
    def masked(shape, frac, dtype):
        x = (3 * rng.standard_normal(shape)).astype(dtype)
        x[rng.random(shape) < frac] = -np.inf
        return x

    yield Case("shape=[4,16]", {"x": rng.standard_normal((4, 16)).astype(np.float32)})
    yield Case("shape=[3,5,7],f64", {"x": rng.standard_normal((3, 5, 7))})
    yield Case("shape=[2,3,9],masked", {"x": masked((2, 3, 9), 0.4, np.float32)})
    yield Case("shape=[1],T=1,S=1", {"x": rng.standard_normal(1).astype(np.float32)})
    yield Case("shape=[4,3,8],sinks[4,1]", {"x": masked((4, 3, 8), 0.3, np.float32),
                                            "sinks": rng.standard_normal((4, 1)).astype(np.float32)})
    yield Case("shape=[5,11],sinks[5],f64", {"x": rng.standard_normal((5, 11)),
                                             "sinks": 2 * rng.standard_normal(5)})
    rows = masked((3, 6), 0.0, np.float32)
    rows[1] = -np.inf                                   # one fully masked row, no sink -> zeros
    yield Case("shape=[3,6],row_all_masked", {"x": rows})
    rows_s = rows.copy()
    yield Case("shape=[3,6],row_all_masked,sinks", {"x": rows_s, "sinks": np.float32(0.5) * np.ones(3, np.float32)})
    yield Case("shape=[2,4,33],large,sink_scalar", {"x": (30 * rng.standard_normal((2, 4, 33))).astype(np.float32),
                                                    "sinks": np.asarray(25.0, dtype=np.float32)})


@op("softmax",
    signature="softmax(x[...,S], sinks[...]|None=None) -> [...,S] (sinks broadcast to x.shape[:-1])",
    dtypes="x: f32|f64 (-inf allowed = masked); sinks: f32|f64|bf16, widened; out: x's compute dtype",
    tolerance={"float32": 1e-6, "float64": 1e-14}, cases=_cases,
    source="seed 'Mathematical Foundations' (softmax attention); sinks: official gpt-oss torch sdpa",
    spec_file="spec/ops/attention.md",
    flops=lambda x, **_: 4 * np.asarray(x).size, check=check_softmax_args)
def softmax(x, sinks=None):
    """``p_j = exp(x_j - m) / (sum_k exp(x_k - m) + exp(sink - m))`` over the last axis.

    ``m`` is the row maximum, the sink included, so no exponent is positive (numerically stable).
    Without sinks the sink term is absent. ``sinks`` broadcasts to ``x.shape[:-1]``: one raw logit
    per row that takes part in the normalisation but has no output column, so with a sink a row
    sums to less than one (gpt-oss). Entries of ``-inf`` get probability 0. A row that is all
    ``-inf`` has no finite maximum: without a sink its output is all zeros (defined here; no NaN,
    no warning); with a finite sink it is all zeros too (the sink takes all the mass).
    """
    dtype = compute_dtype(x)
    x = x.astype(dtype, copy=False)
    m = x.max(axis=-1, keepdims=True) if x.shape[-1] else np.full(x.shape[:-1] + (1,), -np.inf, dtype)
    if sinks is not None:
        sink = np.broadcast_to(np.asarray(sinks).astype(dtype), x.shape[:-1])[..., None]   # [...,1]
        m = np.maximum(m, sink)                                                # [...,1]
    m = np.where(np.isfinite(m), m, 0).astype(dtype)  # all-masked rows: any finite shift will do
    e = np.exp(x - m)                                                          # [...,S]
    denom = e.sum(axis=-1, keepdims=True)                                      # [...,1]
    if sinks is not None:
        denom = denom + np.exp(sink - m)                                       # [...,1]
    safe = np.where(denom > 0, denom, 1).astype(dtype)                         # all-masked rows: 0/1
    return e / safe                                                            # [...,S]
