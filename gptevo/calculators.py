"""Back-of-the-envelope calculators: parameters, active parameters, KV-cache and weight memory.

Everything here works from a :class:`gptevo.config.ModelConfig` alone (no weights, no NumPy) and
returns exact Python ints. The formulas are written out in ``spec/calculators.md``; where the seed
survey's own calculators disagree (its parameter counts, its 0.5-byte MXFP4, its KV-cache code
without a layer factor) see ``spec/errata.md``.

The model is described once, as a list of :class:`TensorGroup` (one entry per kind of tensor, with
the number of copies in the model), and every calculator is a sum over that list. Conventions:

* shapes are ``(out, in)`` for matrices, as in ``spec/README.md``;
* ``mlp_bias`` gives biases to the dense MLP or to every expert; a MoE router has a bias when the
  config has ``router_bias`` (if a later config grows that field) and otherwise when ``mlp_bias``
  is set (gpt-oss: both; Mixtral and Qwen3-MoE: neither);
* "active" parameters follow the gpt-oss README: the unembedding counts, the embedding lookup
  (token and learned-position tables) does not, unless ``count_embedding=True``.
"""
from __future__ import annotations

from dataclasses import dataclass

from gptevo.config import ModelConfig
from gptevo.errors import ConfigError, RequestError

# Bytes per element of the plain dtypes. MXFP4 is a block format and is handled separately.
_DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
_ALIASES = {"fp64": "float64", "fp32": "float32", "fp16": "float16", "half": "float16",
            "bf16": "bfloat16", "fp4": "mxfp4"}
WEIGHT_DTYPES = ("float64", "float32", "float16", "bfloat16", "int8", "mxfp4")
_QUANTIZED = ("int8", "mxfp4")   # formats for matrices only: vectors stay in ``other_dtype``

MXFP4_BLOCK = 32          # values per block, along the input (last) dimension
MXFP4_BLOCK_BYTES = 17    # 16 bytes of packed 4-bit codes + one uint8 E8M0 scale = 4.25 bits/value

_NORMS = ("layernorm", "rmsnorm")
_POSITIONS = ("rope", "learned", "sinusoidal", "alibi", "none")
_MLPS = ("gelu", "swiglu", "clamped_swiglu", "moe")
_EXPERT_ACTS = ("swiglu", "clamped_swiglu")


@dataclass(frozen=True)
class TensorGroup:
    """One kind of parameter tensor and how many copies of it the model holds.

    ``group`` is the breakdown bucket ("embedding", "position", "attention", "norms", "mlp",
    "router", "head"); ``shape`` is ``(out, in)`` or ``(n,)``; ``copies`` counts the tensor in the
    whole model (e.g. ``num_layers`` or ``num_layers * num_experts``); ``active_copies`` is how many
    of those a single token uses (``num_layers * k`` for experts); ``expert`` marks expert tensors.
    """

    group: str
    name: str
    shape: tuple[int, ...]
    copies: int
    active_copies: int
    expert: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _canonical_dtype(dtype: str, allowed: tuple[str, ...]) -> str:
    name = _ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name not in allowed:
        raise RequestError(f"dtype {dtype!r} is not supported here; expected one of {', '.join(allowed)}")
    return name


def _moe_layers(config: ModelConfig) -> int:
    """How many layers use the mixture of experts (``mlp_layer_types`` when given, else ``mlp``)."""
    kinds = getattr(config, "mlp_layer_types", ())
    if kinds:
        return sum(1 for kind in kinds if kind == "moe")
    return config.num_layers if config.mlp == "moe" else 0


