"""config.json -> ModelConfig for every family, transformers 4.x and 5.x keys, and the original gpt-oss layout.

The 5.x dicts below are what transformers 5.24 ``save_pretrained`` wrote for the tiny fixtures of
the HF-families facts sheet (section 11), trimmed of training-only keys. Expected values come from
that sheet (sections 2-9) and the gpt-oss sheet (section 1), written out by hand.
"""
import json
import math
import os

import pytest

from gptevo.config import ModelConfig
from gptevo.config_adapters import config_from_dict, load_config, merge_generation_config
from gptevo.errors import ConfigError

SRC = "test/config.json"
BASE = {"hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 256, "num_attention_heads": 4,
        "num_hidden_layers": 2, "num_key_value_heads": 2, "vocab_size": 128, "hidden_act": "silu"}
V5 = {
    "gpt2": {"activation_function": "gelu_new", "bos_token_id": 50256, "eos_token_id": 50256,
             "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_inner": None,
             "n_layer": 2, "n_positions": 128, "reorder_and_upcast_attn": False,
             "scale_attn_by_inverse_layer_idx": False, "scale_attn_weights": True, "tie_word_embeddings": True,
             "vocab_size": 128},
    "llama3": dict(BASE, attention_bias=False, bos_token_id=1, eos_token_id=2, head_dim=16, mlp_bias=False,
                   model_type="llama", rms_norm_eps=1e-05, tie_word_embeddings=False, rope_parameters={
                       "factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                       "original_max_position_embeddings": 64, "rope_theta": 500000.0, "rope_type": "llama3"}),
    "mistral": dict(BASE, bos_token_id=1, eos_token_id=2, head_dim=16, model_type="mistral", rms_norm_eps=1e-06,
                    rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, sliding_window=4),
    "mixtral": dict(BASE, intermediate_size=96, head_dim=None, model_type="mixtral", num_experts_per_tok=2,
                    num_local_experts=4, rms_norm_eps=1e-05, sliding_window=None,
                    rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"}),
    "qwen2": dict(BASE, layer_types=["full_attention", "sliding_attention"], max_window_layers=1,
                  model_type="qwen2", rms_norm_eps=1e-06, sliding_window=4, tie_word_embeddings=True,
                  use_sliding_window=True, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}),
    "qwen3": dict(BASE, attention_bias=False, head_dim=32, layer_types=["full_attention", "full_attention"],
                  max_window_layers=28, model_type="qwen3", sliding_window=None, tie_word_embeddings=True,
                  use_sliding_window=False, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}),
    "qwen3_moe": dict(BASE, attention_bias=False, decoder_sparse_step=1, head_dim=32, mlp_only_layers=[1],
                      model_type="qwen3_moe", moe_intermediate_size=32, norm_topk_prob=True, num_experts_per_tok=2,
                      num_local_experts=8, sliding_window=None, use_sliding_window=False,
                      rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}),
    "phi3": dict(BASE, bos_token_id=1, eos_token_id=32000, model_type="phi3", original_max_position_embeddings=64,
                 pad_token_id=32000, rms_norm_eps=1e-05, sliding_window=8, rope_parameters={
                     "long_factor": [1, 1.5, 2, 3, 5, 8, 12, 16], "original_max_position_embeddings": 64,
                     "partial_rotary_factor": 1.0, "rope_theta": 10000.0, "rope_type": "longrope",
                     "short_factor": [1, 1.1, 1.2, 1.5, 2, 3, 4, 5]}),
    "gemma": dict(BASE, attention_bias=False, bos_token_id=2, eos_token_id=1, head_dim=16,
                  hidden_act="gelu_pytorch_tanh", model_type="gemma", num_key_value_heads=1, pad_token_id=0,
                  rms_norm_eps=1e-06, tie_word_embeddings=True,
                  rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}),
    "gpt_oss": dict(BASE, attention_bias=True, head_dim=16, layer_types=["sliding_attention", "full_attention"],
                    model_type="gpt_oss", num_experts_per_tok=2, num_local_experts=4, rms_norm_eps=1e-05,
                    sliding_window=128, swiglu_alpha=1.702, swiglu_limit=7.0, tie_word_embeddings=False,
                    rope_parameters={"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                     "original_max_position_embeddings": 4096, "rope_theta": 150000.0,
                                     "rope_type": "yarn", "truncate": False}),
}
# facts gpt-oss 1.2: the 16 keys of the 20b original/config.json
GPTOSS_20B_ORIGINAL = {"num_hidden_layers": 24, "num_experts": 32, "experts_per_token": 4, "vocab_size": 201088,
                       "hidden_size": 2880, "intermediate_size": 2880, "swiglu_limit": 7.0, "head_dim": 64,
                       "num_attention_heads": 64, "num_key_value_heads": 8, "sliding_window": 128,
                       "initial_context_length": 4096, "rope_theta": 150000, "rope_scaling_factor": 32.0,
                       "rope_ntk_alpha": 1, "rope_ntk_beta": 32}


