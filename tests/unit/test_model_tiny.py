"""The forward pass on tiny random checkpoints written here with safetensors.

Expected logits come from a float64 re-derivation in this file (plain loops over heads and tokens,
written from the equations in the facts sheets: half-split RoPE, GQA head h -> KV head h // (H/G),
windows of W keys including self, sinks as an extra softmax column, top-k routing, clamped SwiGLU with
interleaved gate/linear, MXFP4 decoded from its own LUT), never from gptevo's ops. Incremental decode is
checked against full-sequence logits (a property), and layout variants (Conv1D, fused qkv, per-expert
MoE, MXFP4 vs dequantized, original gpt-oss names) against each other.
"""
from __future__ import annotations

import json
import math
import os

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from safetensors.numpy import save_file

import gptevo
from gptevo.backends import Backend, resolve
from gptevo.checkpoint import Checkpoint
from gptevo.config import ModelConfig
from gptevo.errors import BackendError, CheckpointError, RequestError
from gptevo.kv_cache import KVCache
from gptevo.model import Model
from gptevo.ops.mxfp4 import mxfp4_encode

TOL = 1e-4          # normalized error of float32 engine vs float64 re-derivation
INC_TOL = 1e-5      # incremental vs full-sequence logits, relative to max |logit|
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
    """The model at ``path``; the reference backend unless another is named (these tests check the
    reference model; tests/conformance/test_model_backends.py runs the same models on every backend)."""
    return Model.from_checkpoint(c, Checkpoint(path), backend=backend, path=path)


# -- float64 re-derivation -------------------------------------------------------------------------
def ref_norm(x, w, b, c):
    if c.norm == "layernorm":
        mu = x.mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + c.norm_eps) * w + b
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + c.norm_eps) * w


def ref_rope(x, theta):
    """Half-split RoPE on [T, heads, Dh] at positions 0..T-1: dim j pairs with j + Dh/2."""
    T, _, Dh = x.shape
    inv = theta ** (-np.arange(0, Dh, 2) / Dh)
    ang = np.arange(T)[:, None] * inv                     # [T, Dh/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., :Dh // 2], x[..., Dh // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def ref_attention(q, k, v, window, sinks):
    T, H, Dh = q.shape
    G = k.shape[1]
    out = np.zeros_like(q)
    for h in range(H):
        g = h // (H // G)
        for i in range(T):
            keys = [j for j in range(T) if j <= i and (window is None or j > i - window)]
            s = np.array([q[i, h] @ k[j, g] / math.sqrt(Dh) for j in keys])
            m = max(s.max(), sinks[h]) if sinks is not None else s.max()
            e = np.exp(s - m)
            denom = e.sum() + (math.exp(sinks[h] - m) if sinks is not None else 0.0)
            out[i, h] = sum(e[n] / denom * v[j, g] for n, j in enumerate(keys))
    return out


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def ref_moe(c, L, h):
    out = np.zeros_like(h)
    I = L["experts_down"].shape[2]
    for t in range(h.shape[0]):
        logits = L["router"] @ h[t] + L.get("router_bias", 0.0)
        if c.router_order == "topk_softmax":
            idx = np.argsort(-logits)[:c.experts_per_token]
            wts = np.exp(logits[idx] - logits[idx].max())
            wts /= wts.sum()
        else:
            p = np.exp(logits - logits.max())
            p /= p.sum()
            idx = np.argsort(-p)[:c.experts_per_token]
            wts = p[idx] / (p[idx].sum() if c.norm_topk_prob else 1.0)
        for e, wt in zip(idx, wts):
            z = L["experts_gate_up"][e] @ h[t] + (L["experts_gate_up_bias"][e] if "experts_gate_up_bias" in L else 0)
            if c.expert_activation == "clamped_swiglu":
                g, lin = np.minimum(z[0::2], c.swiglu_limit), np.clip(z[1::2], -c.swiglu_limit, c.swiglu_limit)
                act = g * sigmoid(c.swiglu_alpha * g) * (lin + 1)
            else:
                act = z[:I] * sigmoid(z[:I]) * z[I:]
            y = L["experts_down"][e] @ act + (L["experts_down_bias"][e] if "experts_down_bias" in L else 0)
            out[t] += wt * y
    return out


