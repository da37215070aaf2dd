"""Tiny random checkpoints for tests and tools: configs, random weights by role, the on-disk layouts.

Helpers only (no tests). ``tests/unit/test_model_tiny.py`` checks the forward pass on these models
against its own float64 re-derivation; ``tests/conformance/test_model_backends.py`` and
``tests/unit/test_device_transfers.py`` run the same models on the other backends; ``tools/bench.py``
and ``tools/gpu_tiny.py`` reuse them. Tests get them through the ``tiny_models`` fixture of
``tests/conftest.py`` or ``from _builders import tiny_models`` (``tests/`` is on pytest's ``pythonpath``).

Weights are float64 by role (``make_roles``), rounded to the storage dtype (``store_dtype``) so a
re-derivation sees exactly the stored values; ``hf_tensors`` / ``gpt2_tensors`` /
``gptoss_original_tensors`` name them as each layout does; ``write`` saves them with safetensors.
"""
from __future__ import annotations

import os

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from gptevo.checkpoint import Checkpoint
from gptevo.config import ModelConfig
from gptevo.model import Model
from gptevo.ops.mxfp4 import mxfp4_encode

IDS = [3, 17, 42, 5, 9, 60, 1, 33, 8, 12, 50, 2]   # T = 12 > every window used here

# -- configs -------------------------------------------------------------------------------------
LLAMA = ModelConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, intermediate_size=48, max_position_embeddings=64,
                    rope_theta=10000.0, sliding_window=4, layer_types=("sliding", "full"))
QWEN3 = ModelConfig(family="qwen3", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                    num_kv_heads=1, head_dim=16, intermediate_size=40, max_position_embeddings=64,
                    rope_theta=1e6, norm_eps=1e-6, qk_norm=True, qkv_bias=True, tie_word_embeddings=True)
GPTOSS = ModelConfig(family="gpt_oss", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, intermediate_size=32, max_position_embeddings=64,
                     rope_theta=150000.0, sliding_window=3, layer_types=("sliding", "full"),
                     attention_sinks=True, qkv_bias=True, o_bias=True, mlp="moe", num_experts=4,
                     experts_per_token=2, moe_intermediate_size=32, router_order="topk_softmax",
                     expert_activation="clamped_swiglu", swiglu_limit=1.5)
GPT2 = ModelConfig(family="gpt2", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4,
                   head_dim=8, intermediate_size=128, max_position_embeddings=32, norm="layernorm",
                   position="learned", mlp="gelu", activation="gelu_tanh", qkv_bias=True, o_bias=True,
                   mlp_bias=True, tie_word_embeddings=True)
MIXTRAL = ModelConfig(family="mixtral", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, intermediate_size=24, max_position_embeddings=64,
                      mlp="moe", num_experts=4, experts_per_token=2, moe_intermediate_size=24,
                      router_order="softmax_topk",
                      norm_topk_prob=True)