def cfg(name, **changes):
    d = json.loads(json.dumps(V5[name]))
    d.update(changes)
    return config_from_dict(d, SRC)


def test_gpt2():
    c = cfg("gpt2")
    assert (c.family, c.norm, c.position, c.mlp, c.activation) == ("gpt2", "layernorm", "learned", "gelu", "gelu_tanh")
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (64, 2, 4, 4, 16)
    assert c.intermediate_size == 256 and c.max_position_embeddings == 128       # n_inner null -> 4H
    assert c.qkv_bias and c.o_bias and c.mlp_bias and c.tie_word_embeddings
    assert c.norm_eps == 1e-5 and c.attn_scale is None
    assert c.eos_token_ids == () and c.bos_token_id is None                      # 50256 >= vocab 128
    assert dict(c.extra)["dropped_token_ids"]
    assert cfg("gpt2", scale_attn_weights=False).attn_scale == 1.0
    assert cfg("gpt2", scale_attn_by_inverse_layer_idx=True).attn_scale_inverse_layer
    assert cfg("gpt2", activation_function="gelu").activation == "gelu"
    assert cfg("gpt2", n_inner=100).intermediate_size == 100
    assert cfg("gpt2", vocab_size=50257).eos_token_ids == (50256,)


def test_llama3_and_4x_keys():
    c = cfg("llama3")
    s = dict(c.rope_scaling)
    assert c.rope_theta == 500000.0 and s["rope_type"] == "llama3" and s["factor"] == 8.0
    assert (s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]) == (1.0, 4.0, 64)
    assert c.norm_eps == 1e-5 and not c.qkv_bias and not c.tie_word_embeddings and c.head_dim == 16
    assert c.eos_token_ids == (2,) and c.bos_token_id == 1 and c.mlp == "swiglu" and c.activation == "silu"
    d = dict(V5["llama3"])
    del d["rope_parameters"]
    d.update(rope_theta=500000.0, torch_dtype="bfloat16", rope_scaling={
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})
    c4 = config_from_dict(d, SRC)
    assert c4.rope_scaling == c.rope_scaling and c4.rope_theta == c.rope_theta and c4.torch_dtype == "bfloat16"
    both = cfg("llama3", attention_bias=True, mlp_bias=True)
    assert both.qkv_bias and both.o_bias and both.mlp_bias
    no_rope = cfg("llama3", rope_parameters=None)
    assert no_rope.rope_theta == 10000.0 and no_rope.rope_scaling == ()
    assert cfg("llama3", head_dim=None, hidden_size=96, num_attention_heads=4).head_dim == 24


def test_rope_variants():
    lin = cfg("llama3", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    assert dict(lin.rope_scaling)["factor"] == 2.0 and dict(lin.rope_scaling)["rope_type"] == "linear"
    dyn = dict(cfg("llama3", rope_parameters={"rope_type": "dynamic", "factor": 2.0}).rope_scaling)
    assert dyn["max_position_embeddings"] == 256
    y = dict(cfg("qwen3", rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                           "original_max_position_embeddings": 64}).rope_scaling)
    assert (y["beta_fast"], y["beta_slow"], y["truncate"], y["factor"]) == (32.0, 1.0, True, 4.0)
    y2 = dict(cfg("qwen3", rope_parameters={"rope_type": "yarn", "original_max_position_embeddings": 64}).rope_scaling)
    assert y2["factor"] == 4.0                                              # 5.x: max_pos / omax = 256/64
    with pytest.raises(ConfigError, match="rope_type"):
        cfg("llama3", rope_parameters={"rope_type": "mrope", "rope_theta": 1e4})
    with pytest.raises(ConfigError, match="factor"):
        cfg("llama3", rope_parameters={"rope_type": "linear"})
    with pytest.raises(ConfigError, match="rope_theta"):
        cfg("llama3", rope_parameters={"rope_type": "default", "rope_theta": -5.0})