def ref_logits(c: ModelConfig, roles: dict, ids) -> np.ndarray:
    T, D, nh, G = len(ids), c.head_dim, c.num_heads, c.num_kv_heads
    x = roles["embed"][ids]
    if c.position == "learned":
        x = x + roles["pos_embed"][:T]
    for i, L in enumerate(roles["layers"]):
        h = ref_norm(x, L["attn_norm"], L.get("attn_norm_bias"), c)
        q = (h @ L["wq"].T + L.get("bq", 0)).reshape(T, nh, D)
        k = (h @ L["wk"].T + L.get("bk", 0)).reshape(T, G, D)
        v = (h @ L["wv"].T + L.get("bv", 0)).reshape(T, G, D)
        if c.qk_norm:
            q, k = ref_norm(q, L["q_norm"], None, c), ref_norm(k, L["k_norm"], None, c)
        if c.position == "rope":
            q, k = ref_rope(q, c.rope_theta), ref_rope(k, c.rope_theta)
        a = ref_attention(q, k, v, c.window_for_layer(i), L.get("sinks")).reshape(T, nh * D)
        x = x + a @ L["wo"].T + L.get("bo", 0)
        h = ref_norm(x, L["mlp_norm"], L.get("mlp_norm_bias"), c)
        if "router" in L:
            x = x + ref_moe(c, L, h)
        elif "w_fc" in L:
            x = x + gelu_tanh(h @ L["w_fc"].T + L["b_fc"]) @ L["w_proj"].T + L["b_proj"]
        else:
            g = h @ L["w_gate"].T
            x = x + (g * sigmoid(g) * (h @ L["w_up"].T)) @ L["w_down"].T
    x = ref_norm(x, roles["final_norm"], roles.get("final_norm_bias"), c)
    return x @ roles["lm_head"].T


def normalized_error(out, ref):
    return float(np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1.0))


# -- fixtures ----------------------------------------------------------------------------------------
def _case(name, tmp):
    """(config, float64 roles as stored, model) for one tiny checkpoint."""
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
    raise KeyError(name)


CASES = ("llama_f32", "qwen3_bf16", "gptoss_mxfp4", "gpt2_f32")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = _case(name, tmp)
        return cache[name]

    return get


# -- forward vs float64 re-derivation ------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_logits_match_float64_rederivation(tiny, name):
    c, roles, model = tiny(name)
    out = model.logits(IDS)
    assert out.shape == (len(IDS), c.vocab_size) and out.dtype == np.float32
    err = normalized_error(out.astype(np.float64), ref_logits(c, roles, IDS))
    assert err < TOL, f"{name}: normalized error {err:.2e} vs float64 re-derivation"


def test_weights_keep_stored_dtype(tiny):
    _, _, bf = tiny("qwen3_bf16")
    assert bf.weights.layers[0].wq.dtype == ml_dtypes.bfloat16
    assert bf.weights.lm_head is bf.weights.embed                 # tied: no lm_head on disk
    _, _, oss = tiny("gptoss_mxfp4")
    assert type(oss.weights.layers[0].experts_gate_up).__name__ == "Mxfp4Weight"
    assert oss.weights.layers[0].experts_gate_up.shape == (4, 64, 32)


# -- incremental decode -------------------------------------------------------------------------------
def _incremental(model, chunks, max_tokens=None):
    cache = model.new_cache(max_tokens or len(IDS))
    outs, n = [], 0
    for size in chunks:
        outs.append(model.forward(IDS[n:n + size], cache))
        n += size
    assert cache.length == len(IDS)
    return np.concatenate(outs)


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("name", CASES)
def test_token_by_token_equals_full_sequence(tiny, name):
    _, _, model = tiny(name)
    full = model.logits(IDS)
    assert _rel(_incremental(model, [1] * len(IDS)), full) < INC_TOL


@pytest.mark.parametrize("chunks", [[7, 5], [2, 6, 4], [5, 1, 1, 5], [12]])
@pytest.mark.parametrize("name", ["llama_f32", "gptoss_mxfp4"])
def test_chunks_longer_than_window_equal_full_sequence(tiny, name, chunks):
    _, _, model = tiny(name)   # windows 4 and 3: chunks of 5..12 exceed them
    assert _rel(_incremental(model, chunks, max_tokens=16), model.logits(IDS)) < INC_TOL


@settings(max_examples=8, deadline=None)
@given(cuts=st.lists(st.integers(1, len(IDS) - 1), max_size=4, unique=True))
def test_any_chunking_equals_full_sequence(tiny, cuts):
    _, _, model = tiny("llama_f32")
    bounds = [0, *sorted(cuts), len(IDS)]
    chunks = [b - a for a, b in zip(bounds, bounds[1:])]
    assert _rel(_incremental(model, chunks), model.logits(IDS)) < INC_TOL


