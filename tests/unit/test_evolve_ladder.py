"""gptevo evolve's ladder: every step's config, its forward pass on the reference at tiny scale, and the
calculators against the tensors actually built (spec/evolution.md)."""
from __future__ import annotations

import json
from dataclasses import fields

import numpy as np
import pytest

from gptevo.calculators import active_parameters, bytes_per_token, parameter_count, weight_memory
from gptevo.config import ModelConfig
from gptevo.config_adapters import load_config
from gptevo.evolve.ladder import SCALES, ladder
from gptevo.evolve.metrics import flops_per_token, step_metrics
from gptevo.evolve.random_model import build_model, count_parameters, random_weights
from gptevo.ops.mxfp4 import Mxfp4Weight

MAIN_LINE = ["gpt2", "no_dropout", "pre_norm", "rope", "swiglu", "rmsnorm", "gqa", "moe", "sliding_window",
             "gpt_oss", "mxfp4"]
TINY = ladder("tiny")
IDS = [3, 17, 42, 5, 9, 60, 1, 33, 8, 12, 50, 2]       # 12 tokens > the tiny window of 8


def test_main_line_is_the_seeds_order_with_two_side_branches():
    steps = ladder("small")
    assert [s.id for s in steps if not s.branch] == MAIN_LINE
    assert {s.id: s.parent for s in steps if s.branch} == {"post_norm": "pre_norm", "qk_norm": "gqa"}
    for prev, st in zip(MAIN_LINE, MAIN_LINE[1:]):
        assert next(s for s in steps if s.id == st).parent == prev


@pytest.mark.parametrize("scale", sorted(SCALES))
def test_each_step_is_its_parent_with_the_diff_applied(scale):
    steps = {s.id: s for s in ladder(scale)}
    for st in steps.values():
        if st.parent is None:
            continue
        parent = steps[st.parent].config
        plain = {k: v for k, v in st.diff.items() if not k.startswith("extra.")}
        extra = dict(parent.extra)
        extra.update({k[len("extra."):]: v for k, v in st.diff.items() if k.startswith("extra.")})
        rebuilt = parent.replace(**plain, extra=ModelConfig.freeze(extra))
        assert rebuilt == st.config and dict(rebuilt.extra) == dict(st.config.extra), st.id
        assert (st.diff == {}) == (st.id == "pre_norm"), st.id       # only pre_norm changes nothing


def test_step_diffs_at_small_scale():
    d = {s.id: s.diff for s in ladder("small")}
    assert d["no_dropout"] == {"extra.dropout": 0.0}
    assert d["rope"] == {"position": "rope"}
    assert d["swiglu"] == {"intermediate_size": 336, "mlp": "swiglu", "activation": "silu"}
    assert d["rmsnorm"] == {"norm": "rmsnorm"}
    assert d["gqa"] == {"num_kv_heads": 2}
    assert d["moe"] == {"intermediate_size": 128, "mlp": "moe", "num_experts": 8, "experts_per_token": 2,
                        "moe_intermediate_size": 128}
    assert d["sliding_window"] == {"sliding_window": 32, "layer_types": ("sliding", "full", "sliding", "full"),
                                   "attention_sinks": True}
    assert d["mxfp4"] == {"extra.quantization": "mxfp4"}
    assert d["post_norm"] == {"block_order": "post"}
    assert d["qk_norm"] == {"qk_norm": True}


def _adapter_config(tmp_path, cfg: dict) -> ModelConfig:
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return load_config(tmp_path)


def _same_architecture(ours: ModelConfig, theirs: ModelConfig) -> list[str]:
    skip = {"bos_token_id", "eos_token_ids", "pad_token_id", "torch_dtype", "extra"}
    return [f.name for f in fields(ModelConfig) if f.name not in skip
            and getattr(ours, f.name) != getattr(theirs, f.name)]


def test_gpt2_scale_starts_at_the_real_gpt2_small(tmp_path):
    """openai-community/gpt2's config.json (the architecture keys)."""
    real = _adapter_config(tmp_path, {
        "model_type": "gpt2", "activation_function": "gelu_new", "n_embd": 768, "n_head": 12, "n_layer": 12,
        "n_positions": 1024, "n_ctx": 1024, "n_inner": None, "vocab_size": 50257, "layer_norm_epsilon": 1e-5,
        "bos_token_id": 50256, "eos_token_id": 50256, "scale_attn_weights": True, "attn_pdrop": 0.1,
        "embd_pdrop": 0.1, "resid_pdrop": 0.1})
    first = ladder("gpt2")[0]
    assert _same_architecture(first.config, real) == []
    assert parameter_count(first.config)["total"] == 124_439_808                # published GPT-2 small


