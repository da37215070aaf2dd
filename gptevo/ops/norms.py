"""LayerNorm and RMSNorm over the last axis (spec: ``spec/ops/norms.md``).

Both compute in float32 (float64 when ``x`` is float64) and return that compute dtype; the weight
(and bias) are widened to it first, exactly for bf16/f16. ``eps`` is added inside the square root.
"""
from __future__ import annotations

import numpy as np

from gptevo.errors import RequestError
from gptevo.ops.checks import array, finite_real, real_array, shape_of
from gptevo.ops.spec import Case, compute_dtype, op, widen

SPEC = "spec/ops/norms.md"

# Reductions over D: a backend that sums in another order differs by a few ulp of the row sums.
TOLERANCE = {"float32": 1e-5, "float64": 1e-12}


def _check_norm(x, weight, bias, eps) -> tuple:
    """(x, weight, bias, eps) checked: x real [..., D] with D >= 1, weight and bias (may be None) [D],
    eps a finite real >= 0 (as a float)."""
    x = real_array(x, "x")
    if len(x.shape) < 1 or x.shape[-1] == 0:
        raise RequestError(f"x must have a non-empty last axis [..., D]; found shape {tuple(x.shape)}")
    eps = finite_real(eps, "eps")
    if eps < 0:
        raise RequestError(f"eps must be >= 0; found {eps!r}")
    d = x.shape[-1]
    for what, v in (("weight", weight), ("bias", bias)):
        if v is not None and shape_of(v) != (d,):
            raise RequestError(f"{what} must have shape ({d},) to match the last axis of x; found {shape_of(v)}")
    return x, array(weight), None if bias is None else array(bias), eps


def check_layer_norm_args(x, weight, bias, eps) -> dict:
    """``layer_norm``'s arguments checked (see :func:`_check_norm`); RequestError names the argument."""
    x, weight, bias, eps = _check_norm(x, weight, bias, eps)
    return {"x": x, "weight": weight, "bias": bias, "eps": eps}


def check_rms_norm_args(x, weight, eps, offset=0.0) -> dict:
    """``rms_norm``'s arguments checked (see :func:`_check_norm`; ``offset`` a finite real)."""
    x, weight, _, eps = _check_norm(x, weight, None, eps)
    return {"x": x, "weight": weight, "eps": eps, "offset": finite_real(offset, "offset")}


def _norm_inputs(rng: np.random.Generator):
    """(label, x, weight dtype) for the norm cases: odd and power-of-two D, T=1 and T>1, every dtype."""
    import ml_dtypes

    for shape, xdt, wdt, wtag in [((1, 8), np.float32, np.float32, "f32w"),
                                  ((5, 13), np.float32, ml_dtypes.bfloat16, "bf16w"),
                                  ((3, 4, 16), np.float32, np.float16, "f16w"),
                                  ((2, 7), np.float64, np.float32, "f32w"),
                                  ((4, 32), np.float64, np.float64, "f64w")]:
        x = (rng.standard_normal(shape) * 2.0 + 0.5).astype(xdt)
        xtag = "f64" if xdt == np.float64 else "f32"
        yield f"shape={list(shape)},dtype={xtag},{wtag}", x, wdt


def _layer_norm_cases(rng: np.random.Generator):
    for label, x, wdt in _norm_inputs(rng):
        d = x.shape[-1]
        w = (1.0 + 0.1 * rng.standard_normal(d)).astype(wdt)
        b = (0.1 * rng.standard_normal(d)).astype(wdt)
        yield Case(label, {"x": x, "weight": w, "bias": b, "eps": 1e-5})
    x = rng.standard_normal((6, 5)).astype(np.float32)
    yield Case("shape=[6,5],dtype=f32,f32w,bias=None", {"x": x, "weight": np.ones(5, np.float32),
                                                        "bias": None, "eps": 1e-5})


def _rms_norm_cases(rng: np.random.Generator):
    for label, x, wdt in _norm_inputs(rng):
        w = (1.0 + 0.1 * rng.standard_normal(x.shape[-1])).astype(wdt)
        yield Case(label, {"x": x, "weight": w, "eps": 1e-5})
    x = rng.standard_normal((6, 5)).astype(np.float32)
    w = (0.1 * rng.standard_normal(5)).astype(np.float32)
    yield Case("shape=[6,5],dtype=f32,f32w,offset=1", {"x": x, "weight": w, "eps": 1e-6, "offset": 1.0})


@op("layer_norm",
    signature="layer_norm(x[...,D], weight[D], bias[D]|None, eps) -> [...,D]",
    dtypes="x: f32|f64 (f16/bf16 compute in f32); weight, bias: f32|f64|f16|bf16",
    tolerance=TOLERANCE,
    cases=_layer_norm_cases,
    source="seed '5. RMSNorm vs LayerNorm' (LayerNorm equation); Ba et al. 2016; GPT-2 ln_1/ln_2/ln_f "
           "(torch.nn.LayerNorm: biased variance, eps inside the sqrt)",
    spec_file=SPEC, check=check_layer_norm_args)
def layer_norm(x, weight, bias, eps):
    """``y = (x - mean) / sqrt(var + eps) * weight + bias`` over the last axis.

    x: [..., D]; weight, bias: [D] (bias may be None). ``var`` is the biased (population)
    variance ``mean((x - mean)^2)``, computed in two passes. Returns [..., D] in x's compute dtype.
    """
    x = x.astype(compute_dtype(x), copy=False)  # [...,D]
    w = widen(weight, x.dtype)  # [D]
    mean = x.mean(axis=-1, keepdims=True)  # [...,1]
    centered = x - mean  # [...,D]
    var = (centered * centered).mean(axis=-1, keepdims=True)  # [...,1]
    x_hat = centered / np.sqrt(var + eps)  # [...,D]
    y = x_hat * w  # [...,D]
    if bias is not None:
        y = y + widen(bias, x.dtype)  # [...,D]
    return y


@op("rms_norm",
    signature="rms_norm(x[...,D], weight[D], eps, offset=0.0) -> [...,D]",
    dtypes="x: f32|f64 (f16/bf16 compute in f32); weight: f32|f64|f16|bf16",
    tolerance=TOLERANCE,
    cases=_rms_norm_cases,
    source="seed '5. RMSNorm vs LayerNorm' (RMSNorm equation); Zhang & Sennrich 2019; HF LlamaRMSNorm, "
           "gpt-oss torch RMSNorm; Gemma (1 + w) variant (HF GemmaRMSNorm)",
    spec_file=SPEC, check=check_rms_norm_args)
def rms_norm(x, weight, eps, offset=0.0):
    """``y = x / sqrt(mean(x^2) + eps) * (offset + weight)`` over the last axis.

    x: [..., D]; weight: [D]. ``offset=0.0`` is the usual RMSNorm (Llama, Qwen, Mistral, gpt-oss);
    ``offset=1.0`` is Gemma's, whose stored weights are offsets from 1. Returns [..., D] in x's
    compute dtype. With eps = 0 an all-zero row gives NaN (0/0); models always pass eps > 0.
    """
    x = x.astype(compute_dtype(x), copy=False)  # [...,D]
    w = widen(weight, x.dtype)  # [D]
    mean_sq = (x * x).mean(axis=-1, keepdims=True)  # [...,1]
    x_hat = x / np.sqrt(mean_sq + eps)  # [...,D]
    return x_hat * (offset + w)  # [...,D]