def _check(config: ModelConfig) -> None:
    """Raise ConfigError for the field values the calculators cannot interpret.

    ModelConfig validates itself too; this repeats the checks the formulas rely on, so a config
    built with ``dataclasses.replace`` tricks or an older ModelConfig still fails loudly.
    """
    if config.norm not in _NORMS:
        raise ConfigError(f"config field 'norm' is {config.norm!r}; expected one of {_NORMS}")
    if config.position not in _POSITIONS:
        raise ConfigError(f"config field 'position' is {config.position!r}; expected one of {_POSITIONS}")
    if config.mlp not in _MLPS:
        raise ConfigError(f"config field 'mlp' is {config.mlp!r}; expected one of {_MLPS}")
    n_moe = _moe_layers(config)
    if n_moe:
        if config.num_experts <= 0:
            raise ConfigError(f"a mixture-of-experts MLP needs num_experts > 0, got {config.num_experts}")
        if not 0 < config.experts_per_token <= config.num_experts:
            raise ConfigError(f"experts_per_token must be in 1..num_experts={config.num_experts}, "
                              f"got {config.experts_per_token}")
        if config.expert_activation not in _EXPERT_ACTS:
            raise ConfigError(f"config field 'expert_activation' is {config.expert_activation!r}; "
                              f"expected one of {_EXPERT_ACTS}")
        if _expert_width(config) <= 0:
            raise ConfigError("a MoE config needs moe_intermediate_size or intermediate_size > 0")
    if n_moe < config.num_layers and config.intermediate_size <= 0:
        raise ConfigError(f"a dense MLP needs intermediate_size > 0, got {config.intermediate_size}")
    if config.sliding_window is not None and (isinstance(config.sliding_window, bool)
                                              or not isinstance(config.sliding_window, int)
                                              or config.sliding_window <= 0):
        raise ConfigError(f"config field 'sliding_window' must be a positive int or None, "
                          f"got {config.sliding_window!r}")


def _expert_width(config: ModelConfig) -> int:
    """Per-expert hidden width: ``moe_intermediate_size``, else ``intermediate_size`` (gpt-oss, Mixtral)."""
    return config.moe_intermediate_size or config.intermediate_size


def _router_bias(config: ModelConfig) -> bool:
    explicit = getattr(config, "router_bias", None)   # not a ModelConfig field yet; see module docstring
    return bool(config.mlp_bias if explicit is None else explicit)


def tensor_groups(config: ModelConfig) -> list[TensorGroup]:
    """Every parameter tensor of ``config``, grouped by kind (see :class:`TensorGroup`)."""
    _check(config)
    L, D, V = config.num_layers, config.hidden_size, config.vocab_size
    H, G, Dh = config.num_heads, config.num_kv_heads, config.head_dim
    out: list[TensorGroup] = []

    def add(group, name, shape, copies, active=None, expert=False):
        out.append(TensorGroup(group, name, tuple(shape), copies, copies if active is None else active, expert))

    add("embedding", "embed_tokens", (V, D), 1)
    if config.position == "learned":
        add("position", "embed_positions", (config.max_position_embeddings, D), 1)

    # attention: q, k, v, o (+ biases, sinks, q/k RMSNorm over each head)
    add("attention", "q_proj", (H * Dh, D), L)
    add("attention", "k_proj", (G * Dh, D), L)
    add("attention", "v_proj", (G * Dh, D), L)
    add("attention", "o_proj", (D, H * Dh), L)
    if config.qkv_bias:
        add("attention", "q_bias", (H * Dh,), L)
        add("attention", "k_bias", (G * Dh,), L)
        add("attention", "v_bias", (G * Dh,), L)
    if config.o_bias:
        add("attention", "o_bias", (D,), L)
    if config.attention_sinks:
        add("attention", "sinks", (H,), L)

    # norms: two per block (before attention, before MLP) and a final one; LayerNorm has a bias
    norm_tensors = ("weight", "bias") if config.norm == "layernorm" else ("weight",)
    for t in norm_tensors:
        add("norms", f"block_norm_{t}", (D,), 2 * L)
        add("norms", f"final_norm_{t}", (D,), 1)
    if config.qk_norm:
        add("norms", "q_norm_weight", (Dh,), L)
        add("norms", "k_norm_weight", (Dh,), L)

    # MLP: E experts (k active) on MoE layers, a dense MLP on the others
    n_moe = _moe_layers(config)
    n_dense = L - n_moe
    if n_moe:
        E, k, I = config.num_experts, config.experts_per_token, _expert_width(config)
        add("router", "router", (E, D), n_moe)
        if _router_bias(config):
            add("router", "router_bias", (E,), n_moe)
        add("mlp", "expert_gate_up", (2 * I, D), n_moe * E, n_moe * k, expert=True)   # gate and up
        add("mlp", "expert_down", (D, I), n_moe * E, n_moe * k, expert=True)
        if config.mlp_bias:
            add("mlp", "expert_gate_up_bias", (2 * I,), n_moe * E, n_moe * k, expert=True)
            add("mlp", "expert_down_bias", (D,), n_moe * E, n_moe * k, expert=True)
    if n_dense:
        I = config.intermediate_size
        up_rows = I if config.mlp == "gelu" else 2 * I   # dense layers of a MoE model are gated
        add("mlp", "gate_up" if up_rows == 2 * I else "fc", (up_rows, D), n_dense)
        add("mlp", "down", (D, I), n_dense)
        if config.mlp_bias:
            add("mlp", "gate_up_bias" if up_rows == 2 * I else "fc_bias", (up_rows,), n_dense)
            add("mlp", "down_bias", (D,), n_dense)

    if not config.tie_word_embeddings:
        add("head", "lm_head", (V, D), 1)
    return out


