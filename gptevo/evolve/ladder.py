"""The ladder: GPT-2 to gpt-oss, one architectural change per step, as ModelConfig diffs.

``ladder(scale)`` returns the steps in the seed's order (its "Core Architectural Innovations" 1 to 7,
then "Advanced Features: Sliding Window Attention" and "MXFP4 Quantization Innovation"), plus two side
branches that are not on the main line. Each :class:`Step` holds the fields it changes (``diff``) and
the full config it produces (``config`` = the parent's config with ``diff`` applied). The exact
definition, with every value at every scale, is ``spec/evolution.md``.

Scales fix the sizes that no step changes (vocabulary, width, depth, heads, head dim) and the values
the steps introduce (KV heads for GQA, the window, expert count/width). At ``20b`` the last step is the
real gpt-oss-20b config and at ``gpt2`` the first step is the real GPT-2 small (124M) architecture.

Two fields carry what ModelConfig has no flag for, in ``extra`` (ignored by ``==``):
``dropout`` (the training-time dropout rate; at inference dropout is the identity) and
``quantization`` ("mxfp4": expert matrices stored as MXFP4, as the gpt-oss config adapter records it).
Tokens (bos/eos/pad) are not part of the ladder.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from gptevo.config import ModelConfig
from gptevo.errors import RequestError


@dataclass(frozen=True)
class Scale:
    """Sizes of one scale. ``context`` is GPT-2's learned-position context and YaRN's original one."""

    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    kv_heads: int            # after the GQA step
    context: int             # GPT-2 positions; YaRN original_max_position_embeddings
    window: int              # sliding window W (keys including the query)
    num_experts: int
    experts_per_token: int
    expert_width: int        # moe_intermediate_size
    yarn_factor: float = 32.0
    about: str = ""

    @property
    def gelu_width(self) -> int:
        """GPT-2's MLP width, 4·D."""
        return 4 * self.hidden_size

    @property
    def swiglu_width(self) -> int:
        """The dense SwiGLU width: 2/3 of 4·D rounded to a multiple of 16, so that the gated MLP's
        3·D·I parameters match GELU's 2·4D·D (the seed's r = 2.66, "total params ≈ GELU MLP")."""
        return 16 * round(2 * self.gelu_width / 3 / 16)


SCALES: dict[str, Scale] = {
    "tiny": Scale("tiny", vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, head_dim=8,
                  kv_heads=2, context=64, window=8, num_experts=4, experts_per_token=2, expert_width=32,
                  about="test size: every step runs a forward on the reference in milliseconds"),
    "small": Scale("small", vocab_size=4096, hidden_size=128, num_layers=4, num_heads=8, head_dim=16,
                   kv_heads=2, context=1024, window=32, num_experts=8, experts_per_token=2,
                   expert_width=128,
                   about="the quality-training scale (tools/evolve_train.py); vocabulary of the bundled "
                         "Austen tokenizer; the seed's 8 experts, top-2"),
    "gpt2": Scale("gpt2", vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12, head_dim=64,
                  kv_heads=3, context=1024, window=128, num_experts=8, experts_per_token=2,
                  expert_width=768, about="GPT-2 small (124M) sizes; the first step is the real GPT-2 small"),
    "20b": Scale("20b", vocab_size=201088, hidden_size=2880, num_layers=24, num_heads=64, head_dim=64,
                 kv_heads=8, context=4096, window=128, num_experts=32, experts_per_token=4,
                 expert_width=2880, about="gpt-oss-20b sizes; the last step is the real gpt-oss-20b"),
}
DEFAULT_SCALE = "small"


@dataclass(frozen=True)
class Step:
    """One rung. ``parent`` is the step it changes (None for the baseline); ``branch`` is True for a
    side branch (not on the main line). ``section`` is the seed heading the step comes from (None when
    the seed does not describe it); ``errata`` the spec/errata.md entries that bear on it."""

    id: str
    title: str
    change: str
    section: str | None
    parent: str | None
    diff: dict[str, Any]
    config: ModelConfig
    branch: bool = False
    errata: tuple[str, ...] = ()
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dropout(self) -> float:
        return float(dict(self.config.extra).get("dropout", 0.0))

    @property
    def expert_storage(self) -> str:
        """"mxfp4" when the expert matrices are stored as MXFP4, else "bfloat16"."""
        return "mxfp4" if dict(self.config.extra).get("quantization") == "mxfp4" else "bfloat16"

    @property
    def trained_like(self) -> str:
        """The step whose trained models stand for this one in the quality data: a step with an
        empty architectural diff (``pre_norm``) trains exactly like its parent; ``mxfp4`` is its
        parent's trained models with the experts quantized after training
        (``extra["quantized_after_training"]``)."""
        return self.extra.get("trained_like", self.id)


