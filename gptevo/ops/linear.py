"""Linear layers and the two dense MLPs built from them (spec: ``spec/ops/linear.md``).

Weights are ``(out, in)``: ``y = x @ W.T + b``. A weight may be stored as f32/f16/bf16 (widened
exactly to the compute dtype), f64, or be any object with ``decode(dtype)`` (a packed MXFP4 weight),
which is decoded to the compute dtype first. The compute dtype is x's: float64 stays float64,
everything else computes in float32.
"""
from __future__ import annotations

import numpy as np

from gptevo.errors import RequestError
from gptevo.ops import checks
from gptevo.ops.activations import APPROXIMATIONS, gelu, swiglu
from gptevo.ops.spec import Case, compute_dtype, op, unchecked, widen

SPEC = "spec/ops/linear.md"

# Dot products of length `in`: a backend that sums in another order (blocked, FMA) differs by a few
# ulp of the partial sums; normalized by max|ref| this stays well under these bounds for in <= 4096.
MATMUL = {"float32": 2e-5, "float64": 1e-12}


# ---------------------------------------------------------------------------------------------
# argument checks (one per op; the registry runs them before any backend's implementation)

def _check_projection(x_shape: tuple, weight, bias):
    """(weight, bias, out features) for ``linear`` of an input of shape ``x_shape`` [..., in]:
    weight [out, in] (a real array or a packed weight), bias None or [out]. Shapes only."""
    weight = checks.weight(weight, 2, "linear weight", "linear weight must be 2-D (out, in); found shape {shape}")
    n_out, n_in = weight.shape
    if x_shape[-1] != n_in:
        raise RequestError(f"linear: x has {x_shape[-1]} input features (shape {x_shape}) but the weight "
                           f"expects {n_in} (weight shape {tuple(weight.shape)}, layout (out, in))")
    if bias is not None:
        bias = checks.array(bias)
        if tuple(bias.shape) != (n_out,):
            raise RequestError(f"linear: bias has shape {tuple(bias.shape)}, expected ({n_out},)")
    return weight, bias, n_out


def _check_x(x) -> tuple:
    """(x, its shape) for the matrix ops: a real array with a last axis [..., in]."""
    x = checks.real_array(x, "linear: x")
    if len(x.shape) < 1:
        raise RequestError("linear: x must have a last axis [..., in]; found a scalar")
    return x, tuple(x.shape)


def check_linear_args(x, weight, bias=None) -> dict:
    """x real [..., in]; weight [out, in]; bias None or [out]."""
    x, shape = _check_x(x)
    weight, bias, _ = _check_projection(shape, weight, bias)
    return {"x": x, "weight": weight, "bias": bias}


def check_gelu_mlp_args(x, w_fc, b_fc, w_proj, b_proj, approximate) -> dict:
    """``linear``'s checks for both projections (x [..., D] -> [..., I] -> [..., D']) and ``gelu``'s
    approximate."""
    approximate = checks.one_of(approximate, APPROXIMATIONS, 'approximate must be "none" or "tanh"; found {value!r}')
    x, shape = _check_x(x)
    w_fc, b_fc, inter = _check_projection(shape, w_fc, b_fc)
    w_proj, b_proj, _ = _check_projection(shape[:-1] + (inter,), w_proj, b_proj)
    return {"x": x, "w_fc": w_fc, "b_fc": b_fc, "w_proj": w_proj, "b_proj": b_proj, "approximate": approximate}


def check_swiglu_mlp_args(x, w_gate, w_up, w_down, b_gate=None, b_up=None, b_down=None) -> dict:
    """``linear``'s checks for the three projections; gate and up give one width I."""
    x, shape = _check_x(x)
    w_gate, b_gate, n_gate = _check_projection(shape, w_gate, b_gate)
    w_up, b_up, n_up = _check_projection(shape, w_up, b_up)
    if n_gate != n_up:
        raise RequestError(f"swiglu: gate has shape {shape[:-1] + (n_gate,)} but up has shape "
                           f"{shape[:-1] + (n_up,)}; they must match")
    w_down, b_down, _ = _check_projection(shape[:-1] + (n_gate,), w_down, b_down)
    return {"x": x, "w_gate": w_gate, "w_up": w_up, "w_down": w_down, "b_gate": b_gate, "b_up": b_up,
            "b_down": b_down}


