"""Tensor-name maps: which checkpoint tensors hold which role of the model, per family and layout.

A *layout* maps every role the forward pass needs (``embed``, ``final_norm``, ``lm_head`` and, for each
layer, ``attn_norm``, ``wq``, ``wk``, ``wv``, ``wo``, biases, ``q_norm``, ``sinks``, ``w_gate``,
``experts_gate_up``, ...) to a :class:`Source`: the checkpoint name(s), the shape they must have on disk
(derived from the config, never from the file) and the transform that turns them into the engine's
convention (linear weights ``(out, in)``; experts ``[E, out, in]``).

Layouts are built from the config and the set of tensor names (``build_layout``); nothing is read here.
Where a family has several on-disk forms (``model.`` prefix or not, per-expert or fused MoE tensors,
MXFP4 or dequantized gpt-oss experts, fused or split qkv) each role lists its alternatives in order of
preference and the first whose tensors all exist is used. A role with no alternative present is a
:class:`CheckpointError` naming the preferred tensor.

Sources of the name maps: /spec/formats.md; the facts sheets on HF families (Llama skeleton, GPT-2
Conv1D, Mixtral and Qwen3-MoE per-expert and fused 5.x layouts, Phi-3 fused qkv/gate_up) and on gpt-oss
(§3 MXFP4 tensors, §4 original -> HF name table).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from gptevo.config import ModelConfig
from gptevo.errors import CheckpointError

MXFP4_BLOCK = 32   # values per MXFP4 block (16 bytes) along the input dimension


# -- sources -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tensor:
    """One stored tensor, optionally transposed (last two axes) and then sliced on axis 0.

    ``shape`` is the shape on disk. ``transpose`` turns Conv1D ``(in, out)`` into ``(out, in)`` and HF
    gpt-oss dequantized experts ``[E, in, out]`` into ``[E, out, in]``. ``rows=(a, b)`` keeps rows
    ``a:b`` of axis 0 after the transpose (the q, k, v parts of a fused qkv weight or bias).
    """

    name: str
    shape: tuple[int, ...]
    transpose: bool = False
    rows: tuple[int, int] | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name,)


@dataclass(frozen=True)
class Mxfp4:
    """Packed MXFP4 expert weights: ``blocks [E, out, in/32, 16]`` u8 and ``scales [E, out, in/32]`` u8.

    ``shape`` is the logical (decoded) shape ``(E, out, in)``; the stored shapes follow from it.
    """

    blocks: str
    scales: str
    shape: tuple[int, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return (self.blocks, self.scales)

    @property
    def blocks_shape(self) -> tuple[int, ...]:
        return self.shape[:-1] + (self.shape[-1] // MXFP4_BLOCK, MXFP4_BLOCK // 2)

    @property
    def scales_shape(self) -> tuple[int, ...]:
        return self.shape[:-1] + (self.shape[-1] // MXFP4_BLOCK,)


@dataclass(frozen=True)
class Stacked:
    """Per-expert tensors stacked on a new axis 0; each expert's parts are concatenated on axis 0.

    Mixtral ``w1``/``w3`` -> rows ``[0:I]`` gate and ``[I:2I]`` up of ``experts_gate_up[e]``.
    """

    parts: tuple[tuple[Tensor, ...], ...]   # [expert][part]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for expert in self.parts for t in expert)


Source = Tensor | Mxfp4 | Stacked


@dataclass
class Layout:
    """The resolved map: one Source per role (globals and per layer) plus the layout's name."""

    kind: str                                   # "gpt2", "hf", "gpt_oss_original"
    globals: dict[str, Source]
    layers: list[dict[str, Source]]
    tied: bool = False                          # lm_head read from the embedding table

    def used_names(self) -> set[str]:
        names = {n for src in self.globals.values() for n in src.names}
        for layer in self.layers:
            names.update(n for src in layer.values() for n in src.names)
        return names


