"""The forward pass on tiny random checkpoints (built by ``tests/_builders/tiny_models.py``, shared
with the backend tests through the ``tiny_case`` fixture of ``tests/conftest.py``).

Expected logits come from a float64 re-derivation in this file (plain loops over heads and tokens,
written from the equations in the facts sheets: half-split RoPE, GQA head h -> KV head h // (H/G),
windows of W keys including self, sinks as an extra softmax column, top-k routing, clamped SwiGLU with
interleaved gate/linear, MXFP4 decoded by the builders' own LUT), never from gptevo's ops. Incremental decode is
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

import gptevo
from gptevo.backends import Backend, resolve
from gptevo.config import ModelConfig
from gptevo.errors import BackendError, CheckpointError, RequestError
from gptevo.kv_cache import KVCache
from gptevo.model import Model
from _builders.tiny_models import (CASES, IDS, LLAMA, MIXTRAL, build, gpt2_tensors, gptoss_original_tensors, hf_tensors,
                                   make_roles, normalized_error, store_dtype, write)

TOL = 1e-4          # normalized error of float32 engine vs float64 re-derivation
INC_TOL = 1e-5      # incremental vs full-sequence logits, relative to max |logit|


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


# -- forward vs float64 re-derivation ------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_logits_match_float64_rederivation(tiny_case, name):
    c, roles, model = tiny_case(name)
    out = model.logits(IDS)
    assert out.shape == (len(IDS), c.vocab_size) and out.dtype == np.float32
    err = normalized_error(out.astype(np.float64), ref_logits(c, roles, IDS))
    assert err < TOL, f"{name}: normalized error {err:.2e} vs float64 re-derivation"


def test_weights_keep_stored_dtype(tiny_case):
    _, _, bf = tiny_case("qwen3_bf16")
    assert bf.weights.layers[0].wq.dtype == ml_dtypes.bfloat16
    assert bf.weights.lm_head is bf.weights.embed                 # tied: no lm_head on disk
    _, _, oss = tiny_case("gptoss_mxfp4")
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
def test_token_by_token_equals_full_sequence(tiny_case, name):
    _, _, model = tiny_case(name)
    full = model.logits(IDS)
    assert _rel(_incremental(model, [1] * len(IDS)), full) < INC_TOL


@pytest.mark.parametrize("chunks", [[7, 5], [2, 6, 4], [5, 1, 1, 5], [12]])
@pytest.mark.parametrize("name", ["llama_f32", "gptoss_mxfp4"])
def test_chunks_longer_than_window_equal_full_sequence(tiny_case, name, chunks):
    _, _, model = tiny_case(name)   # windows 4 and 3: chunks of 5..12 exceed them
    assert _rel(_incremental(model, chunks, max_tokens=16), model.logits(IDS)) < INC_TOL


@settings(max_examples=8, deadline=None)
@given(cuts=st.lists(st.integers(1, len(IDS) - 1), max_size=4, unique=True))
def test_any_chunking_equals_full_sequence(tiny_case, cuts):
    _, _, model = tiny_case("llama_f32")
    bounds = [0, *sorted(cuts), len(IDS)]
    chunks = [b - a for a, b in zip(bounds, bounds[1:])]
    assert _rel(_incremental(model, chunks), model.logits(IDS)) < INC_TOL


def test_cache_overflow_is_a_request_error(tiny_case):
    _, _, model = tiny_case("llama_f32")
    cache = model.new_cache(4)
    model.forward(IDS[:3], cache)
    with pytest.raises(RequestError, match=r"5.*4|4.*5"):
        model.forward(IDS[3:5], cache)
    with pytest.raises(RequestError):
        model.forward([1], "not a cache")


def test_failed_forward_marks_cache_until_reset(tiny_case):
    c, _, model = tiny_case("llama_f32")
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


def test_gptoss_layouts_agree(tmp_path, tiny_case):
    c, roles, mx = tiny_case("gptoss_mxfp4")
    want = mx.logits(IDS)
    deq = build(c, write(tmp_path, "deq", hf_tensors(c, roles, gptoss_dequant=True), ml_dtypes.bfloat16))
    orig = build(c, write(tmp_path, "orig", gptoss_original_tensors(roles), ml_dtypes.bfloat16))
    assert type(deq.weights.layers[0].experts_down).__name__ == "ndarray"
    np.testing.assert_allclose(deq.logits(IDS), want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert np.array_equal(orig.logits(IDS), want)


def test_gpt2_prefix_and_ignored_buffers(tmp_path, tiny_case):
    c, roles, plain = tiny_case("gpt2_f32")
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


def test_backend_lacking_an_op_fails_at_load(tiny_case):
    c, _, model = tiny_case("llama_f32")
    ops = dict(resolve("reference").ops)
    del ops["apply_rope"]
    with pytest.raises(BackendError, match="apply_rope"):
        Model(c, model.weights, backend=Backend("partial", ops))


# -- request errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [[], [1.0, 2.0], [True, 3], [-1], [64], [3, 70], np.array([1.5]),
                                 np.array([[1, 2]]), np.array([True]), "hello", 5, None, [[1, 2]],
                                 [1] * 65])
def test_bad_token_ids(tiny_case, bad):
    _, _, model = tiny_case("llama_f32")
    with pytest.raises(RequestError):
        model.logits(bad)


def test_ids_accept_numpy_integers(tiny_case):
    _, _, model = tiny_case("llama_f32")
    want = model.logits(IDS)
    assert np.array_equal(model.logits(np.array(IDS, np.int32)), want)
    assert np.array_equal(model.logits([np.int64(i) for i in IDS]), want)


def test_float64_compute_and_bad_dtype(tiny_case):
    c, roles, model = tiny_case("llama_f32")
    m64 = Model(c, model.weights, dtype="float64")
    err = float(np.max(np.abs(m64.logits(IDS) - ref_logits(c, roles, IDS))))
    assert err < 1e-5                     # float64 activations, returned as float32
    with pytest.raises(RequestError, match="dtype"):
        Model(c, model.weights, dtype="int8")
    with pytest.raises(RequestError, match="dtype"):
        gptevo.load("/nonexistent", dtype="bogus")


def test_positions_beyond_max_position_embeddings(tiny_case):
    _, _, model = tiny_case("gpt2_f32")     # 32 learned positions
    model.logits([1] * 32)
    with pytest.raises(RequestError, match="32"):
        model.logits([1] * 33)
    with pytest.raises(RequestError):
        model.new_cache(33)


# -- trace ------------------------------------------------------------------------------------------------
def test_trace_names_and_values(tiny_case):
    c, roles, model = tiny_case("gptoss_mxfp4")
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


def test_load_gptoss_hf_and_original_directories(tmp_path, tiny_case):
    c, roles, _ = tiny_case("gptoss_mxfp4")
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