# ---------------------------------------------------------------------------------------------
# ops

@op("linear",
    signature="linear(x[...,in], weight[out,in], bias[out]|None=None) -> [...,out]",
    dtypes="x: f32|f64 (f16/bf16 compute in f32); weight, bias: f32|f64|f16|bf16 or Mxfp4Weight",
    tolerance=MATMUL,
    cases=lambda rng: _linear_cases(rng),
    source="seed 'GPT-2 Baseline Architecture' (FFN xW1 + b1); every family's nn.Linear; GPT-2 Conv1D "
           "transposed by the loader",
    spec_file=SPEC,
    flops=lambda x, weight, bias=None: 2 * int(np.prod(np.shape(x)[:-1], dtype=np.int64)) * int(
        np.prod(getattr(weight, "shape", (0, 0)), dtype=np.int64)),
    bytes=lambda x, weight, bias=None: int(getattr(weight, "nbytes", 0)) + int(np.asarray(x).nbytes),
    check=check_linear_args)
def linear(x, weight, bias=None):
    """``y = x @ weight.T + bias``.

    x: [..., in]; weight: [out, in]; bias: [out] or None. Returns [..., out] in x's compute dtype.
    The weight (and bias) are widened or decoded to that dtype before the product.
    """
    dtype = compute_dtype(x)
    w = np.asarray(widen(weight, dtype)).astype(dtype, copy=False)  # [out,in]
    y = x.astype(dtype, copy=False) @ w.T  # [...,out]
    if bias is not None:
        y = y + np.asarray(widen(bias, dtype)).astype(dtype, copy=False)  # [...,out]
    return y


# The bodies, for the MLPs below: their arguments are checked once, by check_*_mlp_args.
_linear, _gelu, _swiglu = unchecked(linear), unchecked(gelu), unchecked(swiglu)


@op("gelu_mlp",
    signature="gelu_mlp(x[T,D], w_fc[I,D], b_fc[I]|None, w_proj[D,I], b_proj[D]|None, approximate) -> [T,D]",
    dtypes="x: f32|f64; weights: f32|f64|f16|bf16 or Mxfp4Weight; approximate: \"none\"|\"tanh\"",
    tolerance=MATMUL,
    cases=lambda rng: _gelu_mlp_cases(rng),
    source="seed 'GPT-2 Baseline Architecture' FFN(x) = GELU(xW1 + b1)W2 + b2; GPT-2 c_fc/c_proj "
           "(gelu_new = tanh form)",
    spec_file=SPEC,
    flops=lambda x, w_fc, b_fc, w_proj, b_proj, approximate: 4 * int(np.shape(x)[0]) * int(
        np.prod(getattr(w_fc, "shape", (0, 0)), dtype=np.int64)),
    check=check_gelu_mlp_args)
def gelu_mlp(x, w_fc, b_fc, w_proj, b_proj, approximate):
    """``linear(gelu(linear(x, w_fc, b_fc), approximate), w_proj, b_proj)``: [T,D] -> [T,I] -> [T,D]."""
    hidden = _gelu(_linear(x, w_fc, b_fc), approximate=approximate)  # [T,I]
    return _linear(hidden, w_proj, b_proj)  # [T,D]


@op("swiglu_mlp",
    signature="swiglu_mlp(x[T,D], w_gate[I,D], w_up[I,D], w_down[D,I], b_gate=None, b_up=None, b_down=None) "
              "-> [T,D]",
    dtypes="x: f32|f64; weights: f32|f64|f16|bf16 or Mxfp4Weight",
    tolerance=MATMUL,
    cases=lambda rng: _swiglu_mlp_cases(rng),
    source="seed '4. SwiGLU Activation Function' (SwiGLUMLP: down(silu(gate(x)) * up(x))); Shazeer 2020; "
           "HF LlamaMLP",
    spec_file=SPEC,
    flops=lambda x, w_gate, w_up, w_down, b_gate=None, b_up=None, b_down=None: 6 * int(np.shape(x)[0]) * int(
        np.prod(getattr(w_gate, "shape", (0, 0)), dtype=np.int64)),
    check=check_swiglu_mlp_args)