def test_cache_overflow_is_a_request_error(tiny):
    _, _, model = tiny("llama_f32")
    cache = model.new_cache(4)
    model.forward(IDS[:3], cache)
    with pytest.raises(RequestError, match=r"5.*4|4.*5"):
        model.forward(IDS[3:5], cache)
    with pytest.raises(RequestError):
        model.forward([1], "not a cache")


def test_failed_forward_marks_cache_until_reset(tiny):
    c, _, model = tiny("llama_f32")
    ops = dict(resolve("reference").ops)
    calls = []

    def flaky_mlp(**kw):            # fails in layer 1, after layer 0 committed its keys
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected")
        return ops["swiglu_mlp"](**kw)

    flaky = Model(c, model.weights, backend=Backend("flaky", {**ops, "swiglu_mlp": flaky_mlp}))
    cache = flaky.new_cache(16)
    with pytest.raises(RuntimeError, match="injected"):
        flaky.forward(IDS[:4], cache)
    with pytest.raises(RequestError, match="reset"):
        flaky.forward(IDS[:4], cache)
    cache.reset()
    got = np.concatenate([flaky.forward(IDS[:4], cache), flaky.forward(IDS[4:], cache)])
    assert _rel(got, model.logits(IDS)) < INC_TOL


# -- the KV cache's ring buffer ---------------------------------------------------------------------
def test_ring_buffer_keeps_last_window_positions():
    c, W, G, Dh = LLAMA, 4, LLAMA.num_kv_heads, LLAMA.head_dim   # layer 0 slides (W=4), layer 1 full
    cache = KVCache(c, max_tokens=20)
    assert cache.keys[0].shape == (W, G, Dh) and cache.keys[1].shape == (20, G, Dh)

    def key(p):                                              # key of position p is filled with p
        return np.full((G, Dh), float(p), np.float32)

    start = 0
    for size in (3, 6, 1, 2):                                # 12 positions, one chunk longer than W
        pos = np.arange(start, start + size)
        new = np.stack([key(p) for p in pos])
        for layer in (0, 1):
            k_all, v_all, k_pos = cache.view(layer, new, -new, pos)
            expect = list(range(max(0, start - W), start + size)) if layer == 0 else list(range(start + size))
            assert sorted(k_pos.tolist()) == expect
            assert np.array_equal(k_all[:, 0, 0], k_pos.astype(np.float32))   # each key sits with its position
            assert np.array_equal(v_all, -k_all)
            cache.commit(layer, new, -new, pos)
        start += size
        assert cache.length == start
        ring = cache.positions[0]
        assert sorted(ring.tolist()) == list(range(start - W, start)) if start >= W else True
        for slot, p in enumerate(ring):
            if p >= 0:
                assert p % W == slot and cache.keys[0][slot, 0, 0] == p
    with pytest.raises(RequestError, match="20"):
        cache.view(1, np.zeros((9, G, Dh), np.float32), np.zeros((9, G, Dh), np.float32), np.arange(12, 21))


def test_ring_buffer_starts_empty():
    cache = KVCache(LLAMA, max_tokens=2)   # fewer tokens than the window: 2 slots
    assert cache.keys[0].shape[0] == 2 and (cache.positions[0] == -1).all() and cache.length == 0
    with pytest.raises(RequestError):
        KVCache(LLAMA, max_tokens=0)


# -- layout variants give the same logits --------------------------------------------------------------
def test_layout_variants_agree(tmp_path):
    # Phi-3 fused qkv/gate_up vs split Llama names
    roles = store_dtype(make_roles(LLAMA, 5), np.float32)
    split = build(LLAMA, write(tmp_path, "split", hf_tensors(LLAMA, roles))).logits(IDS)
    fused = build(LLAMA, write(tmp_path, "fused", hf_tensors(LLAMA, roles, phi3_fused=True))).logits(IDS)
    assert np.array_equal(split, fused)
    # Mixtral per-expert w1/w3/w2 vs the transformers 5.x fused experts; both vs the re-derivation
    roles = store_dtype(make_roles(MIXTRAL, 6), np.float32)
    per_model = build(MIXTRAL, write(tmp_path, "mix_per", hf_tensors(MIXTRAL, roles, per_expert="mixtral")))
    stack = per_model.weights.layers[1].experts_gate_up       # per-expert tensors are not copied at load
    assert stack.shape == (4, 48, 32) and np.array_equal(np.asarray(stack[2], np.float64),
                                                          roles["layers"][1]["experts_gate_up"][2])
    per = per_model.logits(IDS)
    fus = build(MIXTRAL, write(tmp_path, "mix_fused", hf_tensors(MIXTRAL, roles))).logits(IDS)
    assert np.array_equal(per, fus)
    assert normalized_error(per.astype(np.float64), ref_logits(MIXTRAL, roles, IDS)) < TOL