# -- choosing among alternatives -----------------------------------------------------------------
def _pick(role: str, where: str, alternatives: Sequence[Source], names: set[str]) -> Source:
    """The first alternative whose tensors all exist, else CheckpointError naming the preferred one."""
    for alt in alternatives:
        if all(n in names for n in alt.names):
            return alt
    first = alternatives[0]
    missing = [n for n in first.names if n not in names]
    others = ""
    if len(alternatives) > 1:
        others = " (nor any alternative form: " + "; ".join(
            ", ".join(alt.names[:2]) + (" ..." if len(alt.names) > 2 else "") for alt in alternatives[1:]) + ")"
    raise CheckpointError(f"checkpoint lacks tensor {missing[0]!r} needed for {role} of {where}{others}")


class _Builder:
    """Collects roles for one layout, resolving alternatives against the checkpoint's names."""

    def __init__(self, names: set[str]):
        self.names = names
        self.globals: dict[str, Source] = {}
        self.layers: list[dict[str, Source]] = []

    def put(self, slot: dict, role: str, where: str, *alternatives: Source) -> None:
        slot[role] = _pick(role, where, alternatives, self.names)

    def has(self, name: str) -> bool:
        return name in self.names


def _moe_intermediate(c: ModelConfig) -> int:
    return c.moe_intermediate_size or c.intermediate_size


def is_moe_layer(c: ModelConfig, i: int) -> bool:
    """True when layer ``i`` uses the MoE MLP (Qwen3-MoE may keep some layers dense)."""
    return c.num_experts > 0 and c.is_moe_layer(i)


# -- HF Llama skeleton (llama, mistral, qwen2/3, mixtral, qwen3_moe, gpt_oss HF, phi3, gemma) -------
def _hf(c: ModelConfig, b: _Builder) -> Layout:
    H, D, nh, nkv, V = c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, c.vocab_size
    q_out, kv_out = nh * D, nkv * D
    p = "model." if b.has("model.embed_tokens.weight") or not b.has("embed_tokens.weight") else ""
    g = b.globals
    b.put(g, "embed", "the model", Tensor(f"{p}embed_tokens.weight", (V, H)))
    b.put(g, "final_norm", "the model", Tensor(f"{p}norm.weight", (H,)))
    if c.norm == "layernorm":
        b.put(g, "final_norm_bias", "the model", Tensor(f"{p}norm.bias", (H,)))
    gpt_oss = c.family == "gpt_oss"
    for i in range(c.num_layers):
        L, a, m, where = {}, f"{p}layers.{i}.self_attn.", f"{p}layers.{i}.mlp.", f"layer {i}"
        b.put(L, "attn_norm", where, Tensor(f"{p}layers.{i}.input_layernorm.weight", (H,)))
        b.put(L, "mlp_norm", where, Tensor(f"{p}layers.{i}.post_attention_layernorm.weight", (H,)))
        if c.norm == "layernorm":
            b.put(L, "attn_norm_bias", where, Tensor(f"{p}layers.{i}.input_layernorm.bias", (H,)))
            b.put(L, "mlp_norm_bias", where, Tensor(f"{p}layers.{i}.post_attention_layernorm.bias", (H,)))
        # attention: separate q/k/v, or Phi-3's fused qkv_proj (rows [q | k | v])
        fused = f"{a}qkv_proj.weight"
        qkv_rows = {"q": (0, q_out), "k": (q_out, q_out + kv_out), "v": (q_out + kv_out, q_out + 2 * kv_out)}
        for r, out in (("q", q_out), ("k", kv_out), ("v", kv_out)):
            b.put(L, f"w{r}", where, Tensor(f"{a}{r}_proj.weight", (out, H)),
                  Tensor(fused, (q_out + 2 * kv_out, H), rows=qkv_rows[r]))
            if c.qkv_bias:
                b.put(L, f"b{r}", where, Tensor(f"{a}{r}_proj.bias", (out,)),
                      Tensor(f"{a}qkv_proj.bias", (q_out + 2 * kv_out,), rows=qkv_rows[r]))
        b.put(L, "wo", where, Tensor(f"{a}o_proj.weight", (H, q_out)))
        if c.o_bias:
            b.put(L, "bo", where, Tensor(f"{a}o_proj.bias", (H,)))
        if c.qk_norm:
            b.put(L, "q_norm", where, Tensor(f"{a}q_norm.weight", (D,)))
            b.put(L, "k_norm", where, Tensor(f"{a}k_norm.weight", (D,)))
        if c.attention_sinks:
            b.put(L, "sinks", where, Tensor(f"{a}sinks", (nh,)))
        if is_moe_layer(c, i):
            _hf_moe(c, b, L, i, p, gpt_oss)
        else:
            _hf_dense(c, b, L, m, where)
        b.layers.append(L)
    return _finish(c, b, "hf", lm_head="lm_head.weight")