# -- random weights by role ----------------------------------------------------------------------
def make_roles(c: ModelConfig, seed: int) -> dict:
    """Random float64 weights by role: {"embed", "final_norm", "lm_head", "layers": [{role: array}]}."""
    rng = np.random.default_rng(seed)
    H, D, nh, G, V = c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, c.vocab_size

    def w(*shape, s=0.3):
        return rng.standard_normal(shape) * s

    roles = {"embed": w(V, H, s=1.0), "final_norm": 1 + w(H, s=0.1), "lm_head": w(V, H, s=0.2), "layers": []}
    if c.norm == "layernorm":
        roles["final_norm_bias"] = w(H, s=0.1)
    if c.position == "learned":
        roles["pos_embed"] = w(c.max_position_embeddings, H, s=0.5)
    for _ in range(c.num_layers):
        L = {"attn_norm": 1 + w(H, s=0.1), "mlp_norm": 1 + w(H, s=0.1), "wq": w(nh * D, H), "wk": w(G * D, H),
             "wv": w(G * D, H), "wo": w(H, nh * D)}
        if c.norm == "layernorm":
            L["attn_norm_bias"], L["mlp_norm_bias"] = w(H, s=0.1), w(H, s=0.1)
        if c.qkv_bias:
            L["bq"], L["bk"], L["bv"] = w(nh * D, s=0.1), w(G * D, s=0.1), w(G * D, s=0.1)
        if c.o_bias:
            L["bo"] = w(H, s=0.1)
        if c.qk_norm:
            L["q_norm"], L["k_norm"] = 1 + w(D, s=0.1), 1 + w(D, s=0.1)
        if c.attention_sinks:
            L["sinks"] = w(nh, s=1.0)
        if c.num_experts:
            E, I = c.num_experts, c.moe_intermediate_size or c.intermediate_size
            L["router"] = w(E, H, s=1.0)
            L["experts_gate_up"], L["experts_down"] = w(E, 2 * I, H, s=0.5), w(E, H, I)
            if c.family == "gpt_oss":
                L["router_bias"] = w(E, s=0.5)
                L["experts_gate_up_bias"], L["experts_down_bias"] = w(E, 2 * I, s=0.1), w(E, H, s=0.1)
        elif c.mlp == "gelu":
            I = c.intermediate_size
            L.update(w_fc=w(I, H), b_fc=w(I, s=0.1), w_proj=w(H, I), b_proj=w(H, s=0.1))
        else:
            I = c.intermediate_size
            L.update(w_gate=w(I, H), w_up=w(I, H), w_down=w(H, I))
        roles["layers"].append(L)
    if c.tie_word_embeddings:
        roles["lm_head"] = roles["embed"]
    return roles


def _round(a, dtype):
    """What storing ``a`` in ``dtype`` and widening back gives, in float64."""
    return np.asarray(a).astype(dtype).astype(np.float64)


def store_dtype(roles: dict, dtype) -> dict:
    """Round every weight to the storage dtype (the reference then sees exactly the stored values)."""
    out = {k: _round(v, dtype) for k, v in roles.items() if k != "layers"}
    out["layers"] = [{k: _round(v, dtype) for k, v in L.items()} for L in roles["layers"]]
    if roles["lm_head"] is roles["embed"]:
        out["lm_head"] = out["embed"]
    return out


# -- MXFP4 (independent decoder from the FP4 E2M1 table) -------------------------------------------
FP4 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])


def decode_mxfp4(blocks, scales):
    vals = np.empty(blocks.shape[:-1] + (32,))
    vals[..., 0::2] = FP4[blocks & 0x0F]                 # low nibble = even element
    vals[..., 1::2] = FP4[blocks >> 4]
    vals = vals * 2.0 ** (scales.astype(np.int64) - 127)[..., None]
    return vals.reshape(blocks.shape[:-2] + (-1,))


def quantize_experts(roles: dict) -> dict:
    """Replace expert weights by their MXFP4 encodings; keep the decoded values for the reference."""
    for L in roles["layers"]:
        for role in ("experts_gate_up", "experts_down"):
            blocks, scales = mxfp4_encode(L[role].astype(np.float32))
            L[role + "_mxfp4"] = (blocks, scales)
            L[role] = decode_mxfp4(blocks, scales)
    return roles


