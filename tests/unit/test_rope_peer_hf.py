"""Peer check: our RoPE frequencies, cos/sin and rotation against Hugging Face transformers.

Optional: skipped with a reason when torch or transformers is missing. torch is imported only
through ``pytest.importorskip``. Frequencies must agree to 1 ulp (torch's float32 pow is a 1-ulp
vector routine; we round a float64 pow once), attention factors to float64 precision.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="peer test needs torch")
transformers = pytest.importorskip("transformers", reason="peer test needs transformers")

from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402

from gptevo.ops.rope import apply_rope, rope_cos_sin, rope_frequencies  # noqa: E402

pytestmark = pytest.mark.peer

SHORT = [1.0, 1.1, 1.2, 1.5, 2.0, 3.0, 4.0, 5.0]
LONG = [1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0, 16.0]
# (label, head_dim, theta, scaling, max_position_embeddings, seq_len)
RULES = [
    ("default", 64, 10000.0, {"rope_type": "default"}, 4096, None),
    ("default-odd-half", 24, 1e6, {"rope_type": "default"}, 4096, None),
    ("linear", 64, 10000.0, {"rope_type": "linear", "factor": 3.0}, 4096, None),
    ("dynamic-short", 64, 10000.0, {"rope_type": "dynamic", "factor": 2.0}, 4096, 100),
    ("dynamic-long", 64, 10000.0, {"rope_type": "dynamic", "factor": 2.0}, 4096, 9000),
    ("llama3", 128, 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, 131072, None),
    ("llama3-fixture", 16, 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, 256, None),
    ("yarn-gpt-oss", 64, 150000.0, {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                    "original_max_position_embeddings": 4096, "truncate": False}, 131072, None),
    ("yarn-truncate", 32, 1e6, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, 256, None),
    ("yarn-mscale", 64, 10000.0, {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.5,
                                  "original_max_position_embeddings": 4096}, 163840, None),
    ("longrope-short", 16, 10000.0, {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                                     "original_max_position_embeddings": 64}, 256, 12),
    ("longrope-long", 16, 10000.0, {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                                    "original_max_position_embeddings": 64}, 256, 80),
]


def hf_config(head_dim, theta, scaling, max_pos):
    kwargs = dict(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=4, head_dim=head_dim,
                  max_position_embeddings=max_pos)
    if hasattr(LlamaConfig(), "rope_parameters"):          # transformers 5.x
        return LlamaConfig(rope_parameters={**scaling, "rope_theta": theta}, **kwargs)
    rope_scaling = None if scaling["rope_type"] == "default" else dict(scaling)
    return LlamaConfig(rope_theta=theta, rope_scaling=rope_scaling, **kwargs)  # transformers 4.x


def hf_frequencies(head_dim, theta, scaling, max_pos, seq_len):
    config = hf_config(head_dim, theta, scaling, max_pos)
    rule = scaling["rope_type"]
    if rule == "default" and rule not in ROPE_INIT_FUNCTIONS:
        inv, factor = modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        inv, factor = ROPE_INIT_FUNCTIONS[rule](config, "cpu", seq_len=seq_len)
    return inv.numpy(), float(factor)


@pytest.mark.parametrize("label,head_dim,theta,scaling,max_pos,seq_len", RULES, ids=[r[0] for r in RULES])
def test_frequencies_match_hf(label, head_dim, theta, scaling, max_pos, seq_len):
    ref_inv, ref_factor = hf_frequencies(head_dim, theta, scaling, max_pos, seq_len)
    ours = dict(scaling)
    if scaling["rope_type"] in ("dynamic", "longrope", "yarn"):
        ours["max_position_embeddings"] = max_pos          # the config adapter passes it through
    inv, factor = rope_frequencies(head_dim, theta, scaling=ours, seq_len=seq_len)
    assert inv.dtype == np.float32 and inv.shape == ref_inv.shape
    np.testing.assert_array_max_ulp(inv, ref_inv.astype(np.float32), maxulp=1)
    assert (inv == ref_inv).mean() >= 0.9, f"{label}: only {(inv == ref_inv).mean():.0%} bit-equal"
    assert factor == pytest.approx(ref_factor, rel=1e-12)


def test_cos_sin_and_rotation_match_hf_float32():
    head_dim, theta = 64, 150000.0
    scaling = RULES[7][3]
    config = hf_config(head_dim, theta, scaling, 131072)
    rotary = modeling_llama.LlamaRotaryEmbedding(config=config)
    positions = np.array([0, 1, 2, 3, 127, 128, 1000, 4095])
    x = torch.randn(1, len(positions), head_dim, generator=torch.Generator().manual_seed(0))
    cos_hf, sin_hf = rotary(x, torch.tensor(positions)[None])                      # [1,T,Dh] (cat of halves)
    # use HF's own inv_freq: a 1-ulp frequency difference (checked above) times position 4095 moves
    # the angle by ~3e-5, which would hide what this test is about (the table and the rotation)
    _, factor = rope_frequencies(head_dim, theta, scaling=scaling)
    cos, sin = rope_cos_sin(positions, rotary.inv_freq.numpy(), factor)
    np.testing.assert_allclose(cos, cos_hf[0, :, :32].numpy(), rtol=0, atol=5e-7)
    np.testing.assert_allclose(sin, sin_hf[0, :, :32].numpy(), rtol=0, atol=5e-7)

    q = torch.randn(1, 3, len(positions), head_dim, generator=torch.Generator().manual_seed(1))   # [B,H,T,Dh]
    q_hf, _ = modeling_llama.apply_rotary_pos_emb(q, q, cos_hf, sin_hf)
    ours = apply_rope(q[0].permute(1, 0, 2).numpy(), cos_hf[0, :, :32].numpy(), sin_hf[0, :, :32].numpy())
    np.testing.assert_allclose(ours, q_hf[0].permute(1, 0, 2).numpy(), rtol=0, atol=1e-6)
