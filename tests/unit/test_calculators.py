"""Known answers for gptevo.calculators: published parameter counts and hand-computed bytes.

Expected values come from published figures (gpt-oss README via facts/gptoss.md §1.1, GPT-2 small,
Llama-2-7B, Mixtral-8x7B) or from sums written out by hand in this file from the tensor shapes in
facts/gptoss.md §4 and facts/hf_families.md, never from the calculators themselves.
"""
import pytest
from hypothesis import given, strategies as st

from gptevo.calculators import (active_parameters, bytes_per_token, kv_cache_bytes, parameter_count,
                                weight_memory)
from gptevo.config import ModelConfig
from gptevo.errors import ConfigError, GptevoError, RequestError

B = 10 ** 9


def gpt_oss(layers, experts):
    """gpt-oss-20b (24, 32) / 120b (36, 128) as in facts/gptoss.md §1.1."""
    return ModelConfig(
        family="gpt_oss", vocab_size=201088, hidden_size=2880, num_layers=layers, num_heads=64,
        num_kv_heads=8, head_dim=64, intermediate_size=2880, max_position_embeddings=131072,
        norm="rmsnorm", position="rope", rope_theta=150000.0, qkv_bias=True, o_bias=True,
        sliding_window=128, layer_types=tuple("sliding" if i % 2 == 0 else "full" for i in range(layers)),
        attention_sinks=True, mlp="moe", mlp_bias=True, num_experts=experts, experts_per_token=4,
        moe_intermediate_size=2880, router_order="topk_softmax", expert_activation="clamped_swiglu",
        tie_word_embeddings=False)


GPT2_SMALL = ModelConfig(
    family="gpt2", vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12,
    head_dim=64, intermediate_size=3072, max_position_embeddings=1024, norm="layernorm",
    position="learned", mlp="gelu", activation="gelu_tanh", qkv_bias=True, o_bias=True, mlp_bias=True,
    tie_word_embeddings=True)

LLAMA2_7B = ModelConfig(
    family="llama", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
    head_dim=128, intermediate_size=11008, max_position_embeddings=4096, norm="rmsnorm", mlp="swiglu",
    tie_word_embeddings=False)

MIXTRAL_8X7B = ModelConfig(
    family="mixtral", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
    head_dim=128, intermediate_size=14336, max_position_embeddings=32768, rope_theta=1e6, mlp="moe",
    num_experts=8, experts_per_token=2, moe_intermediate_size=14336, tie_word_embeddings=False)


def gpt_oss_tensor_sum(layers, experts):
    """Parameters of gpt-oss summed by hand from the tensor table of facts/gptoss.md §4."""
    per_layer = (2880                                  # attn.norm.scale
                 + 5120 * 2880 + 5120                  # attn.qkv weight, bias
                 + 64                                  # attn.sinks
                 + 2880 * 4096 + 2880                  # attn.out weight, bias
                 + 2880                                # mlp.norm.scale
                 + experts * 2880 + experts            # mlp.gate (router) weight, bias
                 + experts * 5760 * 2880               # mlp1_weight (dequantized)
                 + experts * 5760                      # mlp1_bias
                 + experts * 2880 * 2880               # mlp2_weight
                 + experts * 2880)                     # mlp2_bias
    return 201088 * 2880 + layers * per_layer + 2880 + 201088 * 2880   # + embedding, norm, unembedding


# ---- published parameter counts -------------------------------------------------------------

@pytest.mark.parametrize("layers,experts,total_b,active_b", [(24, 32, 20.91, 3.61), (36, 128, 116.83, 5.13)])
def test_gpt_oss_total_and_active_match_readme(layers, experts, total_b, active_b):
    cfg = gpt_oss(layers, experts)
    total = parameter_count(cfg)["total"]
    assert total == gpt_oss_tensor_sum(layers, experts)
    assert abs(total - total_b * B) <= 0.01 * B
    assert abs(active_parameters(cfg) - active_b * B) <= 0.01 * B


def test_gpt_oss_active_is_total_minus_idle_experts_and_embedding():
    cfg = gpt_oss(24, 32)
    per_expert = 5760 * 2880 + 5760 + 2880 * 2880 + 2880
    expected = gpt_oss_tensor_sum(24, 32) - 201088 * 2880 - 24 * (32 - 4) * per_expert
    assert active_parameters(cfg) == expected
    assert active_parameters(cfg, count_embedding=True) == expected + 201088 * 2880
    assert parameter_count(cfg)["per_expert"] == per_expert


def test_gpt2_small_is_124439808_with_tied_head():
    pc = parameter_count(GPT2_SMALL)
    assert pc["total"] == 124_439_808
    assert pc["head"] == 0
    assert pc["embedding"] == 50257 * 768
    assert pc["position"] == 1024 * 768
    assert pc["attention_per_layer"] == (768 * 2304 + 2304) + (768 * 768 + 768)   # c_attn + c_proj
    assert pc["mlp_per_layer"] == (768 * 3072 + 3072) + (3072 * 768 + 768)        # c_fc + c_proj
    assert pc["norms_per_layer"] == 2 * 2 * 768                                    # ln_1, ln_2 (w, b)
    assert pc["norms"] == 12 * 4 * 768 + 2 * 768                                   # + ln_f