# -- writing checkpoints ----------------------------------------------------------------------------
def hf_tensors(c: ModelConfig, roles: dict, *, phi3_fused=False, per_expert=None, gptoss_dequant=False) -> dict:
    """Tensor name -> float64 array in the HF layout (Llama skeleton)."""
    t = {"model.embed_tokens.weight": roles["embed"], "model.norm.weight": roles["final_norm"]}
    if not c.tie_word_embeddings:
        t["lm_head.weight"] = roles["lm_head"]
    for i, L in enumerate(roles["layers"]):
        p, a, m = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        t[p + "input_layernorm.weight"], t[p + "post_attention_layernorm.weight"] = L["attn_norm"], L["mlp_norm"]
        if phi3_fused:
            t[a + "qkv_proj.weight"] = np.concatenate([L["wq"], L["wk"], L["wv"]])
        else:
            t[a + "q_proj.weight"], t[a + "k_proj.weight"], t[a + "v_proj.weight"] = L["wq"], L["wk"], L["wv"]
        t[a + "o_proj.weight"] = L["wo"]
        for r in ("q", "k", "v", "o"):
            if "b" + r in L:
                t[f"{a}{r}_proj.bias"] = L["b" + r]
        if "q_norm" in L:
            t[a + "q_norm.weight"], t[a + "k_norm.weight"] = L["q_norm"], L["k_norm"]
        if "sinks" in L:
            t[a + "sinks"] = L["sinks"]
        if "router" in L and c.family == "gpt_oss":
            t[m + "router.weight"], t[m + "router.bias"] = L["router"], L["router_bias"]
            x = m + "experts."
            if gptoss_dequant:   # HF dequantized: [E, in, out]
                t[x + "gate_up_proj"] = L["experts_gate_up"].transpose(0, 2, 1)
                t[x + "down_proj"] = L["experts_down"].transpose(0, 2, 1)
            else:
                (gb, gs), (db, ds) = L["experts_gate_up_mxfp4"], L["experts_down_mxfp4"]
                t[x + "gate_up_proj_blocks"], t[x + "gate_up_proj_scales"] = gb, gs
                t[x + "down_proj_blocks"], t[x + "down_proj_scales"] = db, ds
            t[x + "gate_up_proj_bias"], t[x + "down_proj_bias"] = L["experts_gate_up_bias"], L["experts_down_bias"]
        elif "router" in L:
            I = L["experts_down"].shape[2]
            if per_expert == "mixtral":
                s = f"model.layers.{i}.block_sparse_moe."
                t[s + "gate.weight"] = L["router"]
                for e in range(L["router"].shape[0]):
                    t[f"{s}experts.{e}.w1.weight"] = L["experts_gate_up"][e, :I]
                    t[f"{s}experts.{e}.w3.weight"] = L["experts_gate_up"][e, I:]
                    t[f"{s}experts.{e}.w2.weight"] = L["experts_down"][e]
            else:   # transformers 5.x fused
                t[m + "gate.weight"] = L["router"]
                t[m + "experts.gate_up_proj"], t[m + "experts.down_proj"] = L["experts_gate_up"], L["experts_down"]
        elif phi3_fused:
            t[m + "gate_up_proj.weight"] = np.concatenate([L["w_gate"], L["w_up"]])
            t[m + "down_proj.weight"] = L["w_down"]
        else:
            t[m + "gate_proj.weight"], t[m + "up_proj.weight"], t[m + "down_proj.weight"] = \
                L["w_gate"], L["w_up"], L["w_down"]
    return t


def gptoss_original_tensors(roles: dict) -> dict:
    t = {"embedding.weight": roles["embed"], "norm.scale": roles["final_norm"],
         "unembedding.weight": roles["lm_head"]}
    for i, L in enumerate(roles["layers"]):
        a, m = f"block.{i}.attn.", f"block.{i}.mlp."
        t[a + "norm.scale"], t[m + "norm.scale"] = L["attn_norm"], L["mlp_norm"]
        t[a + "qkv.weight"] = np.concatenate([L["wq"], L["wk"], L["wv"]])
        t[a + "qkv.bias"] = np.concatenate([L["bq"], L["bk"], L["bv"]])
        t[a + "sinks"], t[a + "out.weight"], t[a + "out.bias"] = L["sinks"], L["wo"], L["bo"]
        t[m + "gate.weight"], t[m + "gate.bias"] = L["router"], L["router_bias"]
        (gb, gs), (db, ds) = L["experts_gate_up_mxfp4"], L["experts_down_mxfp4"]
        t[m + "mlp1_weight.blocks"], t[m + "mlp1_weight.scales"] = gb, gs
        t[m + "mlp2_weight.blocks"], t[m + "mlp2_weight.scales"] = db, ds
        t[m + "mlp1_bias"], t[m + "mlp2_bias"] = L["experts_gate_up_bias"], L["experts_down_bias"]
    return t


