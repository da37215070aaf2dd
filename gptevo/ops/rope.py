"""Rotary position embeddings (RoPE): frequencies, the cos/sin table, and the rotation itself.

Written spec: ``spec/ops/rope.md``. Sources: the seed's "3. Rotary Position Embeddings (RoPE)";
RoFormer (Su et al., 2021) for the rotation; Position Interpolation (Chen et al., 2023) for
"linear"; the Llama 3 paper and its published parameters for "llama3"; YaRN (Peng et al., 2023)
and the official gpt-oss ``RotaryEmbedding`` for "yarn"; Hugging Face ``modeling_rope_utils``
for the exact float32 order of operations we reproduce, and for "dynamic" and "longrope".

Three steps, kept apart so that a backend only has to implement the last two:

1. ``rope_frequencies`` (config time, not a backend op): ``inv_freq[R/2]`` float32 and the
   ``attention_factor`` that multiplies cos and sin (1.0 except for YaRN and LongRoPE).
2. ``rope_cos_sin``: ``angle[t, i] = float32(p_t) * inv_freq[i]``; cos/sin times the factor.
3. ``apply_rope``: rotate pairs of dims of q or k by those angles, half-split (NeoX/HF, dim i
   with dim i + R/2) or interleaved (GPT-J, dim 2i with 2i+1); dims R..Dh pass through.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from gptevo.errors import ConfigError, RequestError
from gptevo.ops import checks
from gptevo.ops.spec import Case, compute_dtype, op

RULES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


# --------------------------------------------------------------------------------------------
# 1. frequencies
# --------------------------------------------------------------------------------------------
def _theta_powers(theta: float, rotary_dim: int) -> np.ndarray:
    """``theta ** (2i / R)`` for i < R/2 as float32, bit-matching torch's float32 CPU pow.

    Torch (and so HF) rounds ``theta`` to float32 and forms the exponent ``2i/R`` in float32; we
    do the same, then take the power in float64 and round it once. Torch's float32 pow is a
    1-ulp vector routine, so this agrees with it on almost every entry and is within 1 ulp on the
    rest; numpy's own float32 pow differs on 10-20 of 64 (facts: hf_families "bit-matching").
    """
    exponent = np.arange(0, rotary_dim, 2).astype(np.float32) / np.float32(rotary_dim)  # [R/2] f32
    base = np.float64(np.float32(theta))
    return (base ** exponent.astype(np.float64)).astype(np.float32)                      # [R/2] f32


def _base_inv_freq(theta: float, rotary_dim: int) -> np.ndarray:
    """The unscaled RoPE frequencies ``1 / theta ** (2i/R)``, float32 [R/2]."""
    return np.float32(1.0) / _theta_powers(theta, rotary_dim)                          # [R/2] f32


def _scaling_dict(scaling) -> dict[str, Any]:
    """The scaling rule as a plain dict: accepts None, a mapping, or ModelConfig's sorted pairs."""
    if scaling is None:
        return {}
    try:
        return dict(scaling)
    except (TypeError, ValueError):
        raise ConfigError(f"rope scaling must be a dict (rope_scaling / rope_parameters), got "
                          f"{type(scaling).__name__}") from None


def _number(params: Mapping[str, Any], key: str, rule: str, default=None) -> float:
    """Field ``key`` of the scaling dict as a float, with ``default`` when absent (None = required)."""
    value = params.get(key)
    if value is None:
        if default is None:
            raise ConfigError(f"rope scaling rule {rule!r} needs the field {key!r}; got fields "
                              f"{sorted(params)}")
        return float(default)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"rope scaling field {key!r} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"rope scaling field {key!r} must be a finite positive number, got {value!r}")
    return value


def _max_positions(params: Mapping[str, Any], rule: str) -> float:
    """The pre-training context length of the rule (``original_max_position_embeddings``)."""
    if params.get("original_max_position_embeddings") is not None:
        return _number(params, "original_max_position_embeddings", rule)
    return _number(params, "max_position_embeddings", rule)