def test_gpt2_untied_adds_one_table():
    untied = GPT2_SMALL.replace(tie_word_embeddings=False)
    assert parameter_count(untied)["total"] == 124_439_808 + 50257 * 768


def test_llama2_7b_is_6738415616():
    pc = parameter_count(LLAMA2_7B)
    assert pc["total"] == 6_738_415_616
    assert pc["head"] == 32000 * 4096
    assert active_parameters(LLAMA2_7B, count_embedding=True) == 6_738_415_616
    assert active_parameters(LLAMA2_7B) == 6_738_415_616 - 32000 * 4096


def test_mixtral_8x7b_total_46_7b_active_12_9b():
    """Mistral AI: 46.7B total, 12.9B used per token (that figure counts the embedding table too)."""
    assert round(parameter_count(MIXTRAL_8X7B)["total"] / 1e8) == 467
    assert round(active_parameters(MIXTRAL_8X7B, count_embedding=True) / 1e8) == 129
    assert parameter_count(MIXTRAL_8X7B)["router_per_layer"] == 8 * 4096      # no router bias


# ---- flags: each adds exactly its tensors -------------------------------------------------

def small(**kw):
    base = dict(family="llama", vocab_size=97, hidden_size=24, num_layers=3, num_heads=4, num_kv_heads=2,
                head_dim=8, intermediate_size=40, max_position_embeddings=64)
    base.update(kw)
    return ModelConfig(**base)


def test_each_flag_adds_its_tensors():
    base = parameter_count(small())["total"]
    L, D, H, G, Dh, I = 3, 24, 4, 2, 8, 40
    assert base == 2 * 97 * D + L * (D * H * Dh * 2 + 2 * D * G * Dh + 3 * D * I + 2 * D) + D
    assert parameter_count(small(qkv_bias=True))["total"] - base == L * (H + 2 * G) * Dh
    assert parameter_count(small(o_bias=True))["total"] - base == L * D
    assert parameter_count(small(qk_norm=True))["total"] - base == L * 2 * Dh
    assert parameter_count(small(attention_sinks=True))["total"] - base == L * H
    assert parameter_count(small(mlp_bias=True))["total"] - base == L * (2 * I + D)
    assert parameter_count(small(norm="layernorm"))["total"] - base == (2 * L + 1) * D
    assert parameter_count(small(tie_word_embeddings=True))["total"] - base == -97 * D
    assert parameter_count(small(position="learned"))["total"] - base == 64 * D
    assert parameter_count(small(mlp="gelu"))["total"] - base == -L * I * D


def test_moe_router_bias_follows_mlp_bias_and_active_grows_by_one_expert():
    cfg = small(mlp="moe", num_experts=6, experts_per_token=2, moe_intermediate_size=16)
    L, D, I = 3, 24, 16
    pc = parameter_count(cfg)
    assert pc["router"] == L * 6 * D
    assert pc["mlp"] == L * 6 * (2 * I * D + D * I)
    assert parameter_count(cfg.replace(mlp_bias=True))["router"] == L * (6 * D + 6)
    one_more = active_parameters(cfg.replace(experts_per_token=3)) - active_parameters(cfg)
    assert one_more == L * (2 * I * D + D * I)


def test_dense_layers_of_a_moe_model():
    """Qwen3-MoE style: mlp_layer_types marks layer 1 dense (a gated MLP of intermediate_size)."""
    cfg = small(mlp="moe", num_experts=6, experts_per_token=2, moe_intermediate_size=16,
                mlp_layer_types=("moe", "dense", "moe"), qk_norm=True)
    D, I, Ie = 24, 40, 16
    pc = parameter_count(cfg)
    assert pc["mlp"] == 2 * 6 * (3 * D * Ie) + 3 * D * I
    assert pc["router"] == 2 * 6 * D
    assert pc["moe_layers"] == 2 and "mlp_per_layer" not in pc
    assert active_parameters(cfg) == pc["total"] - 97 * D - 2 * 4 * (3 * D * Ie)


@given(layers=st.integers(1, 4), heads_per_kv=st.integers(1, 3), kv=st.integers(1, 3),
       head_dim=st.sampled_from([4, 8, 12]), tied=st.booleans(), moe=st.booleans(),
       dtype=st.sampled_from(["float32", "float16", "bfloat16", "int8"]))
