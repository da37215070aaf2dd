"""Computed figures of one ladder step (config only, exact ints): parameters, KV cache, FLOPs, bytes.

Every figure is a sum over :func:`gptevo.calculators.tensor_groups` or a calculator of
``spec/calculators.md``; the storage dtypes are the ladder's (bf16 everywhere, expert matrices
MXFP4 on the ``mxfp4`` step). The definitions are in spec/evolution.md, "Computed columns".
"""
from __future__ import annotations

from gptevo.calculators import (active_parameters, bytes_per_token, kv_cache_bytes, parameter_count,
                                tensor_groups, weight_memory)
from gptevo.config import ModelConfig
from gptevo.errors import RequestError

KV_DTYPE = "bfloat16"


def storage(config: ModelConfig) -> tuple[str, bool]:
    """(weight dtype, experts_only) for the calculators: ("mxfp4", True) on MXFP4 steps, else bf16."""
    if dict(config.extra).get("quantization") == "mxfp4":
        return "mxfp4", True
    return "bfloat16", False


def matmul_parameters(config: ModelConfig) -> int:
    """Weights one decoded token multiplies: every active matrix (k of E experts, router, attention,
    dense MLP, output head; a tied table counts as the head), not the embedding or position lookups."""
    total = 0
    for g in tensor_groups(config):
        if len(g.shape) != 2 or g.group in ("embedding", "position"):
            continue
        total += g.numel * g.active_copies
    if config.tie_word_embeddings:
        total += config.vocab_size * config.hidden_size
    return total


def mlp_matmul_active(config: ModelConfig) -> int:
    """MLP and router matrix weights one token multiplies (k of E experts per layer)."""
    return sum(g.numel * g.active_copies for g in tensor_groups(config)
               if len(g.shape) == 2 and g.group in ("mlp", "router"))


def attention_flops(config: ModelConfig, context: int) -> int:
    """FLOPs of the score and value products of one token decoded after ``context`` cached positions:
    4·H·Dh per visible key per layer (q·k and p·v), keys = context + 1 (itself), at most W on
    sliding layers."""
    total = 0
    for layer in range(config.num_layers):
        w = config.window_for_layer(layer)
        keys = context + 1 if w is None else min(context + 1, w)
        total += 4 * config.num_heads * config.head_dim * keys
    return total


def flops_per_token(config: ModelConfig, context: int) -> int:
    """2 FLOPs per matmul weight plus the attention products (norms, activations, softmax, RoPE and
    the router's top-k are left out: O(D) per layer)."""
    return 2 * matmul_parameters(config) + attention_flops(config, context)


def step_metrics(config: ModelConfig, context: int) -> dict[str, int]:
    """The computed columns of a step at ``context`` tokens (see spec/evolution.md)."""
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise RequestError(f"--context must be a positive integer, got {context!r}")
    dtype, experts_only = storage(config)
    pc = parameter_count(config)
    return {
        "params_total": pc["total"],
        "params_active": active_parameters(config),
        "params_mlp": pc["mlp"] + pc["router"],
        "params_mlp_active": mlp_matmul_active(config),
        "params_norms": pc["norms"],
        "kv_bytes_per_token": kv_cache_bytes(config, 1, KV_DTYPE, capped=False),
        "kv_bytes_at_context": kv_cache_bytes(config, context, KV_DTYPE, capped=True),
        "flops_per_token": flops_per_token(config, context),
        "weight_bytes_per_token": bytes_per_token(config, dtype, context_tokens=0, experts_only=experts_only),
        "weight_bytes": weight_memory(config, dtype, experts_only=experts_only),
        "weight_bytes_bf16": weight_memory(config, "bfloat16"),
    }