def parameter_count(config: ModelConfig) -> dict[str, int]:
    """Parameters of ``config``, in total and by part.

    Keys: ``total``; whole-model sums ``embedding`` (token table), ``position`` (learned table),
    ``attention`` (q/k/v/o, their biases, sinks), ``norms`` (block, final and q/k norms), ``mlp``
    (dense MLPs and all experts, with biases), ``router``, ``head`` (0 when tied); per-layer values
    ``attention_per_layer``, ``norms_per_layer`` and ``mlp_per_layer`` (this one only when every
    layer has the same MLP); for MoE ``experts`` (all expert tensors), ``per_expert`` (one expert's
    weights and biases), ``moe_layers`` and ``router_per_layer`` (per MoE layer).
    """
    groups = tensor_groups(config)
    L = config.num_layers
    parts = dict.fromkeys(("embedding", "position", "attention", "norms", "mlp", "router", "head"), 0)
    for g in groups:
        parts[g.group] += g.numel * g.copies
    per_layer_norms = sum(g.numel * g.copies for g in groups
                          if g.group == "norms" and not g.name.startswith("final_norm"))
    result = {"total": sum(parts.values()), **parts,
              "attention_per_layer": parts["attention"] // L,
              "norms_per_layer": per_layer_norms // L}
    n_moe = _moe_layers(config)
    if n_moe in (0, L):
        result["mlp_per_layer"] = parts["mlp"] // L
    if n_moe:
        experts = sum(g.numel * g.copies for g in groups if g.expert)
        result.update(experts=experts, per_expert=experts // (n_moe * config.num_experts),
                      moe_layers=n_moe, router_per_layer=parts["router"] // n_moe)
    return result


def active_parameters(config: ModelConfig, count_embedding: bool = False) -> int:
    """Parameters one token uses: k of E experts per layer; router, attention, norms and head in full.

    Convention (gpt-oss README, facts/gptoss.md §1.1): the unembedding counts, the embedding lookup
    does not; ``count_embedding=True`` adds the token (and learned-position) tables, which is the
    convention of Mixtral's published "12.9B active". A tied head counts once, as the unembedding.
    For a dense model with ``count_embedding=True`` this equals ``parameter_count(...)['total']``.
    """
    total = 0
    for g in tensor_groups(config):
        if g.group in ("embedding", "position") and not count_embedding:
            continue
        total += g.numel * g.active_copies
    if config.tie_word_embeddings and not count_embedding:
        total += config.vocab_size * config.hidden_size   # the shared table used as unembedding
    return total


def _dtype_bytes(dtype: str) -> int:
    return _DTYPE_BYTES[_canonical_dtype(dtype, tuple(_DTYPE_BYTES))]


def kv_cache_bytes(config: ModelConfig, tokens: int, dtype: str = "bfloat16", capped: bool = True) -> int:
    """Bytes of the K and V cache holding ``tokens`` positions (batch 1).

    Per layer: ``2 * num_kv_heads * head_dim * bytes(dtype) * n`` where ``n = tokens`` on full
    layers and, with ``capped=True``, ``n = min(tokens, W)`` on sliding-window layers (a query sees
    W keys including itself, so a ring buffer of W entries suffices). ``capped=False`` gives the
    number for a cache that keeps every position on every layer.
    """
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise RequestError(f"tokens must be a non-negative int, got {tokens!r}")
    _check(config)
    per_position = 2 * config.num_kv_heads * config.head_dim * _dtype_bytes(dtype)
    total = 0
    for layer in range(config.num_layers):
        window = config.window_for_layer(layer) if capped else None
        total += per_position * (tokens if window is None else min(tokens, window))
    return total


def _matrix_bytes(shape: tuple[int, ...], dtype: str) -> int:
    """Bytes of one tensor stored as ``dtype``; MXFP4 packs 32 values of a row into 17 bytes."""
    if dtype == "mxfp4":
        rows = 1
        for s in shape[:-1]:
            rows *= s
        blocks = -(-shape[-1] // MXFP4_BLOCK)   # a partial last block is padded
        return rows * blocks * MXFP4_BLOCK_BYTES
    n = 1
    for s in shape:
        n *= s
    return n * _DTYPE_BYTES[dtype]


def _tensor_dtype(g: TensorGroup, dtype: str, experts_only: bool, other_dtype: str) -> str:
    """Which dtype a tensor is stored in under the ``weight_memory`` rules."""
    is_matrix = len(g.shape) == 2
    if experts_only:
        return dtype if (g.expert and is_matrix) else other_dtype
    if dtype in _QUANTIZED and not is_matrix:
        return other_dtype      # norm scales, biases and sinks stay in other_dtype
    return dtype


def weight_memory(config: ModelConfig, dtype: str = "bfloat16", experts_only: bool = False,
                  other_dtype: str = "bfloat16") -> int:
    """Bytes to hold every weight of ``config``.

    ``dtype`` is one of float64, float32, float16, bfloat16, int8 (1 byte, scales not counted), or
    mxfp4 (17 bytes per 32 values of a row = 4.25 bits). With ``experts_only=True`` only the expert
    weight matrices use ``dtype`` and everything else (including expert biases) uses ``other_dtype``:
    the gpt-oss checkpoint layout is ``weight_memory(cfg, "mxfp4", experts_only=True)``. With
    ``experts_only=False`` every tensor uses ``dtype``, except that the quantized formats (int8,
    mxfp4) apply to matrices only and vectors use ``other_dtype``.
    """
    dtype = _canonical_dtype(dtype, WEIGHT_DTYPES)
    other_dtype = _canonical_dtype(other_dtype, tuple(_DTYPE_BYTES))
    return sum(_matrix_bytes(g.shape, _tensor_dtype(g, dtype, experts_only, other_dtype)) * g.copies
               for g in tensor_groups(config))


def bytes_per_token(config: ModelConfig, weight_dtype: str = "bfloat16", context_tokens: int = 0,
                    kv_dtype: str = "bfloat16", experts_only: bool = False,
                    other_dtype: str = "bfloat16") -> int:
    """Bytes read to decode one token at batch 1: the active weights plus the KV cache.

    Weights: every active tensor once (k of E experts per layer, router, attention, norms, head),
    stored as in :func:`weight_memory`, plus one row of the token table (and of the learned position
    table). KV: :func:`kv_cache_bytes` for ``context_tokens`` cached positions, capped at W on
    sliding layers. This is the memory-bound roofline numerator for decode.
    """
    weight_dtype = _canonical_dtype(weight_dtype, WEIGHT_DTYPES)
    other_dtype = _canonical_dtype(other_dtype, tuple(_DTYPE_BYTES))
    total = 0
    for g in tensor_groups(config):
        dt = _tensor_dtype(g, weight_dtype, experts_only, other_dtype)
        if g.group in ("embedding", "position"):
            total += _matrix_bytes((1, g.shape[-1]), dt)          # one row is read
            if g.group == "embedding" and config.tie_word_embeddings:
                total += _matrix_bytes(g.shape, dt)               # the tied table as unembedding
        else:
            total += _matrix_bytes(g.shape, dt) * g.active_copies
    return total + kv_cache_bytes(config, context_tokens, kv_dtype, capped=True)