def _yarn_attention_factor(factor: float, params: Mapping[str, Any], rule: str) -> float:
    """YaRN's ``mscale``: ``0.1 ln(s) + 1`` (1 when s <= 1); with mscale/mscale_all_dim their ratio."""
    if params.get("attention_factor") is not None:
        return _number(params, "attention_factor", rule)

    def mscale(s: float, m: float = 1.0) -> float:
        return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

    if params.get("mscale") and params.get("mscale_all_dim"):
        m, m_all = _number(params, "mscale", rule), _number(params, "mscale_all_dim", rule)
        return float(mscale(factor, m) / mscale(factor, m_all))
    return mscale(factor)


def _yarn(theta: float, rotary_dim: int, params: Mapping[str, Any], rule: str):
    """YaRN "NTK-by-parts": keep high frequencies, divide low ones by s, ramp linearly between.

    A frequency index i is kept (extrapolated) when its wavelength fits more than ``beta_fast``
    times into the original context, and fully interpolated (divided by s) when it fits fewer than
    ``beta_slow`` times. The boundary index for r rotations is
    ``cd(r) = R * ln(L0 / (2 pi r)) / (2 ln theta)``; ``truncate`` floors/ceils the two bounds.
    """
    if params.get("factor") is None and params.get("max_position_embeddings") is not None:
        factor = _number(params, "max_position_embeddings", rule) / _max_positions(params, rule)
    else:
        factor = _number(params, "factor", rule)
    original = _max_positions(params, rule)
    beta_fast = _number(params, "beta_fast", rule, default=32.0)
    beta_slow = _number(params, "beta_slow", rule, default=1.0)
    truncate = params.get("truncate", True)
    if truncate is None:
        truncate = True
    if not isinstance(truncate, (bool, np.bool_)):
        raise ConfigError(f"rope scaling field 'truncate' must be true or false, got {truncate!r}")
    attention_factor = _yarn_attention_factor(factor, params, rule)

    def correction_dim(rotations: float) -> float:
        return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero, as HF does

    pos_freq = _theta_powers(theta, rotary_dim)                                          # [R/2] f32
    extrapolated = np.float32(1.0) / pos_freq                                            # [R/2] f32
    interpolated = np.float32(1.0) / (np.float32(factor) * pos_freq)                     # [R/2] f32
    ramp = np.clip((np.arange(rotary_dim // 2, dtype=np.float32) - np.float32(low))
                   / np.float32(high - low), 0, 1)                                       # [R/2] f32
    keep = np.float32(1.0) - ramp                        # [R/2] 1 = original frequency (mask)
    inv_freq = interpolated * (np.float32(1.0) - keep) + extrapolated * keep             # [R/2] f32
    return inv_freq.astype(np.float32), float(attention_factor)


def _llama3(inv_freq: np.ndarray, params: Mapping[str, Any], rule: str) -> np.ndarray:
    """Llama 3.1: wavelengths above L0/low_freq_factor are divided by ``factor``, those below
    L0/high_freq_factor kept, and the band between blended by ``(L0/wavelen - low)/(high - low)``."""
    factor = _number(params, "factor", rule)
    low_ff = _number(params, "low_freq_factor", rule)
    high_ff = _number(params, "high_freq_factor", rule)
    original = _number(params, "original_max_position_embeddings", rule)
    if high_ff == low_ff:
        raise ConfigError(f"rope scaling rule 'llama3' needs high_freq_factor != low_freq_factor, "
                          f"both are {low_ff}")
    low_wavelen, high_wavelen = original / low_ff, original / high_ff
    wavelen = np.float32(2 * math.pi) / inv_freq                                     # [R/2] f32
    scaled = np.where(wavelen > np.float32(low_wavelen), inv_freq / np.float32(factor), inv_freq)
    smooth = ((np.float32(original) / wavelen - np.float32(low_ff))
              / np.float32(high_ff - low_ff))                                        # [R/2] f32
    blended = ((np.float32(1.0) - smooth) * scaled / np.float32(factor)
               + smooth * scaled)                                                    # [R/2] f32
    medium = ~(wavelen < np.float32(high_wavelen)) & ~(wavelen > np.float32(low_wavelen))
    return np.where(medium, blended, scaled).astype(np.float32)


def _longrope(theta: float, rotary_dim: int, params: Mapping[str, Any], seq_len):
    """Phi-3 LongRoPE: per-frequency divisors, ``short_factor`` up to L0 and ``long_factor`` beyond."""
    rule = "longrope"
    original = _max_positions(params, rule)
    if params.get("factor") is not None:
        factor = _number(params, "factor", rule)
    elif params.get("max_position_embeddings") is not None:
        factor = _number(params, "max_position_embeddings", rule) / original
    else:
        factor = 1.0
    if params.get("attention_factor") is not None:
        attention_factor = _number(params, "attention_factor", rule)
    else:
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    key = "long_factor" if seq_len and seq_len > original else "short_factor"
    try:
        ext = np.asarray(params.get(key, ()), dtype=np.float32)                   # [R/2] f32
    except (TypeError, ValueError):
        raise ConfigError(f"rope scaling field {key!r} must be a list of numbers, got {params.get(key)!r}") from None
    if ext.shape != (rotary_dim // 2,) or not np.all(np.isfinite(ext) & (ext > 0)):
        raise ConfigError(f"rope scaling field {key!r} must list {rotary_dim // 2} positive numbers, "
                          f"got {ext.tolist()}")
    power = _theta_powers(theta, rotary_dim)                                      # [R/2] f32
    return (np.float32(1.0) / (ext * power)).astype(np.float32), float(attention_factor)


def _frequency_cases(rng):
    """Example configs (rope_frequencies is not a backend op; the conformance suite skips it)."""
    yield Case("default,Dh=64", {"head_dim": 64, "theta": 10000.0})
    yield Case("partial,Dh=32,R=16", {"head_dim": 32, "theta": 10000.0, "rotary_dim": 16})
    yield Case("yarn,gpt-oss", {"head_dim": 64, "theta": 150000.0, "scaling": {
        "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "original_max_position_embeddings": 4096, "truncate": False}})
    yield Case("llama3,Llama-3.1", {"head_dim": 128, "theta": 500000.0, "scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})


@op("rope_frequencies",
    signature="rope_frequencies(head_dim, theta, rotary_dim=None, scaling=None, seq_len=None) -> "
              "(inv_freq[R/2] f32, attention_factor float)",
    dtypes="returns float32 inv_freq and a Python float",
    tolerance={"float32": 0.0, "float64": 0.0}, cases=_frequency_cases,
    source="RoFormer (default); Position Interpolation (linear); Llama 3 (llama3); YaRN + official gpt-oss "
           "RotaryEmbedding (yarn); HF modeling_rope_utils (dynamic, longrope, float32 op order)",
    spec_file="spec/ops/rope.md", backend_op=False, exact=True)
def rope_frequencies(head_dim, theta, rotary_dim=None, scaling=None, seq_len=None):
    """The inverse frequencies ``inv_freq[R/2]`` (float32) and the cos/sin ``attention_factor``.

    ``R = rotary_dim`` (default ``head_dim``; smaller for partial rotary, e.g. Phi-3, GPT-NeoX).
    ``scaling`` is the checkpoint's ``rope_scaling`` / ``rope_parameters`` dict (or None); its
    ``rope_type`` (legacy key ``type``) selects the rule:

    - ``default``: ``inv_freq[i] = theta ** (-2i/R)``; factor 1.
    - ``linear`` (``factor``): ``inv_freq / factor`` (positions divided by ``factor``).
    - ``dynamic`` (``factor``, ``max_position_embeddings`` or else ``original_max_position_embeddings``):
      with ``L = max(seq_len, Lmax)``, ``theta' = theta * (factor*L/Lmax - (factor-1)) ** (R/(R-2))``.
    - ``llama3`` (``factor, low_freq_factor, high_freq_factor, original_max_position_embeddings``).
    - ``yarn`` (``factor, beta_fast=32, beta_slow=1, original_max_position_embeddings,
      truncate=True, attention_factor | mscale, mscale_all_dim``).
    - ``longrope`` (``short_factor, long_factor, original_max_position_embeddings``, optional
      ``factor``/``attention_factor``): the long factors when ``seq_len > L0``.

    ``seq_len`` (the largest position + 1 of this forward) matters only to dynamic and longrope.
    Follows HF ``modeling_rope_utils`` float32 arithmetic step by step. Not a backend op.
    Raises ConfigError for an unknown rule (naming it) or bad fields.
    """
    for name, value in (("head_dim", head_dim), ("rotary_dim", rotary_dim)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
            raise ConfigError(f"rope {name} must be an integer, got {value!r}")
    head_dim = int(head_dim)
    rotary_dim = head_dim if rotary_dim is None else int(rotary_dim)
    if head_dim <= 0 or rotary_dim <= 0 or rotary_dim > head_dim or rotary_dim % 2:
        raise ConfigError(f"rope needs an even rotary_dim in [2, head_dim={head_dim}], got {rotary_dim}")
    if isinstance(theta, bool) or not isinstance(theta, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(theta)) or float(theta) <= 1.0:
        raise ConfigError(f"rope_theta must be a finite number > 1, got {theta!r}")
    theta = float(theta)
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer))
                                or seq_len < 0):
        raise RequestError(f"rope seq_len must be None or an integer >= 0, got {seq_len!r}")
    params = _scaling_dict(scaling)
    rule = params.get("rope_type", params.get("type", "default")) or "default"
    if rule == "su":  # the old Phi-3 name of longrope
        rule = "longrope"
    if rule not in RULES:
        raise ConfigError(f"unknown rope scaling rule (rope_type) {rule!r}; known rules: {', '.join(RULES)}")

    if rule == "default":
        return _base_inv_freq(theta, rotary_dim), 1.0
    if rule == "linear":
        factor = _number(params, "factor", rule)
        return (_base_inv_freq(theta, rotary_dim) / np.float32(factor)).astype(np.float32), 1.0
    if rule == "dynamic":
        factor = _number(params, "factor", rule)
        key = ("max_position_embeddings" if params.get("max_position_embeddings") is not None
               else "original_max_position_embeddings")
        max_pos = _number(params, key, rule)
        length = max_pos if seq_len is None else max(float(seq_len), max_pos)
        grown = theta * ((factor * length / max_pos) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
        return _base_inv_freq(grown, rotary_dim), 1.0
    if rule == "llama3":
        return _llama3(_base_inv_freq(theta, rotary_dim), params, rule), 1.0
    if rule == "yarn":
        return _yarn(theta, rotary_dim, params, rule)
    return _longrope(theta, rotary_dim, params, seq_len)


# --------------------------------------------------------------------------------------------
# 2. the cos/sin table
# --------------------------------------------------------------------------------------------
def check_rope_cos_sin_args(positions, inv_freq, attention_factor=1.0) -> dict:
    """positions 1-D integers [T]; inv_freq real 1-D [R/2]."""
    positions = checks.integer_positions(positions, "positions")
    inv_freq = checks.real_array(inv_freq, "inv_freq")
    if len(inv_freq.shape) != 1:
        raise RequestError(f"inv_freq must be 1-D [R/2], got shape {tuple(inv_freq.shape)}")
    return {"positions": positions, "inv_freq": inv_freq, "attention_factor": attention_factor}


def _cos_sin_cases(rng):
    """Decode (T=1 at an offset) and prefill, power-of-two and odd R/2, f32 and f64 inv_freq."""
    for label, positions, half, theta, factor, dtype in [
        ("T=1,p=4095,R=64", [4095], 32, 150000.0, 1.3465736, np.float32),
        ("T=7,p=0..6,R=64", np.arange(7), 32, 10000.0, 1.0, np.float32),
        ("T=5,p=100..104,R=10", np.arange(100, 105), 5, 10000.0, 1.0, np.float32),
        ("T=3,p=[0,9,2047],R=16,f64", [0, 9, 2047], 8, 500000.0, 1.0, np.float64),
        ("T=1,p=31,R=6,f64,af=1.2", [31], 3, 10000.0, 1.2, np.float64),
        ("T=16,p=rand,R=32,af=1.5", rng.integers(0, 8192, size=16), 16, 1e6, 1.5, np.float32),
    ]:
        inv_freq = (1.0 / theta ** (np.arange(half) * 2.0 / (2 * half))).astype(dtype)
        yield Case(label, {"positions": np.asarray(positions, dtype=np.int64), "inv_freq": inv_freq,
                           "attention_factor": factor})


@op("rope_cos_sin",
    signature="rope_cos_sin(positions[T], inv_freq[R/2], attention_factor=1.0) -> (cos[T,R/2], sin[T,R/2])",
    dtypes="positions: int; inv_freq: f32 (f64 computes in f64); out: inv_freq's compute dtype",
    tolerance={"float32": 2e-6, "float64": 1e-12}, cases=_cos_sin_cases,
    source="seed 3. Rotary Position Embeddings (RoPE), 'Frequency Definition'; HF LlamaRotaryEmbedding "
           "(float32 angles, cos/sin times attention_scaling); official gpt-oss RotaryEmbedding",
    spec_file="spec/ops/rope.md", check=check_rope_cos_sin_args)
def rope_cos_sin(positions, inv_freq, attention_factor=1.0):
    """cos and sin of ``angle[t, i] = p_t * inv_freq[i]``, both multiplied by ``attention_factor``.

    The angle is the float32 product ``float32(p) * inv_freq`` (as HF and gpt-oss form it); its
    cosine is then taken in float64 and rounded once, then multiplied by the factor in float32.
    With float64 ``inv_freq`` everything is float64. Returns two ``[T, R/2]`` arrays.
    """
    dtype = compute_dtype(inv_freq)
    angle = positions.astype(dtype)[:, None] * inv_freq.astype(dtype)[None, :]      # [T,R/2]
    factor = dtype.type(attention_factor)
    cos = np.cos(angle.astype(np.float64)).astype(dtype) * factor                   # [T,R/2]
    sin = np.sin(angle.astype(np.float64)).astype(dtype) * factor                   # [T,R/2]
    return cos, sin


# --------------------------------------------------------------------------------------------
# 3. the rotation
# --------------------------------------------------------------------------------------------
def _apply_cases(rng):
    """Half-split and interleaved, full and partial rotary, T=1 and T>1, odd head counts."""
    for label, T, H, Dh, R, interleaved, dtype in [
        ("T=1,H=4,Dh=64,R=64,half", 1, 4, 64, 64, False, np.float32),
        ("T=5,H=3,Dh=16,R=16,interleaved", 5, 3, 16, 16, True, np.float32),
        ("T=7,H=2,Dh=10,R=6,half,partial", 7, 2, 10, 6, False, np.float32),
        ("T=4,H=5,Dh=12,R=4,interleaved,partial", 4, 5, 12, 4, True, np.float32),
        ("T=3,H=4,Dh=8,R=8,half,f64", 3, 4, 8, 8, False, np.float64),
        ("T=2,H=1,Dh=18,R=10,interleaved,partial,f64", 2, 1, 18, 10, True, np.float64),
        ("T=9,H=8,Dh=32,R=32,half", 9, 8, 32, 32, False, np.float32),
    ]:
        angle = rng.uniform(-np.pi, np.pi, size=(T, R // 2))
        scale = rng.uniform(0.8, 1.4)
        yield Case(label, {"x": rng.standard_normal((T, H, Dh)).astype(dtype),
                           "cos": (scale * np.cos(angle)).astype(dtype),
                           "sin": (scale * np.sin(angle)).astype(dtype), "interleaved": interleaved})


def check_apply_rope_args(x, cos, sin, interleaved=False) -> dict:
    """x real [T,H,Dh]; cos and sin real, both [T,R/2] with R <= Dh; interleaved as a bool."""
    x = checks.real_array(x, "apply_rope: x")
    cos, sin = checks.real_array(cos, "apply_rope: cos"), checks.real_array(sin, "apply_rope: sin")
    if len(x.shape) != 3:
        raise RequestError(f"apply_rope: x must be [T,H,Dh], got shape {tuple(x.shape)}")
    T, _, Dh = x.shape
    if len(cos.shape) != 2 or tuple(cos.shape) != tuple(sin.shape) or cos.shape[0] != T:
        raise RequestError(f"apply_rope: cos and sin must both be [T={T}, R/2], got {tuple(cos.shape)} and "
                           f"{tuple(sin.shape)}")
    if 2 * cos.shape[1] > Dh:
        raise RequestError(f"apply_rope: cos/sin rotate R={2 * cos.shape[1]} dims but x has head_dim {Dh}")
    return {"x": x, "cos": cos, "sin": sin, "interleaved": bool(interleaved)}


@op("apply_rope",
    signature="apply_rope(x[T,H,Dh], cos[T,R/2], sin[T,R/2], interleaved=False) -> [T,H,Dh] "
              "(rotates the first R dims)",
    dtypes="x: f32|f64; cos, sin: f32|f64 (cast to x's compute dtype)",
    tolerance={"float32": 1e-6, "float64": 1e-13}, cases=_apply_cases,
    source="seed 3. Rotary Position Embeddings (RoPE), 'Rotation Matrix' and 'Implementation' "
           "(rotate_half); RoFormer eq. 34; GPT-NeoX / GPT-J pairings",
    spec_file="spec/ops/rope.md",
    flops=lambda x, cos, **_: 6 * x.shape[0] * x.shape[1] * cos.shape[-1], check=check_apply_rope_args)
def apply_rope(x, cos, sin, interleaved=False):
    """Rotate each pair (a, b) of the first R = 2*cos.shape[-1] dims of every head by its angle:

        a' = a*cos - b*sin,   b' = b*cos + a*sin     (cos and sin already carry attention_factor)

    Pairing: ``interleaved=False`` (NeoX/HF "rotate_half", Llama, Qwen, gpt-oss): a = dim i,
    b = dim i + R/2. ``interleaved=True`` (GPT-J, Meta's original Llama): a = dim 2i, b = dim 2i+1.
    Pair i uses frequency i in both conventions. Dims R..Dh pass through unchanged (partial
    rotary). Returns ``[T, H, Dh]`` in x's compute dtype.
    """
    dtype = compute_dtype(x)
    half = cos.shape[1]
    x = x.astype(dtype, copy=False)
    c = cos.astype(dtype)[:, None, :]                                # [T,1,R/2]
    s = sin.astype(dtype)[:, None, :]                                # [T,1,R/2]
    if interleaved:
        a, b = x[..., 0:2 * half:2], x[..., 1:2 * half:2]             # [T,H,R/2] each
    else:
        a, b = x[..., :half], x[..., half:2 * half]                  # [T,H,R/2] each
    out = x.copy()                                                   # [T,H,Dh]
    if interleaved:
        out[..., 0:2 * half:2] = a * c - b * s
        out[..., 1:2 * half:2] = b * c + a * s
    else:
        out[..., :half] = a * c - b * s
        out[..., half:2 * half] = b * c + a * s
    return out