def test_dense_dtypes_scale_bytes_by_element_size(layers, heads_per_kv, kv, head_dim, tied, moe, dtype):
    extra = dict(mlp="moe", num_experts=4, experts_per_token=2, moe_intermediate_size=8) if moe else {}
    cfg = small(num_layers=layers, num_heads=heads_per_kv * kv, num_kv_heads=kv, head_dim=head_dim,
                tie_word_embeddings=tied, qkv_bias=True, **extra)
    total = parameter_count(cfg)["total"]
    size = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}[dtype]
    if dtype == "int8":   # vectors (norm scales, biases) stay bf16
        vectors = (2 * layers + 1) * 24 + layers * (heads_per_kv * kv + 2 * kv) * head_dim
        assert weight_memory(cfg, dtype) == (total - vectors) + 2 * vectors
    else:
        assert weight_memory(cfg, dtype) == size * total
    assert active_parameters(cfg) <= total + (97 * 24 if tied else 0)


# ---- memory ----------------------------------------------------------------------------------

def test_gpt_oss_20b_mxfp4_checkpoint_size():
    """Experts in MXFP4 (17 bytes per 32 values), the rest bf16: about 13.8 GB (facts/gptoss.md §4)."""
    cfg = gpt_oss(24, 32)
    expert_bytes = 24 * 32 * (5760 * 90 * 17 + 2880 * 90 * 17)          # blocks [E,5760,90,16] + scales
    expert_weights = 24 * 32 * (5760 * 2880 + 2880 * 2880)
    expected = expert_bytes + 2 * (gpt_oss_tensor_sum(24, 32) - expert_weights)
    got = weight_memory(cfg, "mxfp4", experts_only=True)
    assert got == expected
    assert abs(got - 13.8e9) <= 0.1e9
    assert weight_memory(cfg, "bfloat16") == 2 * gpt_oss_tensor_sum(24, 32)


def test_mxfp4_pads_a_partial_block():
    cfg = small(hidden_size=40, mlp="moe", num_experts=2, experts_per_token=1, moe_intermediate_size=33,
                num_layers=1)
    # expert gate_up [66, 40] -> 2 blocks per row; down [40, 33] -> 2 blocks per row
    expert_bytes = 2 * (66 * 2 * 17 + 40 * 2 * 17)
    rest = parameter_count(cfg)["total"] - 2 * (66 * 40 + 40 * 33)
    assert weight_memory(cfg, "mxfp4", experts_only=True) == expert_bytes + 2 * rest


def test_kv_cache_small_config_by_hand():
    cfg = small(num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8, sliding_window=3,
                layer_types=("sliding", "full", "sliding", "full"))
    per_pos = 2 * 2 * 8 * 2                                   # K and V, 2 heads, 8 dims, bf16
    assert kv_cache_bytes(cfg, 5) == 2 * per_pos * 5 + 2 * per_pos * 3
    assert kv_cache_bytes(cfg, 5, capped=False) == 4 * per_pos * 5
    assert kv_cache_bytes(cfg, 2) == 4 * per_pos * 2           # below the window nothing is capped
    assert kv_cache_bytes(cfg, 5, dtype="float32") == 2 * kv_cache_bytes(cfg, 5)
    assert kv_cache_bytes(cfg, 0) == 0
    every_layer = cfg.replace(layer_types=())                  # Mistral style: all layers slide
    assert kv_cache_bytes(every_layer, 5) == 4 * per_pos * 3


def test_gpt_oss_20b_kv_cache_at_2048_tokens():
    cfg = gpt_oss(24, 32)
    per_layer_pos = 2 * 8 * 64 * 2
    assert kv_cache_bytes(cfg, 2048) == (12 * 2048 + 12 * 128) * per_layer_pos     # 51 MiB
    assert kv_cache_bytes(cfg, 2048, capped=False) == 24 * 2048 * per_layer_pos     # 96 MiB


def test_bytes_per_token_llama_bf16():
    D = 4096
    weights = 2 * (6_738_415_616 - 32000 * D) + 2 * D       # all but the table, plus one embedding row
    kv = 32 * 2 * 32 * 128 * 2 * 100
    assert bytes_per_token(LLAMA2_7B, "bfloat16", context_tokens=100) == weights + kv


def test_bytes_per_token_gpt2_tied_reads_table_once_as_head():
    D = 768
    weights = 2 * (124_439_808 - 1024 * D) + 2 * D          # table (as head) + one position row
    assert bytes_per_token(GPT2_SMALL, "float16") == weights + 2 * D


# ---- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda: kv_cache_bytes(LLAMA2_7B, -1),
    lambda: kv_cache_bytes(LLAMA2_7B, 3, dtype="mxfp4"),
    lambda: weight_memory(LLAMA2_7B, "float8"),
    lambda: bytes_per_token(LLAMA2_7B, "bfloat16", context_tokens=1.5),
])
def test_bad_arguments_raise_request_error(call):
    with pytest.raises(RequestError):
        call()


@pytest.mark.parametrize("changes", [
    dict(mlp="moe", num_experts=0),
    dict(mlp="moe", num_experts=4, experts_per_token=5),
    dict(norm="batchnorm"),
    dict(position="xpos"),
    dict(sliding_window=0),
])
def test_bad_configs_raise_config_error(changes):
    with pytest.raises(ConfigError) as info:
        parameter_count(small(**changes))
    assert isinstance(info.value, GptevoError)