def swiglu_mlp(x, w_gate, w_up, w_down, b_gate=None, b_up=None, b_down=None):
    """``linear(silu(linear(x, w_gate)) * linear(x, w_up), w_down)`` (biases optional): [T,D] -> [T,D]."""
    gate = _linear(x, w_gate, b_gate)  # [T,I]
    up = _linear(x, w_up, b_up)  # [T,I]
    return _linear(_swiglu(gate, up), w_down, b_down)  # [T,D]


# ---------------------------------------------------------------------------------------------
# cases: odd and power-of-two widths, T=1 and T>1, f32/f64 activations, f32/f16/bf16 weights

def _wdtypes():
    import ml_dtypes

    return {"f32w": np.float32, "f16w": np.float16, "bf16w": ml_dtypes.bfloat16, "f64w": np.float64}


_SHAPES = [  # (T, D, I, x dtype, weight tag, with bias)
    (1, 8, 16, np.float32, "f32w", True),
    (5, 13, 7, np.float32, "bf16w", True),
    (3, 16, 32, np.float32, "f16w", False),
    (4, 9, 11, np.float64, "f32w", True),
    (2, 32, 24, np.float64, "f64w", False),
    (6, 12, 5, np.float32, "bf16w", False),
]


def _tag(t, d, i, xdt, wtag, bias):
    return f"shape=[{t},{d},{i}],dtype={'f64' if xdt == np.float64 else 'f32'},{wtag}" + ("" if bias else ",nobias")


def _w(rng, shape, wtag):
    return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(_wdtypes()[wtag])


def _linear_cases(rng):
    for t, d, i, xdt, wtag, bias in _SHAPES:
        kwargs = {"x": rng.standard_normal((t, d)).astype(xdt), "weight": _w(rng, (i, d), wtag)}
        if bias:
            kwargs["bias"] = (0.1 * rng.standard_normal(i)).astype(_wdtypes()[wtag])
        yield Case(_tag(t, d, i, xdt, wtag, bias), kwargs)
    yield Case("shape=[2,3,5,4],dtype=f32,f32w,3d", {"x": rng.standard_normal((2, 3, 5)).astype(np.float32),
                                                     "weight": _w(rng, (4, 5), "f32w")})


def _gelu_mlp_cases(rng):
    for n, (t, d, i, xdt, wtag, bias) in enumerate(_SHAPES):
        kwargs = {"x": rng.standard_normal((t, d)).astype(xdt), "w_fc": _w(rng, (i, d), wtag),
                  "w_proj": _w(rng, (d, i), wtag), "b_fc": None, "b_proj": None,
                  "approximate": "tanh" if n % 2 else "none"}
        if bias:
            kwargs["b_fc"] = (0.1 * rng.standard_normal(i)).astype(_wdtypes()[wtag])
            kwargs["b_proj"] = (0.1 * rng.standard_normal(d)).astype(_wdtypes()[wtag])
        yield Case(_tag(t, d, i, xdt, wtag, bias) + f",{kwargs['approximate']}", kwargs)


def _swiglu_mlp_cases(rng):
    for t, d, i, xdt, wtag, bias in _SHAPES:
        kwargs = {"x": rng.standard_normal((t, d)).astype(xdt), "w_gate": _w(rng, (i, d), wtag),
                  "w_up": _w(rng, (i, d), wtag), "w_down": _w(rng, (d, i), wtag)}
        if bias:
            kwargs.update(b_gate=(0.1 * rng.standard_normal(i)).astype(_wdtypes()[wtag]),
                          b_up=(0.1 * rng.standard_normal(i)).astype(_wdtypes()[wtag]),
                          b_down=(0.1 * rng.standard_normal(d)).astype(_wdtypes()[wtag]))
        yield Case(_tag(t, d, i, xdt, wtag, bias), kwargs)