def test_gptoss_layouts_agree(tmp_path, tiny):
    c, roles, mx = tiny("gptoss_mxfp4")
    want = mx.logits(IDS)
    deq = build(c, write(tmp_path, "deq", hf_tensors(c, roles, gptoss_dequant=True), ml_dtypes.bfloat16))
    orig = build(c, write(tmp_path, "orig", gptoss_original_tensors(roles), ml_dtypes.bfloat16))
    assert type(deq.weights.layers[0].experts_down).__name__ == "ndarray"
    np.testing.assert_allclose(deq.logits(IDS), want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert np.array_equal(orig.logits(IDS), want)


def test_gpt2_prefix_and_ignored_buffers(tmp_path, tiny):
    c, roles, plain = tiny("gpt2_f32")
    assert "h.0.attn.bias" in plain.unused_tensors
    prefixed = build(c, write(tmp_path, "gpt2p", gpt2_tensors(roles, "transformer.")))
    assert np.array_equal(prefixed.logits(IDS), plain.logits(IDS))
    assert prefixed.weights.layers[0].wo.shape == (32, 32)


# -- checkpoint errors ------------------------------------------------------------------------------------
class _Headers:
    """A checkpoint whose data must never be read (headers only)."""

    def __init__(self, tensors):
        self.tensors = tensors

    def names(self):
        return list(self.tensors)

    def info(self, name):
        return str(self.tensors[name].dtype), self.tensors[name].shape

    def get(self, name):
        raise AssertionError(f"data of {name} read before every header was checked")


def test_missing_tensor_is_named():
    t = hf_tensors(LLAMA, make_roles(LLAMA, 7))
    del t["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        Model.from_checkpoint(LLAMA, _Headers(t))


def test_wrong_shape_names_both_shapes_before_reading_data():
    t = hf_tensors(LLAMA, make_roles(LLAMA, 7))
    t["model.layers.1.self_attn.k_proj.weight"] = np.zeros((17, 32))
    with pytest.raises(CheckpointError, match=r"k_proj\.weight.*\[17, 32\].*\[16, 32\]"):
        Model.from_checkpoint(LLAMA, _Headers(t))


def test_wrong_dtype_is_a_checkpoint_error():
    t = hf_tensors(LLAMA, make_roles(LLAMA, 7))
    t["model.norm.weight"] = np.zeros(32, np.int32)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*int32"):
        Model.from_checkpoint(LLAMA, _Headers(t))


def test_untied_model_without_lm_head(tmp_path):
    t = hf_tensors(LLAMA, make_roles(LLAMA, 8))
    del t["lm_head.weight"]
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        Model.from_checkpoint(LLAMA, _Headers(t))


def test_extra_tensors_are_collected(tmp_path):
    t = hf_tensors(LLAMA, store_dtype(make_roles(LLAMA, 9), np.float32))
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4)
    model = build(LLAMA, write(tmp_path, "extra", t))
    assert model.unused_tensors == ["model.layers.0.self_attn.rotary_emb.inv_freq"]


def test_backend_lacking_an_op_fails_at_load(tiny):
    c, _, model = tiny("llama_f32")
    ops = dict(resolve("reference").ops)
    del ops["apply_rope"]
    with pytest.raises(BackendError, match="apply_rope"):
        Model(c, model.weights, backend=Backend("partial", ops))


# -- request errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [[], [1.0, 2.0], [True, 3], [-1], [64], [3, 70], np.array([1.5]),
                                 np.array([[1, 2]]), np.array([True]), "hello", 5, None, [[1, 2]],
                                 [1] * 65])
def test_bad_token_ids(tiny, bad):
    _, _, model = tiny("llama_f32")
    with pytest.raises(RequestError):
        model.logits(bad)


def test_ids_accept_numpy_integers(tiny):
    _, _, model = tiny("llama_f32")
    want = model.logits(IDS)
    assert np.array_equal(model.logits(np.array(IDS, np.int32)), want)
    assert np.array_equal(model.logits([np.int64(i) for i in IDS]), want)