def _hf_dense(c: ModelConfig, b: _Builder, L: dict, m: str, where: str) -> None:
    H, I = c.hidden_size, c.intermediate_size
    fused = f"{m}gate_up_proj.weight"   # Phi-3: rows [gate | up]
    b.put(L, "w_gate", where, Tensor(f"{m}gate_proj.weight", (I, H)), Tensor(fused, (2 * I, H), rows=(0, I)))
    b.put(L, "w_up", where, Tensor(f"{m}up_proj.weight", (I, H)), Tensor(fused, (2 * I, H), rows=(I, 2 * I)))
    b.put(L, "w_down", where, Tensor(f"{m}down_proj.weight", (H, I)))
    if c.mlp_bias:
        b.put(L, "b_gate", where, Tensor(f"{m}gate_proj.bias", (I,)))
        b.put(L, "b_up", where, Tensor(f"{m}up_proj.bias", (I,)))
        b.put(L, "b_down", where, Tensor(f"{m}down_proj.bias", (H,)))


def _hf_moe(c: ModelConfig, b: _Builder, L: dict, i: int, p: str, gpt_oss: bool) -> None:
    H, E, I = c.hidden_size, c.num_experts, _moe_intermediate(c)
    m, sm, where = f"{p}layers.{i}.mlp.", f"{p}layers.{i}.block_sparse_moe.", f"layer {i}"
    x = f"{m}experts."
    b.put(L, "router", where, Tensor(f"{m}router.weight", (E, H)), Tensor(f"{m}gate.weight", (E, H)),
          Tensor(f"{sm}gate.weight", (E, H)))
    if gpt_oss:
        # gpt-oss HF: MXFP4 [E, out, in] as in the original, or dequantized [E, in, out] (transposed here)
        b.put(L, "router_bias", where, Tensor(f"{m}router.bias", (E,)))
        b.put(L, "experts_gate_up", where,
              Mxfp4(f"{x}gate_up_proj_blocks", f"{x}gate_up_proj_scales", (E, 2 * I, H)),
              Tensor(f"{x}gate_up_proj", (E, H, 2 * I), transpose=True))
        b.put(L, "experts_down", where,
              Mxfp4(f"{x}down_proj_blocks", f"{x}down_proj_scales", (E, H, I)),
              Tensor(f"{x}down_proj", (E, I, H), transpose=True))
        b.put(L, "experts_gate_up_bias", where, Tensor(f"{x}gate_up_proj_bias", (E, 2 * I)))
        b.put(L, "experts_down_bias", where, Tensor(f"{x}down_proj_bias", (E, H)))
        return
    # Mixtral / Qwen3-MoE: fused 5.x tensors, or per-expert tensors stacked here
    mix = Stacked(tuple((Tensor(f"{sm}experts.{e}.w1.weight", (I, H)), Tensor(f"{sm}experts.{e}.w3.weight", (I, H)))
                        for e in range(E)))
    qwen = Stacked(tuple((Tensor(f"{x}{e}.gate_proj.weight", (I, H)), Tensor(f"{x}{e}.up_proj.weight", (I, H)))
                         for e in range(E)))
    b.put(L, "experts_gate_up", where, Tensor(f"{x}gate_up_proj", (E, 2 * I, H)), qwen, mix)
    mix_d = Stacked(tuple((Tensor(f"{sm}experts.{e}.w2.weight", (H, I)),) for e in range(E)))
    qwen_d = Stacked(tuple((Tensor(f"{x}{e}.down_proj.weight", (H, I)),) for e in range(E)))
    b.put(L, "experts_down", where, Tensor(f"{x}down_proj", (E, H, I)), qwen_d, mix_d)