def test_mistral_window_all_layers():
    c = cfg("mistral")
    assert c.sliding_window == 4 and [c.window_for_layer(i) for i in range(2)] == [4, 4]
    assert c.norm_eps == 1e-6 and not c.qkv_bias and not c.o_bias
    assert cfg("mistral", sliding_window=None).window_for_layer(0) is None
    d = dict(V5["mistral"])
    del d["sliding_window"]
    assert config_from_dict(d, SRC).sliding_window == 4096                  # HF default when absent


def test_mixtral():
    c = cfg("mixtral")
    assert (c.mlp, c.num_experts, c.experts_per_token, c.moe_intermediate_size) == ("moe", 4, 2, 96)
    assert c.router_order == "softmax_topk" and c.norm_topk_prob and c.rope_theta == 1e6 and c.head_dim == 16
    assert c.window_for_layer(0) is None and c.is_moe_layer(1)
    d = dict(V5["mixtral"])
    d["num_experts"] = d.pop("num_local_experts")
    del d["rope_parameters"]
    assert config_from_dict(d, SRC).num_experts == 4 and config_from_dict(d, SRC).rope_theta == 1e6


def test_qwen2_window_rule():
    c = cfg("qwen2")
    assert c.qkv_bias and not c.o_bias and c.tie_word_embeddings
    assert [c.window_for_layer(i) for i in range(2)] == [None, 4]
    d = dict(V5["qwen2"], num_hidden_layers=4, max_window_layers=2)
    del d["layer_types"]                                    # derived: layers i >= max_window_layers slide
    c = config_from_dict(d, SRC)
    assert [c.window_for_layer(i) for i in range(4)] == [None, None, 4, 4]
    null = cfg("qwen2", sliding_window=None)                 # HF keeps null: no window on any layer
    assert null.sliding_window is None and null.layer_types == ("full", "full")
    off = cfg("qwen2", use_sliding_window=False)
    assert off.sliding_window is None and [off.window_for_layer(i) for i in range(2)] == [None, None]


def test_qwen3_and_head_dim_default():
    c = cfg("qwen3")
    assert c.qk_norm and c.head_dim == 32 and not c.qkv_bias and c.tie_word_embeddings
    d = dict(V5["qwen3"])
    del d["head_dim"]
    assert config_from_dict(d, SRC).head_dim == 128                         # Qwen3 default, not H/nh
    assert cfg("qwen3", attention_bias=True).o_bias


def test_qwen3_moe_layers_and_keys():
    c = cfg("qwen3_moe")
    assert c.qk_norm and c.mlp == "moe" and c.num_experts == 8 and c.moe_intermediate_size == 32
    assert c.norm_topk_prob and c.mlp_layer_types == ("moe", "dense")
    assert c.is_moe_layer(0) and not c.is_moe_layer(1)
    d = dict(V5["qwen3_moe"], num_hidden_layers=4, mlp_only_layers=[], decoder_sparse_step=2)
    d["num_experts"] = d.pop("num_local_experts")                           # the 4.x key
    del d["norm_topk_prob"]
    c = config_from_dict(d, SRC)
    assert c.mlp_layer_types == ("dense", "moe", "dense", "moe") and c.norm_topk_prob is False
    d2 = dict(V5["qwen3_moe"])
    del d2["head_dim"]
    assert config_from_dict(d2, SRC).head_dim == 16                          # H/nh, unlike dense Qwen3
    with pytest.raises(ConfigError, match="decoder_sparse_step"):
        cfg("qwen3_moe", decoder_sparse_step=0)
    with pytest.raises(ConfigError, match="disagree"):
        cfg("qwen3_moe", num_experts=4)


