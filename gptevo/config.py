"""One frozen model config for every family.

Each architectural feature is a field (tinygrad-style flags), so ``model.py`` never branches on the
family name. Adapters that build a ModelConfig from a Hugging Face ``config.json`` (transformers
4.x and 5.x keys) or from the original gpt-oss ``config.json`` live in ``gptevo/config_adapters.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
import math
from typing import Any, Mapping

from gptevo.errors import ConfigError

MAX_LAYERS = 4096
MAX_VOCAB = 2**24
MAX_HIDDEN = 2**17
MAX_POSITIONS = 2**24
MAX_HEADS = 2**14
MAX_HEAD_DIM = 2**14
MAX_INTERMEDIATE = 2**20
MAX_EXPERTS = 2**16

CHOICES = {
    "norm": ("rmsnorm", "layernorm"),
    "block_order": ("pre", "post"),
    "position": ("rope", "learned", "sinusoidal", "alibi", "none"),
    "mlp": ("gelu", "swiglu", "clamped_swiglu", "moe"),
    "activation": ("silu", "gelu", "gelu_tanh"),
    "router_order": ("softmax_topk", "topk_softmax"),
    "expert_activation": ("swiglu", "clamped_swiglu"),
    "checkpoint_layout": ("hf", "gptoss_original"),
}

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
    attn_scale_inverse_layer: bool = False  # GPT-2 scale_attn_by_inverse_layer_idx: scores /= (layer+1)
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
    mlp_layer_types: tuple[str, ...] = ()  # per layer "dense" | "moe" (Qwen3-MoE mlp_only_layers,
                                           # decoder_sparse_step); () = every layer uses ``mlp``

    # embeddings and head
    tie_word_embeddings: bool = False
    embedding_scale: float = 1.0          # Gemma: sqrt(hidden_size)

    # tokens
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    torch_dtype: str = "float32"          # the checkpoint's stored dtype, for information
    checkpoint_layout: str = "hf"         # "hf" | "gptoss_original" (tensor names of original/)
    extra: tuple[tuple[str, Any], ...] = field(default=(), compare=False)

    def __post_init__(self):
        _validate(self)

    # -- derived values -----------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def context_length(self) -> int:
        """The longest sequence (prompt + generation) gptevo accepts for this model.

        ``max_position_embeddings``, except under dynamic-NTK RoPE, whose purpose is to run past the
        trained context: there we accept up to ``factor`` times it (transformers sets no limit at all;
        we keep one so that a request can still be refused before any allocation).
        """
        scaling = dict(self.rope_scaling)
        kind = scaling.get("rope_type", scaling.get("type"))
        if self.position == "rope" and kind == "dynamic":
            factor = scaling.get("factor", 1.0)
            if isinstance(factor, (int, float)) and factor > 1:
                return int(self.max_position_embeddings * factor)
        return self.max_position_embeddings

    @property
    def scaling(self) -> dict[str, Any]:
        """The RoPE scaling rule as a dict (``{}`` for the default rule)."""
        return dict(self.rope_scaling)

    def is_moe_layer(self, layer: int) -> bool:
        """True when ``layer``'s MLP is the mixture of experts (``mlp == "moe"``)."""
        if self.mlp_layer_types:
            return self.mlp_layer_types[layer] == "moe"
        return self.mlp == "moe"

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


# -- validation -------------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_int(cfg: ModelConfig, name: str, lo: int, hi: int) -> None:
    v = getattr(cfg, name)
    if not _is_int(v):
        raise ConfigError(f"config field {name!r} must be an integer, got {v!r} ({type(v).__name__})")
    if not lo <= v <= hi:
        raise ConfigError(f"config field {name!r} = {v} is outside [{lo}, {hi}]")


def _check_float(cfg: ModelConfig, name: str, positive: bool = True, optional: bool = False) -> None:
    v = getattr(cfg, name)
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"config field {name!r} must be a number, got {v!r}")
    if not math.isfinite(v) or (positive and v <= 0):
        raise ConfigError(f"config field {name!r} must be a finite{' positive' if positive else ''} "
                          f"number, got {v!r}")


def _check_token(cfg: ModelConfig, name: str, v: Any) -> None:
    if not _is_int(v) or not 0 <= v < cfg.vocab_size:
        raise ConfigError(f"config field {name!r} = {v!r} must be a token id in [0, vocab_size="
                          f"{cfg.vocab_size})")


def _as_tuple(cfg: ModelConfig, name: str) -> tuple:
    v = getattr(cfg, name)
    if isinstance(v, list):
        v = tuple(v)
        object.__setattr__(cfg, name, v)
    if not isinstance(v, tuple):
        raise ConfigError(f"config field {name!r} must be a tuple, got {type(v).__name__}")
    return v


def _check_scaling_value(key: str, v: Any) -> None:
    if isinstance(v, (tuple, list)):
        for x in v:
            _check_scaling_value(key, x)
    elif isinstance(v, float) and not math.isfinite(v):
        raise ConfigError(f"rope scaling field {key!r} must be finite, got {v!r}")
    elif not isinstance(v, (str, int, float, type(None))):
        raise ConfigError(f"rope scaling field {key!r} has unsupported value {v!r}")


