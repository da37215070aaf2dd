"""A model for one ladder step with random weights built in memory (no file is written or read).

``roles(config)`` lists every weight role the forward pass reads (the names of
:class:`gptevo.weights.LayerWeights` fields and the globals) with its shape; ``random_weights``
fills them (bf16 normal(0, 0.02) matrices, norm scales 1, biases and sinks 0, or MXFP4 experts when
the step stores them so); ``weights_from_arrays`` wraps arrays given by role (tools/evolve_train.py
exports trained torch models this way); ``build_model`` prepares the weights for a backend and returns
a :class:`gptevo.model.Model`. Counting these tensors is how the tests check the calculators.
"""
from __future__ import annotations

from typing import Any, Callable

import ml_dtypes
import numpy as np

from gptevo.config import ModelConfig
from gptevo.errors import ConfigError
from gptevo.weights import LayerWeights, ModelWeights

STD = 0.02
SCALE_BYTE = 121        # E8M0 2**-6: decoded MXFP4 values up to 6 * 2**-6 ≈ 0.09, like normal(0, 0.02)


def _mlp_kind(c: ModelConfig, layer: int) -> str:
    from gptevo.model import mlp_kind

    return mlp_kind(c, layer)


def roles(c: ModelConfig) -> tuple[dict[str, tuple], list[dict[str, tuple]]]:
    """({global role: shape}, [{layer role: shape} per layer]) of every tensor ``c`` needs.

    Shapes are the engine's convention: matrices ``(out, in)``, experts ``(E, out, in)``."""
    V, D, H, G, Dh = c.vocab_size, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    ln = c.norm == "layernorm"
    g: dict[str, tuple] = {"embed": (V, D), "final_norm": (D,)}
    if ln:
        g["final_norm_bias"] = (D,)
    if c.position == "learned":
        g["pos_embed"] = (c.max_position_embeddings, D)
    if not c.tie_word_embeddings:
        g["lm_head"] = (V, D)
    layers = []
    for i in range(c.num_layers):
        L: dict[str, tuple] = {"attn_norm": (D,), "mlp_norm": (D,),
                               "wq": (H * Dh, D), "wk": (G * Dh, D), "wv": (G * Dh, D), "wo": (D, H * Dh)}
        if ln:
            L.update(attn_norm_bias=(D,), mlp_norm_bias=(D,))
        if c.qkv_bias:
            L.update(bq=(H * Dh,), bk=(G * Dh,), bv=(G * Dh,))
        if c.o_bias:
            L["bo"] = (D,)
        if c.qk_norm:
            L.update(q_norm=(Dh,), k_norm=(Dh,))
        if c.attention_sinks:
            L["sinks"] = (H,)
        kind = _mlp_kind(c, i)
        if kind == "gelu":
            I = c.intermediate_size
            L.update(w_fc=(I, D), w_proj=(D, I))
            if c.mlp_bias:
                L.update(b_fc=(I,), b_proj=(D,))
        elif kind == "gated":
            I = c.intermediate_size
            L.update(w_gate=(I, D), w_up=(I, D), w_down=(D, I))
            if c.mlp_bias:
                L.update(b_gate=(I,), b_up=(I,), b_down=(D,))
        else:
            E, I = c.num_experts, c.moe_intermediate_size or c.intermediate_size
            L.update(router=(E, D), experts_gate_up=(E, 2 * I, D), experts_down=(E, D, I))
            if c.mlp_bias:
                L.update(router_bias=(E,), experts_gate_up_bias=(E, 2 * I), experts_down_bias=(E, D))
        layers.append(L)
    return g, layers


def _is_matrix(role: str) -> bool:
    return role in ("embed", "pos_embed", "lm_head", "router") or role.startswith(("w", "experts_")) \
        and not role.endswith("_bias")


def _fill(role: str) -> str:
    """"ones" (norm scales), "zeros" (biases, sinks) or "normal" (matrices)."""
    if role.endswith("norm") or role in ("q_norm", "k_norm"):
        return "ones"
    return "normal" if _is_matrix(role) else "zeros"