def test_phi3_longrope_and_partial_rotary():
    c = cfg("phi3")
    s = dict(c.rope_scaling)
    assert s["rope_type"] == "longrope" and s["original_max_position_embeddings"] == 64
    assert s["short_factor"] == (1, 1.1, 1.2, 1.5, 2, 3, 4, 5) and len(s["long_factor"]) == 8
    assert c.sliding_window == 8 and c.window_for_layer(1) == 8 and c.rotary_dim is None
    assert c.eos_token_ids == () and c.bos_token_id == 1                     # 32000 >= vocab
    p = cfg("phi3", rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5})
    assert p.rotary_dim == 8 and p.rope_scaling == ()
    legacy = dict(V5["phi3"])
    del legacy["rope_parameters"]
    legacy.update(rope_theta=10000.0, rope_scaling={"type": "su", "short_factor": [1] * 8, "long_factor": [2] * 8})
    assert dict(config_from_dict(legacy, SRC).rope_scaling)["rope_type"] == "longrope"
    with pytest.raises(ConfigError, match="short_factor"):
        cfg("phi3", rope_parameters={"rope_type": "longrope", "short_factor": [1] * 3, "long_factor": [1] * 8})


def test_gemma():
    c = cfg("gemma")
    assert c.norm_offset == 1.0 and c.embedding_scale == pytest.approx(8.0) and c.activation == "gelu_tanh"
    assert c.tie_word_embeddings and c.num_kv_heads == 1 and c.head_dim == 16 and c.mlp == "swiglu"
    assert cfg("gemma", hidden_act="gelu").activation == "gelu_tanh"         # 5.x rewrites legacy "gelu"
    d = dict(V5["gemma"])
    del d["head_dim"]
    assert config_from_dict(d, SRC).head_dim == 256


def test_gpt_oss_hf():
    c = cfg("gpt_oss")
    s = dict(c.rope_scaling)
    assert (c.mlp, c.expert_activation, c.router_order) == ("moe", "clamped_swiglu", "topk_softmax")
    assert c.attention_sinks and c.qkv_bias and c.o_bias and not c.tie_word_embeddings
    assert c.layer_types == ("sliding", "full") and c.sliding_window == 128
    yarn = (s["rope_type"], s["factor"], s["beta_fast"], s["beta_slow"], s["truncate"])
    assert yarn == ("yarn", 32.0, 32.0, 1.0, False)
    assert c.rope_theta == 150000.0 and c.swiglu_limit == 7.0 and c.swiglu_alpha == 1.702
    assert (c.num_experts, c.experts_per_token, c.moe_intermediate_size) == (4, 2, 128)
    d = dict(V5["gpt_oss"])
    del d["layer_types"]
    c2 = config_from_dict(dict(d, num_hidden_layers=4), SRC)
    assert c2.layer_types == ("sliding", "full", "sliding", "full")         # even layers slide
    assert cfg("gpt_oss", sliding_window=None).layer_types == ("full", "full")
    with pytest.raises(ConfigError, match="nested"):
        cfg("gpt_oss", rope_parameters={"full_attention": {"rope_type": "default"}})


def test_gpt_oss_original_20b():
    c = config_from_dict(dict(GPTOSS_20B_ORIGINAL), "original/config.json")
    s = dict(c.rope_scaling)
    assert c.checkpoint_layout == "gptoss_original" and c.family == "gpt_oss"
    assert (c.num_layers, c.num_experts, c.experts_per_token, c.vocab_size) == (24, 32, 4, 201088)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size) == (64, 8, 64, 2880)
    assert c.max_position_embeddings == 131072
    assert s == {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                 "original_max_position_embeddings": 4096, "max_position_embeddings": 131072}
    assert c.layer_types[:4] == ("sliding", "full", "sliding", "full") and c.sliding_window == 128
    assert c.eos_token_ids == (200002, 199999, 200012) and c.bos_token_id == 199998
    assert c.attention_sinks and c.router_order == "topk_softmax" and c.expert_activation == "clamped_swiglu"
    swapped = config_from_dict(dict(GPTOSS_20B_ORIGINAL, rope_ntk_alpha=2, rope_ntk_beta=16), SRC)
    assert dict(swapped.rope_scaling)["beta_slow"] == 2.0 and dict(swapped.rope_scaling)["beta_fast"] == 16.0
    with pytest.raises(ConfigError, match="unknown keys"):
        config_from_dict(dict(GPTOSS_20B_ORIGINAL, bogus=1), SRC)