def gpt2_tensors(roles: dict, prefix: str) -> dict:
    """GPT-2 names; Conv1D weights stored (in, out); fused c_attn; plus an ignored attn.bias buffer."""
    p = prefix
    t = {p + "wte.weight": roles["embed"], p + "wpe.weight": roles["pos_embed"],
         p + "ln_f.weight": roles["final_norm"], p + "ln_f.bias": roles["final_norm_bias"]}
    for i, L in enumerate(roles["layers"]):
        h = f"{p}h.{i}."
        t[h + "ln_1.weight"], t[h + "ln_1.bias"] = L["attn_norm"], L["attn_norm_bias"]
        t[h + "ln_2.weight"], t[h + "ln_2.bias"] = L["mlp_norm"], L["mlp_norm_bias"]
        t[h + "attn.c_attn.weight"] = np.concatenate([L["wq"], L["wk"], L["wv"]]).T
        t[h + "attn.c_attn.bias"] = np.concatenate([L["bq"], L["bk"], L["bv"]])
        t[h + "attn.c_proj.weight"], t[h + "attn.c_proj.bias"] = L["wo"].T, L["bo"]
        t[h + "mlp.c_fc.weight"], t[h + "mlp.c_fc.bias"] = L["w_fc"].T, L["b_fc"]
        t[h + "mlp.c_proj.weight"], t[h + "mlp.c_proj.bias"] = L["w_proj"].T, L["b_proj"]
        t[h + "attn.bias"] = np.tril(np.ones((1, 1, 32, 32)))
    return t


def write(tmp_path, name: str, tensors: dict, dtype=np.float32) -> str:
    """Save tensors (floats cast to ``dtype``, uint8 kept) as <tmp>/<name>/model.safetensors."""
    d = os.path.join(str(tmp_path), name)
    os.makedirs(d, exist_ok=True)
    out = {k: np.ascontiguousarray(v if v.dtype == np.uint8 else v.astype(dtype)) for k, v in tensors.items()}
    save_file(out, os.path.join(d, "model.safetensors"))
    return d


def build(c: ModelConfig, path: str, backend="reference") -> Model:
    """The model at ``path``; the reference backend unless another is named."""
    return Model.from_checkpoint(c, Checkpoint(path), backend=backend, path=path)


def normalized_error(out, ref):
    return float(np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1.0))


# -- the four cases shared by tests and tools -------------------------------------------------------
def build_case(name: str, tmp) -> tuple:
    """(config, float64 roles as stored, reference model) for the tiny checkpoint ``name`` of
    :data:`CASES`, written under ``tmp``."""
    if name == "llama_f32":
        roles = store_dtype(make_roles(LLAMA, 1), np.float32)
        return LLAMA, roles, build(LLAMA, write(tmp, name, hf_tensors(LLAMA, roles)))
    if name == "qwen3_bf16":
        roles = store_dtype(make_roles(QWEN3, 2), ml_dtypes.bfloat16)
        return QWEN3, roles, build(QWEN3, write(tmp, name, hf_tensors(QWEN3, roles), ml_dtypes.bfloat16))
    if name == "gptoss_mxfp4":
        roles = quantize_experts(store_dtype(make_roles(GPTOSS, 3), ml_dtypes.bfloat16))
        return GPTOSS, roles, build(GPTOSS, write(tmp, name, hf_tensors(GPTOSS, roles), ml_dtypes.bfloat16))
    if name == "gpt2_f32":
        roles = store_dtype(make_roles(GPT2, 4), np.float32)
        return GPT2, roles, build(GPT2, write(tmp, name, gpt2_tensors(roles, "")))
    raise KeyError(f"unknown tiny case {name!r}; choose from {CASES}")


CASES = ("llama_f32", "qwen3_bf16", "gptoss_mxfp4", "gpt2_f32")