def _random_mxfp4(shape: tuple, rng: np.random.Generator, name: str):
    """A packed MXFP4 weight of logical ``shape`` [E, out, in]: random codes, scale byte SCALE_BYTE."""
    from gptevo.ops.mxfp4 import Mxfp4Weight

    if shape[-1] % 32:
        raise ConfigError(f"{name}: MXFP4 needs an input width that is a multiple of 32, got {shape[-1]}")
    blocks = rng.integers(0, 256, (*shape[:-1], shape[-1] // 32, 16), dtype=np.uint8)   # [E,out,in/32,16]
    scales = np.full((*shape[:-1], shape[-1] // 32), SCALE_BYTE, dtype=np.uint8)      # [E,out,in/32]
    return Mxfp4Weight(blocks, scales, name=name)


def _random_array(shape: tuple, fill: str, rng: np.random.Generator) -> np.ndarray:
    bf16 = np.dtype(ml_dtypes.bfloat16)
    if fill == "ones":
        return np.ones(shape, bf16)
    if fill == "zeros":
        return np.zeros(shape, bf16)
    out = np.empty(shape, bf16)
    flat = out.reshape(-1)
    chunk = 1 << 24                  # bounded float32 temporaries for big tables
    for a in range(0, flat.size, chunk):
        b = min(flat.size, a + chunk)
        flat[a:b] = (rng.standard_normal(b - a, dtype=np.float32) * np.float32(STD)).astype(bf16)
    return out


def expert_storage(c: ModelConfig) -> str:
    """"mxfp4" when the config records MXFP4 experts (``extra['quantization']``), else "bfloat16"."""
    return "mxfp4" if dict(c.extra).get("quantization") == "mxfp4" else "bfloat16"


def random_weights(c: ModelConfig, seed: int = 0, progress: Callable[[str], None] | None = None) -> ModelWeights:
    """Random weights for every role of ``c``: bf16 (normal(0, 0.02) matrices, unit norm scales, zero
    biases and sinks); expert matrices as packed MXFP4 when ``expert_storage(c) == "mxfp4"``."""
    rng = np.random.default_rng(seed)
    mx = expert_storage(c) == "mxfp4"

    def make(role, shape, where):
        if mx and role in ("experts_gate_up", "experts_down"):
            return _random_mxfp4(shape, rng, f"{where}.{role}")
        return _random_array(shape, _fill(role), rng)

    g, layers = roles(c)
    arrays = {r: make(r, s, "model") for r, s in g.items()}
    per_layer = []
    for i, L in enumerate(layers):
        per_layer.append({r: make(r, s, f"layer{i}") for r, s in L.items()})
        if progress is not None:
            progress(f"layer {i + 1}/{len(layers)}")
    return weights_from_arrays(c, arrays, per_layer)


def weights_from_arrays(c: ModelConfig, globals_: dict[str, Any], layers: list[dict[str, Any]]) -> ModelWeights:
    """A ModelWeights from arrays by role; ConfigError naming the first role that is missing, unknown
    or of the wrong shape (compared with :func:`roles`)."""
    want_g, want_layers = roles(c)
    if len(layers) != len(want_layers):
        raise ConfigError(f"{len(layers)} layers of weights given, the config has {len(want_layers)}")
    for where, want, got in [("model", want_g, globals_)] + [
            (f"layer {i}", w, l) for i, (w, l) in enumerate(zip(want_layers, layers))]:
        for role in sorted(set(want) | set(got)):
            if role not in got:
                raise ConfigError(f"{where}: weight role {role!r} is missing (shape {list(want[role])})")
            if role not in want:
                raise ConfigError(f"{where}: weight role {role!r} is not used by this config")
            if tuple(got[role].shape) != tuple(want[role]):
                raise ConfigError(f"{where}: weight {role!r} has shape {list(got[role].shape)}, expected "
                                  f"{list(want[role])}")
    lm_head = globals_.get("lm_head", globals_["embed"])
    return ModelWeights(embed=globals_["embed"], final_norm=globals_["final_norm"], lm_head=lm_head,
                        layers=[LayerWeights(**L) for L in layers], pos_embed=globals_.get("pos_embed"),
                        final_norm_bias=globals_.get("final_norm_bias"), tied=c.tie_word_embeddings)


def count_parameters(weights: ModelWeights) -> int:
    """Parameters held by ``weights``, counted from the tensors' shapes (a tied head once; MXFP4 by
    its logical shape). Call before a backend fuses projections (fused tensors alias their parts)."""
    seen: set[int] = set()
    total = 0
    arrays = [weights.embed, weights.pos_embed, weights.final_norm, weights.final_norm_bias, weights.lm_head]
    arrays += [a for layer in weights.layers for a in vars(layer).values()]
    for a in arrays:
        if a is None or id(a) in seen:
            continue
        seen.add(id(a))
        total += int(np.prod(a.shape, dtype=np.int64))
    return total


def build_model(c: ModelConfig, backend=None, seed: int = 0, weights: ModelWeights | None = None,
                progress: Callable[[str], None] | None = None):
    """A :class:`gptevo.model.Model` of ``c`` on ``backend`` with random weights (or ``weights``),
    prepared by the backend's load-time hook as ``gptevo.load`` would."""
    from gptevo import backends
    from gptevo.model import Model, ops_needed

    be = backends.resolve(backend)
    be.require(ops_needed(c), what=f"the {c.family} ladder step")
    w = weights if weights is not None else random_weights(c, seed, progress=progress)
    if be.prepare_weights is not None:
        w = be.prepare_weights(w, c, "stored")
    return Model(c, w, be)
