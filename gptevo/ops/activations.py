"""Elementwise activations and gated units (spec: ``spec/ops/activations.md``).

- ``gelu``: GPT-2 / BERT (erf form) and its tanh approximation (GPT-2 ``gelu_new``, Gemma).
- ``silu``: x * sigmoid(x) (Swish-1), the gate of SwiGLU.
- ``swiglu``: silu(gate) * up (Llama, Mistral, Qwen, Mixtral experts).
- ``clamped_swiglu``: gpt-oss's expert activation on interleaved gate/linear columns.

Output dtype: the compute dtype of the inputs (float64 if any input is float64, else float32).
"""
from __future__ import annotations

import math

import numpy as np

from gptevo.errors import RequestError
from gptevo.ops.checks import finite_real, one_of, real_array
from gptevo.ops.spec import Case, compute_dtype, op

SPEC = "spec/ops/activations.md"
ELEMENTWISE = {"float32": 1e-5, "float64": 1e-12}

# math.erfc applied to every element of a float64 array (NumPy has no erf). libm's erfc is accurate
# to about 1 ulp over the whole real line, including the far tails.
_erfc = np.vectorize(math.erfc, otypes=[np.float64])


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Logistic 1 / (1 + exp(-z)) without overflow: exp is only ever taken of -|z| <= 0."""
    e = np.exp(-np.abs(z))  # in (0, 1]
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(z.dtype, copy=False)


# ---------------------------------------------------------------------------------------------
# cases

def _unary_cases(rng: np.random.Generator, extra=()):
    for shape, dt in [((1, 8), np.float32), ((5, 13), np.float32), ((2, 3, 16), np.float64), ((7,), np.float64)]:
        x = (rng.standard_normal(shape) * 3.0).astype(dt)
        yield Case(f"shape={list(shape)},dtype={'f64' if dt == np.float64 else 'f32'}", {"x": x, **dict(extra)})
    wide = np.array([-1000.0, -40.0, -10.0, -3.0, -1e-3, 0.0, 1e-3, 3.0, 10.0, 40.0, 1000.0])
    yield Case("extremes,dtype=f32", {"x": wide.astype(np.float32), **dict(extra)})
    yield Case("extremes,dtype=f64", {"x": wide, **dict(extra)})


def _gelu_cases(rng: np.random.Generator):
    yield from _unary_cases(rng, [("approximate", "none")])
    for case in _unary_cases(rng, [("approximate", "tanh")]):
        yield Case(case.label + ",tanh", case.kwargs)


def _swiglu_cases(rng: np.random.Generator):
    for shape, dt in [((1, 8), np.float32), ((5, 13), np.float32), ((3, 16), np.float64), ((2, 2, 7), np.float64)]:
        gate = (rng.standard_normal(shape) * 3.0).astype(dt)
        up = rng.standard_normal(shape).astype(dt)
        yield Case(f"shape={list(shape)},dtype={'f64' if dt == np.float64 else 'f32'}", {"gate": gate, "up": up})


def _clamped_swiglu_cases(rng: np.random.Generator):
    for shape, dt in [((1, 16), np.float32), ((5, 26), np.float32), ((3, 32), np.float64), ((2, 2, 6), np.float64)]:
        h = (rng.standard_normal(shape) * 6.0).astype(dt)  # wide enough to hit both clamps
        yield Case(f"shape={list(shape)},dtype={'f64' if dt == np.float64 else 'f32'}", {"h": h})
    h = (rng.standard_normal((4, 10)) * 4.0).astype(np.float32)
    yield Case("shape=[4,10],dtype=f32,alpha=1.0,limit=2.5", {"h": h, "alpha": 1.0, "limit": 2.5})


# ---------------------------------------------------------------------------------------------
# argument checks (one per op; the registry runs them before any backend's implementation)

APPROXIMATIONS = ("none", "tanh")


def check_gelu_args(x, approximate="none") -> dict:
    """x real; approximate "none" or "tanh"."""
    approximate = one_of(approximate, APPROXIMATIONS, 'approximate must be "none" or "tanh"; found {value!r}')
    return {"x": real_array(x, "gelu: x"), "approximate": approximate}


def check_silu_args(x) -> dict:
    """x real."""
    return {"x": real_array(x, "silu: x")}


def check_swiglu_args(gate, up) -> dict:
    """gate and up real, of one shape."""
    gate, up = real_array(gate, "swiglu: gate"), real_array(up, "swiglu: up")
    if tuple(gate.shape) != tuple(up.shape):
        raise RequestError(f"swiglu: gate has shape {tuple(gate.shape)} but up has shape {tuple(up.shape)}; "
                           f"they must match")
    return {"gate": gate, "up": up}


def check_clamped_swiglu_args(h, alpha=1.702, limit=7.0) -> dict:
    """h real [..., 2I] (an even last axis); alpha and limit finite reals (as floats)."""
    alpha = finite_real(alpha, "clamped_swiglu: alpha")
    limit = finite_real(limit, "clamped_swiglu: limit")
    h = real_array(h, "clamped_swiglu: h")
    if len(h.shape) < 1 or h.shape[-1] % 2:
        raise RequestError(f"clamped_swiglu: h must have an even last axis [..., 2I] (gate and linear "
                           f"columns interleaved); found shape {tuple(h.shape)}")
    return {"h": h, "alpha": alpha, "limit": limit}


# ---------------------------------------------------------------------------------------------
# ops

@op("gelu",
    signature='gelu(x, approximate="none"|"tanh") -> x.shape',
    dtypes="x: f32|f64 (f16/bf16 compute in f32)",
    tolerance=ELEMENTWISE,
    cases=_gelu_cases,
    source="seed '4. SwiGLU Activation Function' (GELU(x) = x Phi(x)); Hendrycks & Gimpel 2016; "
           "tanh form: GPT-2 gelu_new / HF gelu_pytorch_tanh",
    spec_file=SPEC, check=check_gelu_args)
def gelu(x, approximate="none"):
    """Gaussian error linear unit.

    ``approximate="none"``: ``x * Phi(x)`` with ``Phi(x) = erfc(-x / sqrt(2)) / 2`` (the same as
    ``(1 + erf(x / sqrt(2))) / 2``; erfc keeps the left tail accurate).
    ``approximate="tanh"``: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``.
    Both are evaluated in float64 and rounded once to x's compute dtype, so the float32 result is
    within 1 ulp of the exact value and the float64 one within a few ulp.
    """
    dtype = compute_dtype(x)
    x64 = x.astype(np.float64, copy=False)  # [...]
    if approximate == "none":
        cdf = 0.5 * _erfc(-x64 / math.sqrt(2.0))  # [...]  Phi(x)
        return (x64 * cdf).astype(dtype)
    with np.errstate(over="ignore"):  # |x| > 5e102: x^3 -> inf, tanh -> +-1, the exact limit
        inner = math.sqrt(2.0 / math.pi) * (x64 + 0.044715 * x64 ** 3)  # [...]
    return (0.5 * x64 * (1.0 + np.tanh(inner))).astype(dtype)


@op("silu",
    signature="silu(x) -> x.shape",
    dtypes="x: f32|f64 (f16/bf16 compute in f32)",
    tolerance=ELEMENTWISE,
    cases=_unary_cases,
    source="seed '4. SwiGLU Activation Function' (SiLU(z) = z sigmoid(z)); Ramachandran et al. 2017; "
           "Elfwing et al. 2017",
    spec_file=SPEC, check=check_silu_args)
def silu(x):
    """``x * sigmoid(x)`` in x's compute dtype, with an overflow-free sigmoid (see :func:`sigmoid`)."""
    x = x.astype(compute_dtype(x), copy=False)  # [...]
    return x * sigmoid(x)