def _validate(cfg: ModelConfig) -> None:
    if not isinstance(cfg.family, str) or not cfg.family:
        raise ConfigError(f"config field 'family' must be a non-empty string, got {cfg.family!r}")
    _check_int(cfg, "vocab_size", 1, MAX_VOCAB)
    _check_int(cfg, "hidden_size", 1, MAX_HIDDEN)
    _check_int(cfg, "num_layers", 1, MAX_LAYERS)
    _check_int(cfg, "num_heads", 1, MAX_HEADS)
    _check_int(cfg, "num_kv_heads", 1, MAX_HEADS)
    _check_int(cfg, "head_dim", 1, MAX_HEAD_DIM)
    _check_int(cfg, "intermediate_size", 0, MAX_INTERMEDIATE)
    _check_int(cfg, "max_position_embeddings", 1, MAX_POSITIONS)
    if cfg.num_heads % cfg.num_kv_heads:
        raise ConfigError(f"num_attention_heads ({cfg.num_heads}) must be a multiple of "
                          f"num_key_value_heads ({cfg.num_kv_heads})")
    for name, options in CHOICES.items():
        v = getattr(cfg, name)
        if v not in options:
            raise ConfigError(f"config field {name!r} = {v!r} is not one of {', '.join(options)}")
    for name in ("qk_norm", "rope_interleaved", "qkv_bias", "o_bias", "attention_sinks", "mlp_bias",
                 "norm_topk_prob", "tie_word_embeddings", "attn_scale_inverse_layer"):
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(f"config field {name!r} must be true or false, got {getattr(cfg, name)!r}")
    for name in ("norm_eps", "rope_theta", "swiglu_alpha", "swiglu_limit", "embedding_scale"):
        _check_float(cfg, name)
    _check_float(cfg, "norm_offset", positive=False)
    _check_float(cfg, "attn_scale", optional=True)
    if cfg.rotary_dim is not None:
        _check_int(cfg, "rotary_dim", 2, cfg.head_dim)
        if cfg.rotary_dim % 2:
            raise ConfigError(f"config field 'rotary_dim' = {cfg.rotary_dim} must be even")
    if cfg.sliding_window is not None:
        _check_int(cfg, "sliding_window", 1, MAX_POSITIONS)

    if isinstance(cfg.rope_scaling, Mapping):
        object.__setattr__(cfg, "rope_scaling", ModelConfig.freeze(cfg.rope_scaling))
    for item in _as_tuple(cfg, "rope_scaling"):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise ConfigError(f"config field 'rope_scaling' must be (key, value) pairs, got {item!r}")
        _check_scaling_value(item[0], item[1])

    layer_types = _as_tuple(cfg, "layer_types")
    if layer_types:
        if len(layer_types) != cfg.num_layers:
            raise ConfigError(f"layer_types has {len(layer_types)} entries, expected num_hidden_layers="
                              f"{cfg.num_layers}")
        bad = [t for t in layer_types if t not in ("full", "sliding")]
        if bad:
            raise ConfigError(f"layer_types entries must be 'full' or 'sliding', got {bad[0]!r}")
        if "sliding" in layer_types and cfg.sliding_window is None:
            raise ConfigError("layer_types marks sliding layers but sliding_window is None")

    # MLP / mixture of experts
    _check_int(cfg, "num_experts", 0, MAX_EXPERTS)
    mlp_types = _as_tuple(cfg, "mlp_layer_types")
    if mlp_types:
        if len(mlp_types) != cfg.num_layers:
            raise ConfigError(f"mlp_layer_types has {len(mlp_types)} entries, expected num_hidden_layers="
                              f"{cfg.num_layers}")
        bad = [t for t in mlp_types if t not in ("dense", "moe")]
        if bad:
            raise ConfigError(f"mlp_layer_types entries must be 'dense' or 'moe', got {bad[0]!r}")
    uses_moe = cfg.mlp == "moe" or "moe" in mlp_types
    uses_dense = (cfg.mlp != "moe" and not mlp_types) or "dense" in mlp_types
    if uses_moe:
        if cfg.num_experts < 1:
            raise ConfigError("a mixture-of-experts MLP needs num_experts >= 1")
        _check_int(cfg, "experts_per_token", 1, cfg.num_experts)
        _check_int(cfg, "moe_intermediate_size", 1, MAX_INTERMEDIATE)
    else:
        _check_int(cfg, "experts_per_token", 0, MAX_EXPERTS)
        _check_int(cfg, "moe_intermediate_size", 0, MAX_INTERMEDIATE)
    if uses_dense and cfg.intermediate_size < 1:
        raise ConfigError("a dense MLP needs intermediate_size >= 1")

    # tokens and strings
    for name in ("bos_token_id", "pad_token_id"):
        if getattr(cfg, name) is not None:
            _check_token(cfg, name, getattr(cfg, name))
    for t in _as_tuple(cfg, "eos_token_ids"):
        _check_token(cfg, "eos_token_ids", t)
    if not isinstance(cfg.torch_dtype, str):
        raise ConfigError(f"config field 'torch_dtype' must be a string, got {cfg.torch_dtype!r}")
    if isinstance(cfg.extra, Mapping):
        object.__setattr__(cfg, "extra", ModelConfig.freeze(cfg.extra))
    _as_tuple(cfg, "extra")
