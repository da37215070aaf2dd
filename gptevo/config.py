"""One frozen model config for every family.

Each architectural feature is a field (tinygrad-style flags), so ``model.py`` never branches on the
family name. Adapters that build a ModelConfig from a Hugging Face ``config.json`` (transformers
4.x and 5.x keys) or from the original gpt-oss ``config.json`` live in ``gptevo/config_adapters.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from gptevo.errors import ConfigError

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "gpt_oss", "phi3", "gemma")


@dataclass(frozen=True)
class ModelConfig:
    """Everything the forward pass needs to know about a model.

    Sizes: ``hidden_size`` (H), ``num_heads`` (query heads), ``num_kv_heads`` (G; H/G query heads share
    one KV head), ``head_dim`` (D, may differ from H/num_heads), ``intermediate_size`` (dense MLP width).
    MoE: ``num_experts`` (0 = dense), ``experts_per_token`` (k), ``moe_intermediate_size``.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int

    # normalisation and block structure
    norm: str = "rmsnorm"                 # "rmsnorm" | "layernorm"
    norm_eps: float = 1e-5
    norm_offset: float = 0.0              # 1.0 for Gemma's (1 + w) RMSNorm
    block_order: str = "pre"              # "pre" | "post"
    qk_norm: bool = False                 # Qwen3: RMSNorm over each head of q and k before RoPE

    # positions
    position: str = "rope"                # "rope" | "learned" | "sinusoidal" | "alibi" | "none"
    rope_theta: float = 10000.0
    rotary_dim: int | None = None         # None = head_dim (partial rotary when smaller)
    rope_interleaved: bool = False        # False = half-split (NeoX/HF), True = GPT-J style pairs
    rope_scaling: tuple[tuple[str, Any], ...] = ()   # sorted items of the scaling dict; () = default

    # attention
    qkv_bias: bool = False
    o_bias: bool = False
    attn_scale: float | None = None       # None = 1/sqrt(head_dim)
    sliding_window: int | None = None     # W: query i sees keys i-W+1..i on sliding layers
    layer_types: tuple[str, ...] = ()     # per layer "full" | "sliding"; () = all full
    attention_sinks: bool = False         # gpt-oss: one learned logit per query head

    # MLP
    mlp: str = "swiglu"                   # "gelu" | "swiglu" | "clamped_swiglu" | "moe"
    activation: str = "silu"              # "silu" | "gelu" | "gelu_tanh" (dense MLP / expert gate act)
    mlp_bias: bool = False
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    router_order: str = "softmax_topk"    # "softmax_topk" (Mixtral, Qwen3-MoE) | "topk_softmax" (gpt-oss)
    norm_topk_prob: bool = True           # renormalise top-k weights after softmax_topk
    expert_activation: str = "swiglu"     # "swiglu" | "clamped_swiglu" (gpt-oss, interleaved gate/up)
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    # embeddings and head
    tie_word_embeddings: bool = False
    embedding_scale: float = 1.0          # Gemma: sqrt(hidden_size)

    # tokens
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    torch_dtype: str = "float32"          # the checkpoint's stored dtype, for information
    extra: tuple[tuple[str, Any], ...] = field(default=(), compare=False)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "max_position_embeddings"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_kv_heads})")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries, expected num_hidden_layers="
                              f"{self.num_layers}")

    # -- derived values -----------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def scaling(self) -> dict[str, Any]:
        """The RoPE scaling rule as a dict (``{}`` for the default rule)."""
        return dict(self.rope_scaling)

    def window_for_layer(self, layer: int) -> int | None:
        """The sliding window W of ``layer`` or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if not self.layer_types:
            return self.sliding_window
        return self.sliding_window if self.layer_types[layer] == "sliding" else None

    def replace(self, **changes) -> "ModelConfig":
        return replace(self, **changes)

    @staticmethod
    def freeze(mapping: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
        """A hashable, sorted form of a (flat) dict for the tuple-valued fields."""
        if not mapping:
            return ()
        return tuple(sorted((str(k), tuple(v) if isinstance(v, list) else v) for k, v in mapping.items()))