def test_20b_scale_ends_at_the_real_gpt_oss_20b(tmp_path):
    """openai/gpt-oss-20b's config.json."""
    real = _adapter_config(tmp_path, {
        "model_type": "gpt_oss", "attention_bias": True, "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2880, "initial_context_length": 4096, "intermediate_size": 2880,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(24)],
        "max_position_embeddings": 131072, "num_attention_heads": 64, "num_experts_per_tok": 4,
        "experts_per_token": 4, "num_hidden_layers": 24, "num_key_value_heads": 8, "num_local_experts": 32,
        "rms_norm_eps": 1e-5, "rope_theta": 150000, "sliding_window": 128, "swiglu_limit": 7.0,
        "tie_word_embeddings": False, "vocab_size": 201088, "eos_token_id": 200002, "pad_token_id": 199999,
        "quantization_config": {"quant_method": "mxfp4"},
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                         "rope_type": "yarn", "truncate": False}})
    last = ladder("20b")[-3]                    # the main line's last step (two side branches follow)
    assert last.id == "mxfp4"
    # mlp_bias: gpt-oss has a bias on the router and on every expert (facts: gpt-oss 2.4, 2.5); the
    # calculators count them through mlp_bias, which the gpt-oss adapters set.
    assert _same_architecture(last.config, real) == []
    assert last.config.mlp_bias is True
    assert parameter_count(real)["total"] == 20_914_757_184
    assert dict(last.config.extra)["quantization"] == dict(real.extra)["quantization"] == "mxfp4"
    assert parameter_count(last.config)["total"] == 20_914_757_184
    assert active_parameters(last.config) == 3_608_307_264


@pytest.mark.parametrize("step", TINY, ids=[s.id for s in TINY])
def test_every_step_runs_a_forward_on_the_reference(step):
    model = build_model(step.config, "reference", seed=1)
    logits = model.logits(IDS)
    assert logits.shape == (len(IDS), step.config.vocab_size)
    assert np.isfinite(logits).all()
    assert np.abs(logits).max() > 0
    cache = model.new_cache(len(IDS))                     # incremental decode = full sequence
    inc = np.concatenate([model.forward(IDS[:5], cache)] + [model.forward([t], cache) for t in IDS[5:]])
    assert np.abs(inc - logits).max() <= 1e-4 * max(1.0, float(np.abs(logits).max()))


def _counted(step):
    """(parameters, active parameters, stored bytes, bytes read per token, matmul weights per token),
    counted from the built random weights."""
    c = step.config
    w = random_weights(c, seed=0)
    E, k = c.num_experts, c.experts_per_token
    params = active = stored = read = matmul = 0
    tables = {id(w.embed), id(w.pos_embed)}
    arrays = [("embed", w.embed), ("pos_embed", w.pos_embed), ("final_norm", w.final_norm),
              ("final_norm_bias", w.final_norm_bias)]
    if w.lm_head is not w.embed:
        arrays.append(("lm_head", w.lm_head))
    arrays += [(name, a) for layer in w.layers for name, a in vars(layer).items()]
    for name, a in arrays:
        if a is None:
            continue
        n = int(np.prod(a.shape))
        nbytes = int(a.nbytes)
        share = k / E if name.startswith("experts_") else 1.0
        params += n
        stored += nbytes
        if id(a) in tables:
            read += nbytes // a.shape[0]                      # one row looked up
        else:
            active += int(n * share)
            read += int(nbytes * share)
            if len(a.shape) >= 2 and not name.endswith("_bias"):      # [E, n] expert biases are not matmuls
                matmul += int(n * share)
    if w.lm_head is w.embed:                                   # tied: the table is also the head
        active += int(np.prod(w.embed.shape))
        read += int(w.embed.nbytes)
        matmul += int(np.prod(w.embed.shape))
    mx = any(isinstance(a, Mxfp4Weight) for layer in w.layers for a in vars(layer).values())
    assert count_parameters(w) == params
    return params, active, stored, read, matmul, mx


@pytest.mark.parametrize("step", TINY, ids=[s.id for s in TINY])
def test_calculators_agree_with_the_built_tensors(step):
    c = step.config
    params, active, stored, read, matmul, mx = _counted(step)
    assert mx == (step.id == "mxfp4")
    dtype = "mxfp4" if mx else "bfloat16"
    assert parameter_count(c)["total"] == params
    assert active_parameters(c) == active
    assert weight_memory(c, dtype, experts_only=mx) == stored
    assert bytes_per_token(c, dtype, experts_only=mx) == read
    m = step_metrics(c, 5)
    assert (m["params_total"], m["params_active"], m["weight_bytes"], m["weight_bytes_per_token"]) == \
        (params, active, stored, read)
    # decode after 5 cached positions: 6 keys on full layers, min(6, W=8) on sliding ones
    attn = sum(4 * c.num_heads * c.head_dim * 6 for _ in range(c.num_layers))
    assert flops_per_token(c, 5) == 2 * matmul + attn
    # KV: bf16 K and V per position; at 20 positions the sliding layers hold W = 8
    per_layer = 2 * c.num_kv_heads * c.head_dim * 2
    windows = [c.window_for_layer(i) for i in range(c.num_layers)]
    assert m["kv_bytes_per_token"] == per_layer * c.num_layers
    assert step_metrics(c, 20)["kv_bytes_at_context"] == sum(per_layer * (20 if w is None else min(20, w))
                                                             for w in windows)
