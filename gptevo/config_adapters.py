"""Build a :class:`ModelConfig` from the config files found in a model directory.

Layouts (spec/formats.md, "config.json"):
- Hugging Face ``config.json``, detected by ``model_type`` (else ``architectures``), for the
  families gpt2, llama, mistral, qwen2, qwen3, mixtral, qwen3_moe, gpt_oss, phi3, gemma. Both
  transformers 4.x keys (top-level ``rope_theta``, ``rope_scaling`` with ``rope_type`` or the legacy
  ``type``, ``torch_dtype``) and 5.x keys (``rope_parameters`` holding ``rope_theta`` and
  ``rope_type``, ``dtype``) are read. Per-family rules and defaults follow transformers 5.24 as
  recorded in the facts sheet on HF families (sections 2-9).
- The original gpt-oss ``config.json`` (16 keys such as ``num_experts``, ``experts_per_token``,
  ``rope_scaling_factor``, ``rope_ntk_alpha``), at the top level or in ``original/``.
``generation_config.json`` next to the config adds its ``eos_token_id`` values (union, config
first) and fills a missing ``bos_token_id`` / ``pad_token_id``. Token ids outside
``[0, vocab_size)`` (tiny test models often keep GPT-2's 50256) are dropped and listed in
``extra["dropped_token_ids"]``. ``auto_map`` and ``trust_remote_code`` are ignored: nothing named by
a config is ever imported.

Every problem is a ConfigError naming the file and the field: unknown architecture, wrong types
(a bool is not an int), missing sizes, heads that do not divide, absurd sizes (caps in
gptevo/config.py, checked *before* any per-layer list is built), non-finite floats.
"""
from __future__ import annotations

import math
import os
from typing import Any

from gptevo import config as C
from gptevo.config import ModelConfig
from gptevo.errors import ConfigError
from gptevo.model_files import locate
from gptevo.strict_json import read_json_file

MAX_CONFIG_BYTES = 16_000_000

ARCHITECTURES = {
    "GPT2LMHeadModel": "gpt2", "GPT2Model": "gpt2", "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral", "Qwen3MoeForCausalLM": "qwen3_moe",
    "GptOssForCausalLM": "gpt_oss", "Phi3ForCausalLM": "phi3", "GemmaForCausalLM": "gemma",
}
ORIGINAL_GPTOSS_KEYS = frozenset((
    "num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size",
    "intermediate_size", "swiglu_limit", "head_dim", "num_attention_heads", "num_key_value_heads",
    "sliding_window", "initial_context_length", "rope_theta", "rope_scaling_factor",
    "rope_ntk_alpha", "rope_ntk_beta"))
# o200k_harmony ids (facts: gpt-oss section 1.3 / 5): <|startoftext|>, <|endoftext|>, <|return|>, <|call|>
GPTOSS_BOS, GPTOSS_PAD, GPTOSS_EOS = 199998, 199999, (200002, 199999, 200012)
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "gelu": "gelu", "silu": "silu", "swish": "silu"}
_MISSING = object()


class _Reader:
    """Typed access to one config dict; every error names the file and the field."""

    def __init__(self, d: dict, source: str):
        self.d, self.source = d, source

    def fail(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}: field {key!r} {msg}")

    def has(self, key: str) -> bool:
        return self.d.get(key) is not None

    def first(self, *keys: str) -> str:
        """The first of ``keys`` present (not null), else the first key (for error messages)."""
        return next((k for k in keys if self.has(k)), keys[0])

    def raw(self, key: str, default: Any = None) -> Any:
        v = self.d.get(key)
        return default if v is None else v

    def int(self, key: str, default: Any = _MISSING, lo: int = 1, hi: int = 2**62) -> int:
        v = self.d.get(key)
        if v is None:
            if default is _MISSING:
                raise self.fail(key, "is missing (or null); it is required")
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(key, f"must be an integer, got {str(v)[:60]!r} ({type(v).__name__})")
        if not lo <= v <= hi:
            raise self.fail(key, f"= {str(v)[:60]} is outside [{lo}, {hi}]")
        return v

    def float(self, key: str, default: Any = _MISSING, positive: bool = True) -> float:
        v = self.d.get(key)
        if v is None:
            if default is _MISSING:
                raise self.fail(key, "is missing (or null); it is required")
            return default
        return _number(v, lambda m: self.fail(key, m), positive)

    def bool(self, key: str, default: bool) -> bool:
        v = self.d.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self.fail(key, f"must be true or false, got {str(v)[:60]!r}")
        return v

    def str(self, key: str, default: str) -> str:
        v = self.d.get(key)
        if v is None:
            return default
        if not isinstance(v, str):
            raise self.fail(key, f"must be a string, got {str(v)[:60]!r}")
        return v