def test_float64_compute_and_bad_dtype(tiny):
    c, roles, model = tiny("llama_f32")
    m64 = Model(c, model.weights, dtype="float64")
    err = float(np.max(np.abs(m64.logits(IDS) - ref_logits(c, roles, IDS))))
    assert err < 1e-5                     # float64 activations, returned as float32
    with pytest.raises(RequestError, match="dtype"):
        Model(c, model.weights, dtype="int8")
    with pytest.raises(RequestError, match="dtype"):
        gptevo.load("/nonexistent", dtype="bogus")


def test_positions_beyond_max_position_embeddings(tiny):
    _, _, model = tiny("gpt2_f32")     # 32 learned positions
    model.logits([1] * 32)
    with pytest.raises(RequestError, match="32"):
        model.logits([1] * 33)
    with pytest.raises(RequestError):
        model.new_cache(33)


# -- trace ------------------------------------------------------------------------------------------------
def test_trace_names_and_values(tiny):
    c, roles, model = tiny("gptoss_mxfp4")
    tr = model.trace(IDS)
    names = list(tr)
    assert names[0] == "embed" and names[-2:] == ["final_norm", "logits"]
    for i in range(c.num_layers):
        for part in ("attn_norm", "q", "k", "v", "q_rope", "k_rope", "attn", "attn_out", "mlp_norm",
                     "router_logits", "mlp_out", "out"):
            assert f"layer{i}.{part}" in tr, f"layer{i}.{part}"
    assert tr["layer0.q"].shape == (len(IDS), c.num_heads, c.head_dim)
    assert tr["layer1.k"].shape == (len(IDS), c.num_kv_heads, c.head_dim)
    assert np.array_equal(tr["logits"], model.logits(IDS))
    np.testing.assert_allclose(tr["embed"], roles["embed"][IDS], rtol=0, atol=0)
    assert np.array_equal(tr["layer1.out"], tr["layer1.resid_attn"] + tr["layer1.mlp_out"])


# -- gptevo.load on a directory with a config.json -------------------------------------------------------
def test_load_directory_with_hf_config(tmp_path):
    roles = store_dtype(make_roles(LLAMA, 10), np.float32)
    d = write(tmp_path, "hfdir", hf_tensors(LLAMA, roles))
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32,
           "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 8, "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "tie_word_embeddings": False, "hidden_act": "silu"}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    model = gptevo.load(d, backend="reference")
    assert model.path == d and model.backend.name == "reference"
    c = model.config.replace(sliding_window=None, layer_types=())
    assert normalized_error(model.logits(IDS).astype(np.float64), ref_logits(c, roles, IDS)) < TOL


def test_load_gptoss_hf_and_original_directories(tmp_path, tiny):
    c, roles, _ = tiny("gptoss_mxfp4")
    ref = ref_logits(c, roles, IDS)
    d = write(tmp_path, "oss_hf", hf_tensors(c, roles), ml_dtypes.bfloat16)
    cfg = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "attention_bias": True, "head_dim": 8,
           "hidden_size": 32, "intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
           "num_hidden_layers": 2, "num_local_experts": 4, "num_experts_per_tok": 2, "experts_per_token": 2,
           "vocab_size": 64, "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 150000.0,
           "sliding_window": 3, "layer_types": ["sliding_attention", "full_attention"], "swiglu_limit": 1.5,
           "tie_word_embeddings": False}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    assert normalized_error(gptevo.load(d).logits(IDS).astype(np.float64), ref) < TOL
    root = os.path.join(str(tmp_path), "oss_orig")
    od = write(root, "original", gptoss_original_tensors(roles), ml_dtypes.bfloat16)
    ocfg = {"num_hidden_layers": 2, "num_experts": 4, "experts_per_token": 2, "vocab_size": 64, "hidden_size": 32,
            "intermediate_size": 32, "swiglu_limit": 1.5, "head_dim": 8, "num_attention_heads": 4,
            "num_key_value_heads": 2, "sliding_window": 3, "initial_context_length": 64, "rope_theta": 150000.0,
            "rope_scaling_factor": 1.0, "rope_ntk_alpha": 1.0, "rope_ntk_beta": 32.0}
    with open(os.path.join(od, "config.json"), "w") as f:
        json.dump(ocfg, f)
    model = gptevo.load(root)
    assert model.unused_tensors == []
    assert normalized_error(model.logits(IDS).astype(np.float64), ref) < TOL