# -- GPT-2 ---------------------------------------------------------------------------------------
def _gpt2(c: ModelConfig, b: _Builder) -> Layout:
    """GPT-2: Conv1D weights stored (in, out) are transposed; c_attn is split into q, k, v."""
    H, V, I = c.hidden_size, c.vocab_size, c.intermediate_size
    p = "transformer." if b.has("transformer.wte.weight") or not b.has("wte.weight") else ""
    g = b.globals
    b.put(g, "embed", "the model", Tensor(f"{p}wte.weight", (V, H)))
    if c.position == "learned":
        b.put(g, "pos_embed", "the model", Tensor(f"{p}wpe.weight", (c.max_position_embeddings, H)))
    b.put(g, "final_norm", "the model", Tensor(f"{p}ln_f.weight", (H,)))
    b.put(g, "final_norm_bias", "the model", Tensor(f"{p}ln_f.bias", (H,)))
    qd, kvd = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    width = qd + 2 * kvd
    rows = {"q": (0, qd), "k": (qd, qd + kvd), "v": (qd + kvd, width)}
    for i in range(c.num_layers):
        L, h, where = {}, f"{p}h.{i}.", f"layer {i}"
        b.put(L, "attn_norm", where, Tensor(f"{h}ln_1.weight", (H,)))
        b.put(L, "attn_norm_bias", where, Tensor(f"{h}ln_1.bias", (H,)))
        for r in "qkv":
            b.put(L, f"w{r}", where, Tensor(f"{h}attn.c_attn.weight", (H, width), transpose=True, rows=rows[r]))
            b.put(L, f"b{r}", where, Tensor(f"{h}attn.c_attn.bias", (width,), rows=rows[r]))
        b.put(L, "wo", where, Tensor(f"{h}attn.c_proj.weight", (qd, H), transpose=True))
        b.put(L, "bo", where, Tensor(f"{h}attn.c_proj.bias", (H,)))
        b.put(L, "mlp_norm", where, Tensor(f"{h}ln_2.weight", (H,)))
        b.put(L, "mlp_norm_bias", where, Tensor(f"{h}ln_2.bias", (H,)))
        b.put(L, "w_fc", where, Tensor(f"{h}mlp.c_fc.weight", (H, I), transpose=True))
        b.put(L, "b_fc", where, Tensor(f"{h}mlp.c_fc.bias", (I,)))
        b.put(L, "w_proj", where, Tensor(f"{h}mlp.c_proj.weight", (I, H), transpose=True))
        b.put(L, "b_proj", where, Tensor(f"{h}mlp.c_proj.bias", (H,)))
        b.layers.append(L)
    return _finish(c, b, "gpt2", lm_head="lm_head.weight")