def _number(v: Any, fail, positive: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return _raise(fail(f"must be a number, got {str(v)[:60]!r} ({type(v).__name__})"))
    try:
        v = float(v)
    except OverflowError:
        return _raise(fail("is too large for a float"))
    if not math.isfinite(v) or (positive and v <= 0):
        return _raise(fail(f"must be a finite{' positive' if positive else ''} number, got {v!r}"))
    return v


def _raise(exc: Exception):
    raise exc


# -- shared pieces -------------------------------------------------------------------------------
def _sizes(r: _Reader, head_dim_default: int | None) -> dict:
    """The Llama-skeleton sizes (hidden, layers, heads, kv heads, head_dim, intermediate, vocab, positions)."""
    H = r.int("hidden_size", hi=C.MAX_HIDDEN)
    nh = r.int("num_attention_heads", hi=C.MAX_HEADS)
    nkv = r.int("num_key_value_heads", default=nh, hi=C.MAX_HEADS)
    if nh % nkv:
        raise r.fail("num_key_value_heads", f"= {nkv} must divide num_attention_heads = {nh}")
    if r.has("head_dim"):
        D = r.int("head_dim", hi=C.MAX_HEAD_DIM)
    elif head_dim_default is not None:
        D = head_dim_default
    elif H % nh:
        raise r.fail("num_attention_heads", f"= {nh} must divide hidden_size = {H} (no head_dim given)")
    else:
        D = H // nh
    return dict(hidden_size=H, num_heads=nh, num_kv_heads=nkv, head_dim=D,
                num_layers=r.int("num_hidden_layers", hi=C.MAX_LAYERS),
                intermediate_size=r.int("intermediate_size", hi=C.MAX_INTERMEDIATE),
                vocab_size=r.int("vocab_size", hi=C.MAX_VOCAB),
                max_position_embeddings=r.int("max_position_embeddings", hi=C.MAX_POSITIONS))


def _activation(r: _Reader, key: str, default: str, gemma: bool = False) -> str:
    name = r.str(key, default)
    if gemma and name == "gelu":          # 5.x GemmaConfig rewrites legacy "gelu" to tanh GELU
        name = "gelu_pytorch_tanh"
    if name not in ACTIVATIONS:
        raise r.fail(key, f"= {name[:60]!r} is not a supported activation ({', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def _layer_types(r: _Reader, num_layers: int) -> tuple[str, ...]:
    v = r.raw("layer_types")
    if not isinstance(v, list) or len(v) != num_layers:
        raise r.fail("layer_types", f"must be a list of {num_layers} entries (one per layer), got "
                                    f"{str(v)[:80]}")
    names = {"sliding_attention": "sliding", "full_attention": "full", "sliding": "sliding", "full": "full"}
    out = []
    for t in v:
        if not isinstance(t, str) or t not in names:
            raise r.fail("layer_types", f"has unsupported layer type {str(t)[:60]!r} "
                                        f"(supported: sliding_attention, full_attention)")
        out.append(names[t])
    return tuple(out)


def _window(r: _Reader, if_absent: int | None) -> int | None:
    """``sliding_window``: ``if_absent`` when the key is missing (the HF class default), None when null."""
    if "sliding_window" not in r.d:
        return if_absent
    return r.int("sliding_window", default=None, hi=C.MAX_POSITIONS)


def _dtype(r: _Reader) -> str:
    return r.str("dtype", r.str("torch_dtype", "float32"))


def _biases(r: _Reader, key: str = "attention_bias", default: bool = False) -> dict:
    b = r.bool(key, default)
    return dict(qkv_bias=b, o_bias=b)


# -- RoPE ------------------------------------------------------------------------------------------
_ROPE_REQUIRED = {"linear": ("factor",), "dynamic": ("factor",),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
                  "yarn": (), "longrope": ()}
_ROPE_OPTIONAL = {"linear": (), "dynamic": ("original_max_position_embeddings",),
                  "llama3": ("original_max_position_embeddings",),
                  "yarn": ("factor", "beta_fast", "beta_slow", "attention_factor", "mscale",
                           "mscale_all_dim", "original_max_position_embeddings"),
                  "longrope": ("factor", "attention_factor", "original_max_position_embeddings")}


def _rope(r: _Reader, head_dim: int, max_pos: int, theta_default: float, family: str) -> dict:
    """rope_theta, rotary_dim and the normalised scaling dict (4.x and 5.x keys)."""
    params = r.raw("rope_parameters")
    where = "rope_parameters"
    if params is None:
        params, where = r.raw("rope_scaling"), "rope_scaling"
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise r.fail(where, f"must be an object, got {str(params)[:60]!r}")
    if any(isinstance(v, dict) for v in params.values()):
        raise r.fail(where, "holds nested objects (per-layer-type RoPE); not supported for this family")
    fail = lambda key: (lambda m: ConfigError(f"{r.source}: field {where}.{key} {m}"))  # noqa: E731
    theta = params.get("rope_theta")
    theta = r.float("rope_theta", theta_default) if theta is None else _number(theta, fail("rope_theta"))
    kind = params.get("rope_type", params.get("type")) or "default"
    if not isinstance(kind, str):
        raise fail("rope_type")(f"must be a string, got {str(kind)[:60]!r}")
    if kind == "su" or (family == "phi3" and kind == "yarn"):
        kind = "longrope"
    prf = params.get("partial_rotary_factor", r.raw("partial_rotary_factor", 1.0))
    prf = _number(prf, fail("partial_rotary_factor"))
    rotary_dim = int(head_dim * prf) if prf != 1.0 else None
    if rotary_dim is not None and (rotary_dim < 2 or rotary_dim % 2 or rotary_dim > head_dim):
        raise fail("partial_rotary_factor")(f"= {prf} gives rotary_dim {rotary_dim}; it must be even "
                                            f"and in [2, head_dim={head_dim}]")
    out = dict(rope_theta=theta, rotary_dim=rotary_dim, rope_scaling=())
    if kind == "default":
        return out
    if kind not in _ROPE_REQUIRED:
        raise fail("rope_type")(f"= {str(kind)[:60]!r} is not supported (default, linear, dynamic, "
                                f"llama3, yarn, longrope)")
    s: dict[str, Any] = {"rope_type": kind, "max_position_embeddings": max_pos}
    for key in _ROPE_REQUIRED[kind]:
        if params.get(key) is None:
            raise fail(key)(f"is required for rope_type {kind!r}")
        s[key] = _number(params[key], fail(key))
    for key in _ROPE_OPTIONAL[kind]:
        if params.get(key) is not None:
            s[key] = _number(params[key], fail(key))
    if kind in ("llama3", "yarn", "longrope"):
        if kind == "longrope" and r.has("original_max_position_embeddings"):   # top level wins
            s["original_max_position_embeddings"] = r.float("original_max_position_embeddings")
        s.setdefault("original_max_position_embeddings", float(max_pos))
        s["original_max_position_embeddings"] = int(s["original_max_position_embeddings"])
    if kind == "yarn":
        s.setdefault("factor", max_pos / s["original_max_position_embeddings"])
        s.setdefault("beta_fast", 32.0)
        s.setdefault("beta_slow", 1.0)
        truncate = params.get("truncate", True)
        if not isinstance(truncate, bool):
            raise fail("truncate")(f"must be true or false, got {str(truncate)[:40]!r}")
        s["truncate"] = truncate
    if kind == "longrope":
        half = (rotary_dim or head_dim) // 2
        for key in ("short_factor", "long_factor"):
            v = params.get(key)
            if not isinstance(v, list) or len(v) != half:
                raise fail(key)(f"must be a list of {half} numbers (rotary_dim / 2), got {str(v)[:80]}")
            s[key] = tuple(_number(x, fail(key)) for x in v)
    out["rope_scaling"] = ModelConfig.freeze(s)
    return out


# -- tokens ----------------------------------------------------------------------------------------
def _token_list(v: Any, fail) -> list[int]:
    if v is None:
        return []
    items = v if isinstance(v, list) else [v]
    for t in items:
        if isinstance(t, bool) or not isinstance(t, int):
            raise fail(f"must be a token id or a list of token ids, got {str(v)[:60]!r}")
    return list(items)


def _tokens(vocab: int, bos, eos: list[int], pad) -> dict:
    dropped = [t for t in [bos, pad, *eos] if t is not None and not 0 <= t < vocab]
    ok = lambda t: t is not None and 0 <= t < vocab  # noqa: E731
    return dict(bos_token_id=bos if ok(bos) else None, pad_token_id=pad if ok(pad) else None,
                eos_token_ids=tuple(dict.fromkeys(t for t in eos if ok(t))),
                extra_tokens=tuple(dropped))


def _hf_tokens(r: _Reader, vocab: int) -> dict:
    one = lambda k: (_token_list(r.raw(k), lambda m: r.fail(k, m)) or [None])[0]  # noqa: E731
    eos = _token_list(r.raw("eos_token_id"), lambda m: r.fail("eos_token_id", m))
    return _tokens(vocab, one("bos_token_id"), eos, one("pad_token_id"))


def _build(r: _Reader, family: str, fields: dict) -> ModelConfig:
    tokens = fields.pop("tokens")
    extra = dict(fields.pop("extra", {}))
    extra["source"] = r.source
    dropped = tokens.pop("extra_tokens")
    if dropped:
        extra["dropped_token_ids"] = dropped
    if r.has("auto_map") or r.has("trust_remote_code"):
        extra["ignored_remote_code"] = True
    try:
        return ModelConfig(family=family, **fields, **tokens, extra=ModelConfig.freeze(extra))
    except ConfigError as exc:
        raise ConfigError(f"{r.source}: {exc}") from None


# -- families --------------------------------------------------------------------------------------
def _gpt2(r: _Reader) -> ModelConfig:
    H = r.int(r.first("n_embd", "hidden_size"), hi=C.MAX_HIDDEN)
    nh = r.int(r.first("n_head", "num_attention_heads"), hi=C.MAX_HEADS)
    if H % nh:
        raise r.fail("n_head", f"= {nh} must divide n_embd = {H}")
    V = r.int("vocab_size", hi=C.MAX_VOCAB)
    scale = r.bool("scale_attn_weights", True)
    return _build(r, "gpt2", dict(
        vocab_size=V, hidden_size=H, num_heads=nh, num_kv_heads=nh, head_dim=H // nh,
        num_layers=r.int(r.first("n_layer", "num_hidden_layers"), hi=C.MAX_LAYERS),
        max_position_embeddings=r.int(r.first("n_positions", "max_position_embeddings"), hi=C.MAX_POSITIONS),
        intermediate_size=r.int("n_inner", default=4 * H, hi=C.MAX_INTERMEDIATE),
        norm="layernorm", norm_eps=r.float("layer_norm_epsilon", 1e-5), position="learned",
        qkv_bias=True, o_bias=True, mlp="gelu", mlp_bias=True,
        activation=_activation(r, "activation_function", "gelu_new"),
        attn_scale=None if scale else 1.0,
        attn_scale_inverse_layer=r.bool("scale_attn_by_inverse_layer_idx", False),
        tie_word_embeddings=r.bool("tie_word_embeddings", True), torch_dtype=_dtype(r),
        tokens=_hf_tokens(r, V), extra={"conv1d": True}))


def _skeleton(r: _Reader, family: str, *, head_dim: int | None = None, eps: float = 1e-6,
              tie: bool = False, theta: float = 10000.0, act_key: str = "hidden_act") -> dict:
    sizes = _sizes(r, head_dim)
    return dict(**sizes, norm_eps=r.float("rms_norm_eps", eps),
                tie_word_embeddings=r.bool("tie_word_embeddings", tie),
                activation=_activation(r, act_key, "silu"), torch_dtype=_dtype(r),
                **_rope(r, sizes["head_dim"], sizes["max_position_embeddings"], theta, family),
                tokens=_hf_tokens(r, sizes["vocab_size"]))


def _all_layers(f: dict, window: int | None) -> dict:
    f["sliding_window"] = window
    f["layer_types"] = ("sliding" if window is not None else "full",) * f["num_layers"]
    return f


def _llama(r: _Reader) -> ModelConfig:
    f = _skeleton(r, "llama")
    return _build(r, "llama", dict(f, **_biases(r), mlp_bias=r.bool("mlp_bias", False)))


def _mistral(r: _Reader) -> ModelConfig:
    f = _skeleton(r, "mistral")
    return _build(r, "mistral", _all_layers(f, _window(r, 4096)))


def _mixtral(r: _Reader) -> ModelConfig:
    f = _all_layers(_skeleton(r, "mixtral", eps=1e-5, theta=1e6),
                    _window(r, None))
    E = r.int(r.first("num_local_experts", "num_experts"), hi=C.MAX_EXPERTS)
    return _build(r, "mixtral", dict(f, mlp="moe", num_experts=E, moe_intermediate_size=f["intermediate_size"],
                                     experts_per_token=r.int("num_experts_per_tok", hi=E),
                                     router_order="softmax_topk", norm_topk_prob=True))


def _qwen_window(r: _Reader, f: dict, use_max_window_layers: bool) -> dict:
    L = f["num_layers"]
    window = _window(r, 4096) if r.bool("use_sliding_window", False) else None
    if window is None:
        return _all_layers(f, None)
    if r.has("layer_types"):
        f["layer_types"] = _layer_types(r, L)
    elif use_max_window_layers:      # the first max_window_layers layers use full attention
        first_sliding = r.int("max_window_layers", default=28, lo=0, hi=2**31)
        f["layer_types"] = tuple("sliding" if i >= first_sliding else "full" for i in range(L))
    else:
        f["layer_types"] = ("sliding",) * L
    f["sliding_window"] = window
    return f


def _qwen2(r: _Reader) -> ModelConfig:
    f = _qwen_window(r, _skeleton(r, "qwen2"), True)
    return _build(r, "qwen2", dict(f, qkv_bias=True, o_bias=False))


def _qwen3(r: _Reader) -> ModelConfig:
    f = _qwen_window(r, _skeleton(r, "qwen3", head_dim=128), True)
    return _build(r, "qwen3", dict(f, **_biases(r), qk_norm=True))


def _qwen3_moe(r: _Reader) -> ModelConfig:
    f = _qwen_window(r, _skeleton(r, "qwen3_moe"), False)
    if r.has("num_experts") and r.has("num_local_experts") and r.d["num_experts"] != r.d["num_local_experts"]:
        raise r.fail("num_experts", "and 'num_local_experts' disagree")
    E = r.int(r.first("num_local_experts", "num_experts"), lo=0, hi=C.MAX_EXPERTS)
    f.update(_biases(r), qk_norm=True)
    if E == 0:
        return _build(r, "qwen3_moe", f)
    L = f["num_layers"]
    step = r.int("decoder_sparse_step", default=1, hi=C.MAX_LAYERS)
    dense = r.raw("mlp_only_layers", [])
    if not isinstance(dense, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in dense):
        raise r.fail("mlp_only_layers", f"must be a list of layer indices, got {str(dense)[:60]}")
    kinds = tuple("moe" if i not in dense and (i + 1) % step == 0 else "dense" for i in range(L))
    return _build(r, "qwen3_moe", dict(
        f, mlp="moe", mlp_layer_types=kinds, num_experts=E,
        experts_per_token=r.int("num_experts_per_tok", hi=E),
        moe_intermediate_size=r.int("moe_intermediate_size", hi=C.MAX_INTERMEDIATE),
        router_order="softmax_topk", norm_topk_prob=r.bool("norm_topk_prob", False)))


def _phi3(r: _Reader) -> ModelConfig:
    f = _all_layers(_skeleton(r, "phi3", eps=1e-5), _window(r, None))
    return _build(r, "phi3", dict(f, extra={"fused_qkv": True, "fused_gate_up": True}))


def _gemma(r: _Reader) -> ModelConfig:
    act_key = "hidden_act" if r.has("hidden_act") else "hidden_activation"
    f = _skeleton(r, "gemma", head_dim=256, tie=True, act_key="__unused__")
    f["activation"] = _activation(r, act_key, "gelu_pytorch_tanh", gemma=True)
    return _build(r, "gemma", dict(f, **_biases(r), norm_offset=1.0,
                                   embedding_scale=math.sqrt(f["hidden_size"])))


def _gpt_oss(r: _Reader) -> ModelConfig:
    f = _skeleton(r, "gpt_oss", head_dim=64, eps=1e-5, theta=150000.0)
    L = f["num_layers"]
    window = _window(r, 128)
    types = _layer_types(r, L) if r.has("layer_types") else tuple(
        "sliding" if i % 2 == 0 else "full" for i in range(L))
    if window is None:                       # HF: a sliding layer without a window attends fully
        types = ("full",) * L
    E = r.int(r.first("num_local_experts", "num_experts"), hi=C.MAX_EXPERTS)
    k = r.int(r.first("num_experts_per_tok", "experts_per_token"), hi=E)
    q = r.raw("quantization_config")
    extra = {"quantization": q.get("quant_method")} if isinstance(q, dict) else {}
    return _build(r, "gpt_oss", dict(
        f, **_biases(r, default=True), sliding_window=window, layer_types=types, attention_sinks=True,
        mlp="moe", mlp_bias=True, num_experts=E, experts_per_token=k, moe_intermediate_size=f["intermediate_size"],
        router_order="topk_softmax", expert_activation="clamped_swiglu",
        swiglu_alpha=r.float("swiglu_alpha", 1.702), swiglu_limit=r.float("swiglu_limit", 7.0),
        extra=extra))


def _gpt_oss_original(r: _Reader) -> ModelConfig:
    """The original gpt-oss config (facts: gpt-oss section 1.2): YaRN alpha -> beta_slow, beta -> beta_fast."""
    unknown = sorted(set(r.d) - ORIGINAL_GPTOSS_KEYS)
    if unknown:
        raise ConfigError(f"{r.source}: unknown keys for an original gpt-oss config: {unknown[:5]}")
    L = r.int("num_hidden_layers", hi=C.MAX_LAYERS)
    E = r.int("num_experts", hi=C.MAX_EXPERTS)
    V = r.int("vocab_size", hi=C.MAX_VOCAB)
    ctx = r.int("initial_context_length", default=4096, hi=C.MAX_POSITIONS)
    factor = r.float("rope_scaling_factor", 32.0)
    max_pos = int(ctx * factor) if ctx * factor <= C.MAX_POSITIONS else C.MAX_POSITIONS + 1
    scaling = {"rope_type": "yarn", "factor": factor, "beta_fast": r.float("rope_ntk_beta", 32.0),
               "beta_slow": r.float("rope_ntk_alpha", 1.0), "original_max_position_embeddings": ctx,
               "truncate": False, "max_position_embeddings": max_pos}
    I = r.int("intermediate_size", hi=C.MAX_INTERMEDIATE)
    return _build(r, "gpt_oss", dict(
        vocab_size=V, hidden_size=r.int("hidden_size", hi=C.MAX_HIDDEN), num_layers=L,
        num_heads=r.int("num_attention_heads", hi=C.MAX_HEADS),
        num_kv_heads=r.int("num_key_value_heads", hi=C.MAX_HEADS),
        head_dim=r.int("head_dim", hi=C.MAX_HEAD_DIM), intermediate_size=I, max_position_embeddings=max_pos,
        norm_eps=1e-5, rope_theta=r.float("rope_theta", 150000.0), rope_scaling=ModelConfig.freeze(scaling),
        qkv_bias=True, o_bias=True, attention_sinks=True,
        sliding_window=r.int("sliding_window", default=128, hi=C.MAX_POSITIONS),
        layer_types=tuple("sliding" if i % 2 == 0 else "full" for i in range(L)),
        mlp="moe", mlp_bias=True, num_experts=E, experts_per_token=r.int("experts_per_token", hi=E),
        moe_intermediate_size=I, router_order="topk_softmax", expert_activation="clamped_swiglu",
        swiglu_limit=r.float("swiglu_limit", 7.0), tie_word_embeddings=False, torch_dtype="bfloat16",
        checkpoint_layout="gptoss_original", tokens=_tokens(V, GPTOSS_BOS, list(GPTOSS_EOS), GPTOSS_PAD)))


FAMILY_ADAPTERS = {"gpt2": _gpt2, "llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3,
                   "mixtral": _mixtral, "qwen3_moe": _qwen3_moe, "gpt_oss": _gpt_oss, "phi3": _phi3,
                   "gemma": _gemma}


# -- entry points ----------------------------------------------------------------------------------
def detect_family(d: dict, source: str) -> str:
    """The family named by ``model_type`` (else the first known ``architectures`` entry)."""
    mt = d.get("model_type")
    if mt is not None:
        if not isinstance(mt, str) or mt not in FAMILY_ADAPTERS:
            raise ConfigError(f"{source}: field 'model_type' = {str(mt)[:60]!r} is not supported "
                              f"(supported: {', '.join(FAMILY_ADAPTERS)})")
        return mt
    arch = d.get("architectures")
    if not isinstance(arch, list) or not arch:
        raise ConfigError(f"{source}: field 'architectures' must be a non-empty list of class names")
    for a in arch:
        if isinstance(a, str) and a in ARCHITECTURES:
            return ARCHITECTURES[a]
    raise ConfigError(f"{source}: field 'architectures' = {str(arch)[:80]} names no supported architecture "
                      f"(supported: {', '.join(ARCHITECTURES)})")


def config_from_dict(d: dict, source: str) -> ModelConfig:
    """A ModelConfig from a parsed config dict; ``source`` names the file in error messages."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: a config must be a JSON object, got {type(d).__name__}")
    r = _Reader(d, source)
    if "model_type" in d or "architectures" in d:
        return FAMILY_ADAPTERS[detect_family(d, source)](r)
    if {"num_experts", "experts_per_token"} <= set(d):
        return _gpt_oss_original(r)
    raise ConfigError(f"{source}: cannot tell the model: no 'model_type' or 'architectures', and not an "
                      f"original gpt-oss config (keys: {sorted(d)[:8]})")


def merge_generation_config(cfg: ModelConfig, g: Any, source: str) -> ModelConfig:
    """Add ``eos_token_id`` ids of a generation config; fill a missing bos/pad id."""
    if not isinstance(g, dict):
        raise ConfigError(f"{source}: must be a JSON object, got {type(g).__name__}")
    lists = {k: _token_list(g.get(k), lambda m, k=k: ConfigError(f"{source}: field {k!r} {m}"))
             for k in ("eos_token_id", "bos_token_id", "pad_token_id")}
    V = cfg.vocab_size
    eos = tuple(dict.fromkeys([*cfg.eos_token_ids, *(t for t in lists["eos_token_id"] if 0 <= t < V)]))
    pick = lambda cur, new: cur if cur is not None else next((t for t in new if 0 <= t < V), None)  # noqa
    return cfg.replace(eos_token_ids=eos, bos_token_id=pick(cfg.bos_token_id, lists["bos_token_id"]),
                       pad_token_id=pick(cfg.pad_token_id, lists["pad_token_id"]))


def load_config(model_dir: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a model directory (HF or original gpt-oss layout; see gptevo/model_files.py)."""
    root = os.fspath(model_dir)
    if not os.path.isdir(root):
        raise ConfigError(f"{root}: not a model directory")
    path = locate(root).config_path
    if path is None:
        raise ConfigError(f"{root}: no config.json (looked in the directory and in original/)")
    cfg = config_from_dict(read_json_file(path, path, ConfigError, MAX_CONFIG_BYTES), path)
    gen = os.path.join(os.path.dirname(path), "generation_config.json")
    if os.path.isfile(gen):
        cfg = merge_generation_config(cfg, read_json_file(gen, gen, ConfigError, MAX_CONFIG_BYTES), gen)
    return cfg