def test_architectures_fallback_and_unknown():
    d = dict(V5["llama3"])
    del d["model_type"]
    d["architectures"] = ["LlamaForCausalLM"]
    assert config_from_dict(d, SRC).family == "llama"
    with pytest.raises(ConfigError, match="model_type"):
        cfg("llama3", model_type="bert")
    with pytest.raises(ConfigError, match="architectures"):
        config_from_dict({"architectures": ["BertModel"]}, SRC)
    with pytest.raises(ConfigError, match="cannot tell"):
        config_from_dict({"hidden_size": 4}, SRC)


def test_load_config_merges_generation_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(V5["llama3"], vocab_size=300)))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7, 5000], "pad_token_id": 3}))
    c = load_config(tmp_path)
    assert c.eos_token_ids == (2, 7) and c.pad_token_id == 3 and c.bos_token_id == 1
    assert dict(c.extra)["source"] == os.path.join(str(tmp_path), "config.json")
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": "x"}')
    with pytest.raises(ConfigError, match="generation_config.json.*eos_token_id"):
        load_config(tmp_path)


def test_load_config_layouts(tmp_path):
    orig = tmp_path / "original"
    orig.mkdir()
    (orig / "config.json").write_text(json.dumps(GPTOSS_20B_ORIGINAL))
    (orig / "model.safetensors").write_bytes(b"")
    assert load_config(tmp_path).checkpoint_layout == "gptoss_original"    # only original/ has weights
    (tmp_path / "config.json").write_text(json.dumps(V5["gpt_oss"]))
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert load_config(tmp_path).checkpoint_layout == "hf"                 # HF weights at the top win
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(empty)
    with pytest.raises(ConfigError, match="not a model directory"):
        load_config(tmp_path / "nope")


def test_model_config_validation_direct():
    ok = dict(family="llama", vocab_size=10, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
              head_dim=4, intermediate_size=16, max_position_embeddings=32)
    ModelConfig(**ok)
    bad = [dict(num_layers=True), dict(norm_eps=math.nan), dict(norm_eps=0.0), dict(rope_theta=math.inf),
           dict(sliding_window=0), dict(num_layers=4097), dict(vocab_size=2**24 + 1), dict(hidden_size=2**17 + 1),
           dict(max_position_embeddings=2**24 + 1), dict(mlp="relu_mlp"), dict(eos_token_ids=(10,)),
           dict(layer_types=("sliding",)), dict(mlp="moe"), dict(rotary_dim=3), dict(qk_norm=1),
           dict(num_heads=3, num_kv_heads=2), dict(bos_token_id=-1), dict(attn_scale=-1.0)]
    for change in bad:
        with pytest.raises(ConfigError):
            ModelConfig(**dict(ok, **change))
    assert ModelConfig(**dict(ok, eos_token_ids=[1, 2])).eos_token_ids == (1, 2)


def test_gpt_oss_120b_published_hf_config():
    """The 4.55-era HF config.json of gpt-oss-120b as listed in the gpt-oss facts, section 1.3."""
    d = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "attention_bias": True,
         "attention_dropout": 0.0, "eos_token_id": 200002, "pad_token_id": 199999, "experts_per_token": 4,
         "num_experts_per_tok": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
         "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
         "layer_types": ["sliding_attention", "full_attention"] * 18, "max_position_embeddings": 131072,
         "num_attention_heads": 64, "num_hidden_layers": 36, "num_key_value_heads": 8, "num_local_experts": 128,
         "output_router_logits": False, "rms_norm_eps": 1e-05,
         "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                          "original_max_position_embeddings": 4096, "truncate": False},
         "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
         "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True,
         "vocab_size": 201088, "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
             "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}}
    c = config_from_dict(d, SRC)
    assert (c.num_layers, c.num_experts, c.experts_per_token, c.head_dim, c.num_kv_heads) == (36, 128, 4, 64, 8)
    assert c.eos_token_ids == (200002,) and c.pad_token_id == 199999 and dict(c.extra)["quantization"] == "mxfp4"
    assert c.window_for_layer(0) == 128 and c.window_for_layer(35) is None and c.rope_theta == 150000.0
    s = dict(c.rope_scaling)
    assert s["truncate"] is False and s["original_max_position_embeddings"] == 4096 and s["factor"] == 32.0
    merged = merge_generation_config(c, {"bos_token_id": 199998, "eos_token_id": [200002, 199999, 200012],
                                         "pad_token_id": 199999}, "gen.json")
    assert merged.eos_token_ids == (200002, 199999, 200012) and merged.bos_token_id == 199998