def get_scale(name: str) -> Scale:
    if name not in SCALES:
        raise RequestError(f"--scale must be one of {', '.join(SCALES)}, got {name!r}")
    return SCALES[name]


def baseline(s: Scale) -> ModelConfig:
    """GPT-2 at scale ``s``: pre-norm LayerNorm blocks with a final LayerNorm (erratum E1), learned
    positions, multi-head attention, GELU (tanh) MLP of 4·D, biases everywhere, tied head, dropout 0.1."""
    return ModelConfig(
        family="gpt2", vocab_size=s.vocab_size, hidden_size=s.hidden_size, num_layers=s.num_layers,
        num_heads=s.num_heads, num_kv_heads=s.num_heads, head_dim=s.head_dim,
        intermediate_size=s.gelu_width, max_position_embeddings=s.context,
        norm="layernorm", norm_eps=1e-5, block_order="pre", position="learned",
        qkv_bias=True, o_bias=True, mlp="gelu", activation="gelu_tanh", mlp_bias=True,
        tie_word_embeddings=True, torch_dtype="bfloat16", extra=(("dropout", 0.1),))


def _extra(cfg: ModelConfig, **changes) -> tuple:
    d = dict(cfg.extra)
    d.update(changes)
    return ModelConfig.freeze(d)


def _yarn(s: Scale) -> tuple:
    return ModelConfig.freeze({"rope_type": "yarn", "factor": s.yarn_factor, "beta_fast": 32.0,
                               "beta_slow": 1.0, "original_max_position_embeddings": s.context,
                               "max_position_embeddings": int(s.context * s.yarn_factor), "truncate": False})


def _main_line(s: Scale):
    """(id, title, change, section, diff-maker, errata, note, extra) of the main line after the baseline."""
    L = s.num_layers
    return [
        ("no_dropout", "Dropout removed", "dropout 0.1 -> 0 (training only: inference never runs it)",
         "1. Dropout Elimination", lambda c: {"extra": _extra(c, dropout=0.0)}, (), "", {}),
        ("pre_norm", "Pre-LayerNorm", "no change: GPT-2 is already pre-norm with a final LayerNorm",
         "2. Pre-LayerNorm Architecture", lambda c: {}, ("E1",),
         "The seed draws GPT-2 as post-norm; real GPT-2 computes x + attn(ln_1(x)) (erratum E1). "
         "The seed's post-norm GPT-2 is the side branch 'post_norm'.", {"trained_like": "no_dropout"}),
        ("rope", "Rotary positions (RoPE)", "learned position table -> RoPE (theta 10000, half-split pairs)",
         "3. Rotary Position Embeddings (RoPE)", lambda c: {"position": "rope", "rope_theta": 10000.0},
         ("E5",), "", {}),
        ("swiglu", "SwiGLU MLP", f"GELU MLP of 4D = {s.gelu_width} -> SwiGLU of {s.swiglu_width} (2/3 of 4D)",
         "4. SwiGLU Activation Function",
         lambda c: {"mlp": "swiglu", "activation": "silu", "intermediate_size": s.swiglu_width},
         ("E20",), "", {}),
        ("rmsnorm", "RMSNorm", "LayerNorm -> RMSNorm (no mean, no bias)", "5. RMSNorm vs LayerNorm",
         lambda c: {"norm": "rmsnorm"}, (), "", {}),
        ("gqa", "Grouped-query attention", f"{s.num_heads} KV heads -> {s.kv_heads} "
         f"({s.num_heads // s.kv_heads} query heads per KV head)", "6. Grouped-Query Attention (GQA)",
         lambda c: {"num_kv_heads": s.kv_heads}, ("E7", "E16"), "", {}),
        ("moe", "Mixture of experts", f"dense SwiGLU -> {s.num_experts} SwiGLU experts of width "
         f"{s.expert_width}, top-{s.experts_per_token} (softmax, top-k, renormalise: the seed's router)",
         "7. Mixture of Experts (MoE)",
         lambda c: {"mlp": "moe", "num_experts": s.num_experts, "experts_per_token": s.experts_per_token,
                    "moe_intermediate_size": s.expert_width, "intermediate_size": s.expert_width,
                    "router_order": "softmax_topk", "norm_topk_prob": True, "expert_activation": "swiglu"},
         ("E8",), "", {}),
        ("sliding_window", "Sliding window + sinks", f"even layers attend to the last W = {s.window} keys; "
         "one learned sink logit per query head",
         "Advanced Features: Sliding Window Attention",
         lambda c: {"sliding_window": s.window, "attention_sinks": True,
                    "layer_types": tuple("sliding" if i % 2 == 0 else "full" for i in range(L))},
         ("E9", "E10"), "Sinks are not in the seed (erratum E10); gpt-oss has them on every layer.", {}),
        ("gpt_oss", "gpt-oss details", "router top-k then softmax; clamped SwiGLU (interleaved, alpha "
         "1.702, limit 7); untied output head; YaRN RoPE (theta 150000, factor 32)",
         None,
         lambda c: {"family": "gpt_oss", "router_order": "topk_softmax", "expert_activation": "clamped_swiglu",
                    "swiglu_alpha": 1.702, "swiglu_limit": 7.0, "tie_word_embeddings": False,
                    "rope_theta": 150000.0, "rope_scaling": _yarn(s),
                    "max_position_embeddings": int(s.context * s.yarn_factor)},
         ("E6", "E11", "E12", "E13"),
         "What the seed omits or states wrongly about gpt-oss, in one step.", {}),
        ("mxfp4", "MXFP4 experts", "expert matrices stored as MXFP4 (4.25 bits per value); the rest bf16",
         "GPT-oss Architecture Analysis: MXFP4 Quantization Innovation",
         lambda c: {"extra": _extra(c, quantization="mxfp4")}, ("E14",), "",
         {"trained_like": "gpt_oss", "quantized_after_training": True}),
    ]