@op("swiglu",
    signature="swiglu(gate[...,I], up[...,I]) -> [...,I]",
    dtypes="gate, up: f32|f64 (float64 if either is float64)",
    tolerance=ELEMENTWISE,
    cases=_swiglu_cases,
    source="seed '4. SwiGLU Activation Function'; Shazeer 2020 'GLU Variants Improve Transformer'; "
           "HF LlamaMLP down(silu(gate(x)) * up(x))",
    spec_file=SPEC, check=check_swiglu_args)
def swiglu(gate, up):
    """``silu(gate) * up``, elementwise. gate and up have the same shape [..., I]."""
    dtype = compute_dtype(gate, up)
    g = gate.astype(dtype, copy=False)  # [...,I]
    return g * sigmoid(g) * up.astype(dtype, copy=False)  # [...,I]


@op("clamped_swiglu",
    signature="clamped_swiglu(h[...,2I], alpha=1.702, limit=7.0) -> [...,I]",
    dtypes="h: f32|f64 (f16/bf16 compute in f32)",
    tolerance=ELEMENTWISE,
    cases=_clamped_swiglu_cases,
    source="gpt-oss official code gpt_oss/torch/model.py swiglu (facts/gptoss.md 2.5); HF GptOssExperts",
    spec_file=SPEC, check=check_clamped_swiglu_args)
def clamped_swiglu(h, alpha=1.702, limit=7.0):
    """gpt-oss's expert activation on the interleaved output of the first expert projection.

    h: [..., 2I] with gate = even columns ``h[..., 0::2]`` and linear = odd columns ``h[..., 1::2]``.
    ``gate = min(gate, limit)`` (clamped from above only), ``lin = clip(lin, -limit, limit)``,
    ``out = gate * sigmoid(alpha * gate) * (lin + 1)``. Returns [..., I] in h's compute dtype.
    """
    h_arr = h.astype(compute_dtype(h), copy=False)  # [...,2I]
    gate = np.minimum(h_arr[..., 0::2], limit)  # [...,I]
    lin = np.clip(h_arr[..., 1::2], -limit, limit)  # [...,I]
    return gate * sigmoid(alpha * gate) * (lin + 1.0)  # [...,I]
