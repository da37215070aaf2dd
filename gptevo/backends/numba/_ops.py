"""The numba backend's op table (imported only when numba is present)."""
from __future__ import annotations

from gptevo.backends.numba._attention import apply_rope, attention, rope_cos_sin, softmax
from gptevo.backends.numba._elementwise import clamped_swiglu, gelu, layer_norm, rms_norm, silu, swiglu
from gptevo.backends.numba._linear import embedding, linear, mxfp4_decode
from gptevo.backends.numba._positions import (alibi_bias, alibi_slopes, attention_mask, gelu_mlp,
                                                learned_positions, sinusoidal_positions, swiglu_mlp)
from gptevo.backends.numba._moe import moe_combine, moe_experts, moe_route

OPS = {
    "embedding": embedding,
    "learned_positions": learned_positions,
    "sinusoidal_positions": sinusoidal_positions,
    "alibi_slopes": alibi_slopes,
    "alibi_bias": alibi_bias,
    "attention_mask": attention_mask,
    "rms_norm": rms_norm,
    "layer_norm": layer_norm,
    "silu": silu,
    "gelu": gelu,
    "swiglu": swiglu,
    "clamped_swiglu": clamped_swiglu,
    "linear": linear,
    "gelu_mlp": gelu_mlp,
    "swiglu_mlp": swiglu_mlp,
    "mxfp4_decode": mxfp4_decode,
    "softmax": softmax,
    "rope_cos_sin": rope_cos_sin,
    "apply_rope": apply_rope,
    "attention": attention,
    "moe_route": moe_route,
    "moe_experts": moe_experts,
    "moe_combine": moe_combine,
}