def _branches(s: Scale):
    return [
        ("post_norm", "Post-norm (seed's GPT-2)", "pre-norm -> post-norm: x = LN(x + f(x))",
         "2. Pre-LayerNorm Architecture", "pre_norm", lambda c: {"block_order": "post"}, ("E1",),
         "The GPT-2 block as the seed draws it; tests the seed's pre-norm claims against it."),
        ("qk_norm", "QK-norm (Qwen3)", "RMSNorm over each head of q and k before RoPE",
         None, "gqa", lambda c: {"qk_norm": True}, ("E18",),
         "Qwen3's change, not in the seed (erratum E18); a side branch off the GQA step."),
    ]


def ladder(scale: str | Scale = DEFAULT_SCALE) -> list[Step]:
    """All steps at ``scale``: the main line in order, then the side branches."""
    s = scale if isinstance(scale, Scale) else get_scale(scale)
    cfg = baseline(s)
    steps = [Step("gpt2", "GPT-2", "baseline", "Foundations: GPT-2 Baseline Architecture", None, {}, cfg,
                  errata=("E1", "E2", "E3"),
                  note="Real GPT-2: pre-norm, GELU tanh approximation, Conv1D weights with biases, tied head.")]
    for sid, title, change, section, make, errata, note, extra in _main_line(s):
        new = cfg.replace(**make(cfg))
        steps.append(Step(sid, title, change, section, steps[-1].id, config_diff(cfg, new), new,
                          errata=errata, note=note, extra=extra))
        cfg = new
    by_id = {st.id: st for st in steps}
    for sid, title, change, section, parent, make, errata, note in _branches(s):
        base = by_id[parent].config
        new = base.replace(**make(base))
        steps.append(Step(sid, title, change, section, parent, config_diff(base, new), new, branch=True,
                          errata=errata, note=note))
    return steps


def step_by_id(steps: list[Step], sid: str) -> Step:
    for st in steps:
        if st.id == sid:
            return st
    raise RequestError(f"no ladder step {sid!r}; steps are {', '.join(s.id for s in steps)}")


def config_diff(old: ModelConfig, new: ModelConfig) -> dict[str, Any]:
    """The fields whose values differ from ``old`` to ``new``, in field order; keys of ``extra``
    appear as ``extra.<key>``."""
    diff: dict[str, Any] = {}
    for f in fields(ModelConfig):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if f.name == "extra":
            da, db = dict(a), dict(b)
            for k in sorted(set(da) | set(db)):
                if da.get(k) != db.get(k):
                    diff[f"extra.{k}"] = db.get(k)
        elif a != b:
            diff[f.name] = b
    return diff


def describe_diff(diff: dict[str, Any]) -> str:
    """``field=value`` pairs of a diff in words."""
    parts = []
    for k, v in diff.items():
        if k == "layer_types":
            parts.append(f"layer_types=({v[0]}, {v[1]}, ...)" if len(v) > 2 else f"layer_types={v}")
        elif k == "rope_scaling":
            parts.append("rope_scaling=" + ", ".join(f"{a}:{b}" for a, b in v))
        else:
            parts.append(f"{k}={v!r}")
    return "; ".join(parts) if parts else "(none)"
