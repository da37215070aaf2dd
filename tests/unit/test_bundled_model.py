"""The bundled Austen model (gptevo/data/austen): files, gpt-oss layout, loading, generation.

The layout checks read the safetensors header and config.json directly (struct + json), so they do
not depend on gptevo's own readers; the expected names and shapes come from the real gpt-oss HF
checkpoint (facts: HF names of §4, MXFP4 layout of §3). Loading and generation use the public API.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

import gptevo

DATA = Path(gptevo.__file__).parent / "data" / "austen"
FILES = ("config.json", "generation_config.json", "tokenizer.json", "model.safetensors")
# A held-out sentence: the opening of Persuasion, which the model never saw in training.
HELDOUT = ("Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own "
           "amusement, never took up any book but the Baronetage")


def _config() -> dict:
    return json.loads((DATA / "config.json").read_text())


def _header() -> dict:
    with open(DATA / "model.safetensors", "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    return tokenizers.Tokenizer.from_file(str(DATA / "tokenizer.json"))


def test_files_exist_and_fit_in_10_mb():
    for name in FILES:
        assert (DATA / name).is_file(), f"missing bundled file {name}"
    total = sum(p.stat().st_size for p in DATA.iterdir() if p.is_file())
    assert total <= 10 * 1024 * 1024, f"bundled model is {total} bytes, more than 10 MiB"


def test_config_is_gpt_oss_with_required_features():
    c = _config()
    assert c["model_type"] == "gpt_oss" and c["architectures"] == ["GptOssForCausalLM"]
    assert c["num_local_experts"] >= 4
    assert 1 <= c["num_experts_per_tok"] < c["num_local_experts"]
    assert c["experts_per_token"] == c["num_experts_per_tok"]
    assert c["quantization_config"]["quant_method"] == "mxfp4"
    assert c["num_key_value_heads"] < c["num_attention_heads"]                  # GQA
    assert c["num_attention_heads"] % c["num_key_value_heads"] == 0
    L = c["num_hidden_layers"]
    assert L >= 2 and c["sliding_window"] > 0
    assert c["layer_types"] == ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(L)]
    assert c["attention_bias"] is True and c["tie_word_embeddings"] is False
    rs = c["rope_scaling"]
    assert rs["rope_type"] == "yarn" and rs["truncate"] is False and rs["factor"] > 1
    assert c["hidden_size"] % 32 == 0 and c["intermediate_size"] % 32 == 0      # MXFP4 blocks of 32


def test_config_keys_match_the_real_gpt_oss_config():
    # The key set of the released gpt-oss HF config.json (facts §1.3), plus torch_dtype.
    real = {"architectures", "attention_bias", "attention_dropout", "eos_token_id", "pad_token_id",
            "experts_per_token", "num_experts_per_tok", "head_dim", "hidden_act", "hidden_size",
            "initial_context_length", "initializer_range", "intermediate_size", "layer_types",
            "max_position_embeddings", "model_type", "num_attention_heads", "num_hidden_layers",
            "num_key_value_heads", "num_local_experts", "output_router_logits", "rms_norm_eps",
            "rope_scaling", "rope_theta", "router_aux_loss_coef", "sliding_window", "swiglu_limit",
            "tie_word_embeddings", "transformers_version", "use_cache", "vocab_size", "quantization_config"}
    assert set(_config()) - {"torch_dtype"} == real


def test_tensors_follow_the_hf_gpt_oss_layout():
    c, h = _config(), _header()
    D, V, L = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    H, G, Dh = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    E, I = c["num_local_experts"], c["intermediate_size"]
    want = {"model.embed_tokens.weight": ("BF16", [V, D]), "lm_head.weight": ("BF16", [V, D]),
            "model.norm.weight": ("BF16", [D])}
    for i in range(L):
        p = f"model.layers.{i}."
        want.update({
            p + "input_layernorm.weight": ("BF16", [D]),
            p + "post_attention_layernorm.weight": ("BF16", [D]),
            p + "self_attn.q_proj.weight": ("BF16", [H * Dh, D]), p + "self_attn.q_proj.bias": ("BF16", [H * Dh]),
            p + "self_attn.k_proj.weight": ("BF16", [G * Dh, D]), p + "self_attn.k_proj.bias": ("BF16", [G * Dh]),
            p + "self_attn.v_proj.weight": ("BF16", [G * Dh, D]), p + "self_attn.v_proj.bias": ("BF16", [G * Dh]),
            p + "self_attn.o_proj.weight": ("BF16", [D, H * Dh]), p + "self_attn.o_proj.bias": ("BF16", [D]),
            p + "self_attn.sinks": ("BF16", [H]),
            p + "mlp.router.weight": ("BF16", [E, D]), p + "mlp.router.bias": ("BF16", [E]),
            p + "mlp.experts.gate_up_proj_blocks": ("U8", [E, 2 * I, D // 32, 16]),
            p + "mlp.experts.gate_up_proj_scales": ("U8", [E, 2 * I, D // 32]),
            p + "mlp.experts.gate_up_proj_bias": ("BF16", [E, 2 * I]),
            p + "mlp.experts.down_proj_blocks": ("U8", [E, D, I // 32, 16]),
            p + "mlp.experts.down_proj_scales": ("U8", [E, D, I // 32]),
            p + "mlp.experts.down_proj_bias": ("BF16", [E, D]),
        })
    assert set(h) == set(want)
    for name, (dtype, shape) in want.items():
        assert (h[name]["dtype"], h[name]["shape"]) == (dtype, shape), name


def test_mxfp4_scales_are_finite_e8m0():
    from safetensors import safe_open

    with safe_open(str(DATA / "model.safetensors"), framework="np") as f:   # U8 only: numpy has no bf16
        scales = {n: f.get_tensor(n) for n in f.keys() if n.endswith("_scales")}
    assert scales
    for name, a in scales.items():
        assert a.max() < 0xFF, f"{name} holds the E8M0 NaN code 0xFF"
        assert a.min() > 127 - 40, f"{name} has implausibly small scales"   # |w| >> 2**-40


def test_tokenizer_and_special_ids():
    tok, c = _tokenizer(), _config()
    gen = json.loads((DATA / "generation_config.json").read_text())
    assert tok.get_vocab_size() == c["vocab_size"]
    assert tok.id_to_token(c["eos_token_id"]) == "<|endoftext|>"
    assert c["eos_token_id"] in gen["eos_token_id"]
    assert tok.id_to_token(gen["bos_token_id"]) == "<|startoftext|>"
    text = 'It is a truth universally acknowledged, said Mr. Darcy\'s "friend".\nYes.'
    assert tok.decode(tok.encode(text).ids) == text                               # byte-level round trip


@pytest.fixture(scope="module")
def model():
    pytest.importorskip("gptevo.model", reason="gptevo.model (the loader) is not available yet")
    return gptevo.load(str(DATA))


def test_loads_and_scores_austen_better_than_shuffled(model):
    tok, c = _tokenizer(), _config()
    ids = tok.encode(HELDOUT).ids
    logits = np.asarray(model.logits(ids), dtype=np.float64)
    assert logits.shape == (len(ids), c["vocab_size"]) and np.isfinite(logits).all()

    def mean_nll(seq):
        z = np.asarray(model.logits(seq), dtype=np.float64)[:-1]
        z = z - z.max(-1, keepdims=True)
        lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        return -lp[np.arange(len(seq) - 1), seq[1:]].mean()

    nll = mean_nll(ids)
    shuffled = list(np.random.default_rng(0).permutation(ids))
    assert nll < np.log(c["vocab_size"]) - 1.0                                  # far better than uniform
    assert nll < mean_nll(shuffled) - 0.5                                        # word order matters


def test_greedy_generation_is_deterministic(model):
    try:
        from gptevo.generation import generate  # noqa: F401
    except ImportError:
        pytest.skip("gptevo.generate is not available yet (gptevo/generation.py missing)")
    tok = _tokenizer()
    prompt = tok.encode("It is a truth universally acknowledged").ids
    a = gptevo.generate(model, prompt, max_new_tokens=20, temperature=0.0)
    b = gptevo.generate(model, prompt, max_new_tokens=20, temperature=0.0)
    assert list(a) == list(b)
    assert 1 <= len(a) <= 20 and all(0 <= int(i) < tok.get_vocab_size() for i in a)
    # Greedy decoding of the full sequence must pick the argmax at every step.
    seq = list(prompt) + [int(i) for i in a]
    z = np.asarray(model.logits(seq[:-1]))
    assert [int(i) for i in z[len(prompt) - 1:].argmax(-1)] == seq[len(prompt):]