# -- gpt-oss original layout (original/model.safetensors) ----------------------------------------
def _gpt_oss_original(c: ModelConfig, b: _Builder) -> Layout:
    """gpt-oss as released in ``original/``: fused qkv, ``mlp1``/``mlp2`` experts [E, out, in]."""
    H, V, D, E, I = c.hidden_size, c.vocab_size, c.head_dim, c.num_experts, _moe_intermediate(c)
    qd, kvd = c.num_heads * D, c.num_kv_heads * D
    width = qd + 2 * kvd
    rows = {"q": (0, qd), "k": (qd, qd + kvd), "v": (qd + kvd, width)}
    g = b.globals
    b.put(g, "embed", "the model", Tensor("embedding.weight", (V, H)))
    b.put(g, "final_norm", "the model", Tensor("norm.scale", (H,)))
    for i in range(c.num_layers):
        L, a, m, where = {}, f"block.{i}.attn.", f"block.{i}.mlp.", f"layer {i}"
        b.put(L, "attn_norm", where, Tensor(f"{a}norm.scale", (H,)))
        for r in "qkv":
            b.put(L, f"w{r}", where, Tensor(f"{a}qkv.weight", (width, H), rows=rows[r]))
            b.put(L, f"b{r}", where, Tensor(f"{a}qkv.bias", (width,), rows=rows[r]))
        b.put(L, "sinks", where, Tensor(f"{a}sinks", (c.num_heads,)))
        b.put(L, "wo", where, Tensor(f"{a}out.weight", (H, qd)))
        b.put(L, "bo", where, Tensor(f"{a}out.bias", (H,)))
        b.put(L, "mlp_norm", where, Tensor(f"{m}norm.scale", (H,)))
        b.put(L, "router", where, Tensor(f"{m}gate.weight", (E, H)))
        b.put(L, "router_bias", where, Tensor(f"{m}gate.bias", (E,)))
        b.put(L, "experts_gate_up", where,
              Mxfp4(f"{m}mlp1_weight.blocks", f"{m}mlp1_weight.scales", (E, 2 * I, H)),
              Tensor(f"{m}mlp1_weight", (E, 2 * I, H)))
        b.put(L, "experts_gate_up_bias", where, Tensor(f"{m}mlp1_bias", (E, 2 * I)))
        b.put(L, "experts_down", where,
              Mxfp4(f"{m}mlp2_weight.blocks", f"{m}mlp2_weight.scales", (E, H, I)),
              Tensor(f"{m}mlp2_weight", (E, H, I)))
        b.put(L, "experts_down_bias", where, Tensor(f"{m}mlp2_bias", (E, H)))
        b.layers.append(L)
    return _finish(c, b, "gpt_oss_original", lm_head="unembedding.weight")


def _finish(c: ModelConfig, b: _Builder, kind: str, lm_head: str) -> Layout:
    """Resolve the output head: lm_head if stored, else the embedding if tied, else an error."""
    embed = b.globals["embed"]
    tied = False
    if b.has(lm_head):
        b.globals["lm_head"] = Tensor(lm_head, (c.vocab_size, c.hidden_size))
    elif c.tie_word_embeddings:
        b.globals["lm_head"] = embed
        tied = True
    else:
        raise CheckpointError(f"checkpoint lacks tensor {lm_head!r} (the output head) and the config does not "
                              f"tie it to the embedding (tie_word_embeddings is false)")
    return Layout(kind=kind, globals=b.globals, layers=b.layers, tied=tied)


def detect_kind(config: ModelConfig, names: Iterable[str]) -> str:
    """Which layout the names follow: "gpt2", "gpt_oss_original" or "hf"."""
    names = set(names)
    if config.family == "gpt2":
        return "gpt2"
    if getattr(config, "checkpoint_layout", "hf") == "gptoss_original":
        return "gpt_oss_original"
    if config.family == "gpt_oss" and ("embedding.weight" in names or "block.0.attn.qkv.weight" in names):
        return "gpt_oss_original"
    return "hf"


def build_layout(config: ModelConfig, names: Iterable[str]) -> Layout:
    """The layout of a checkpoint with tensor ``names`` for ``config`` (no tensor data is read)."""
    names = set(names)
    kind = detect_kind(config, names)
    builder = _Builder(names)
    return {"gpt2": _gpt2, "gpt_oss_original": _gpt_oss_original, "hf": _hf}[kind](config, builder)


def role_summary(layout: Layout) -> Mapping[str, str]:
    """Readable ``role -> tensor name(s)`` for layer 0 and the globals (for docs and debugging)."""
    out = {k: ", ".join(v.names[:2]) for k, v in layout.globals.items()}
    if layout.layers:
        out.update({f"layer0.{k}": ", ".join(v.names[:2]) for k, v in layout.layers[0].items()})
    return out
