"""tools/make_synthetic_checkpoint.py: tiny variants of every model load in gptevo with sane logits;
sharding, determinism, value ranges, bf16 rounding and the full-size tensor lists (checked against
gptevo's layouts, parameter counts of the published models)."""
from __future__ import annotations

import importlib.util
import io
import json
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import gptevo
from gptevo.errors import CheckpointError, RequestError

TOOL = Path(__file__).resolve().parents[2] / "tools" / "make_synthetic_checkpoint.py"
_spec = importlib.util.spec_from_file_location("make_synthetic_checkpoint", TOOL)
msc = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = msc
_spec.loader.exec_module(msc)


def make(tmp_path, model, **kw):
    return msc.make_checkpoint(tmp_path / model, model, tiny=True, stream=io.StringIO(), **kw)


@pytest.mark.parametrize("model", msc.MODELS)
def test_tiny_loads_with_sane_logits(tmp_path, model):
    path = make(tmp_path, model)
    m = gptevo.load(path, backend="reference")
    logits = m.logits(list(range(1, 17)))                                  # [16, V]
    assert np.isfinite(logits).all()
    assert 0.05 < float(logits.std()) < 10.0
    assert len(set(logits.argmax(-1).tolist())) > 4                       # not one token everywhere
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] in ("gpt2", "llama", "gpt_oss") and (path / "generation_config.json").is_file()


def test_sharded_with_index_and_gpt_oss_names(tmp_path):
    path = make(tmp_path, "gpt-oss-20b", shard_bytes=40_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in path.glob("*.safetensors"))
    n = len(files)
    assert n >= 3 and files[0] == f"model-00000-of-{n - 1:05d}.safetensors"   # the release's off-by-one
    assert set(index["weight_map"].values()) == set(files)
    specs = msc.tensor_list(msc.model_config("gpt-oss-20b", tiny=True))
    assert set(index["weight_map"]) == {s.name for s in specs}
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs)
    gptevo.load(path, backend="reference").logits([1, 2, 3])


def test_llama_shards_are_one_based(tmp_path):
    path = make(tmp_path, "llama-3-1b", shard_bytes=50_000)
    files = sorted(p.name for p in path.glob("*.safetensors"))
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"


def test_values_deterministic_and_in_range(tmp_path):
    from safetensors.numpy import load_file

    a = load_file(str(make(tmp_path / "a", "gpt-oss-20b", seed=3) / "model.safetensors"))
    b = load_file(str(make(tmp_path / "b", "gpt-oss-20b", seed=3) / "model.safetensors"))
    c = load_file(str(make(tmp_path / "c", "gpt-oss-20b", seed=4) / "model.safetensors"))
    name = "model.layers.0.mlp.experts.gate_up_proj_scales"
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a[name], c[name])
    assert a[name].min() >= 118 and a[name].max() <= 122 and len(np.unique(a[name])) == 5
    blocks = a["model.layers.0.mlp.experts.down_proj_blocks"]
    assert blocks.dtype == np.uint8 and len(np.unique(blocks)) > 200
    q = a["model.layers.0.self_attn.q_proj.weight"].astype(np.float32)
    assert q.dtype == np.float32 and abs(float(q.std()) - msc.STD) < 0.003 and (q != 0).mean() > 0.99
    assert np.all(a["model.layers.1.input_layernorm.weight"].astype(np.float32) == 1.0)


def test_bf16_rounding_matches_ml_dtypes():
    spec = msc.TensorSpec("x", (10_000,), "bfloat16", std=3.0)
    raw = b"".join(msc.tensor_chunks(spec, 0))
    got = np.frombuffer(raw, dtype=ml_dtypes.bfloat16)
    x = np.random.default_rng([0, msc.zlib.crc32(b"x")]).standard_normal(10_000, dtype=np.float32) * np.float32(3.0)
    assert np.array_equal(got.view(np.uint16), x.astype(ml_dtypes.bfloat16).view(np.uint16))


def test_gpt2_byte_level_tokenizer_runs_in_gptevo(tmp_path):
    from gptevo.tokenizer import load_tokenizer

    path = make(tmp_path, "gpt2-124m")
    tok = load_tokenizer(path, vocab_size=257)
    ids = tok.encode("Hello, world")
    assert ids == list(b"Hello, world") and tok.decode(ids) == "Hello, world"
    assert tok.token_to_id("<|endoftext|>") == 256


def test_full_size_tensor_lists_match_published_counts():
    count = lambda m: sum(s.numel for s in msc.tensor_list(msc.model_config(m)))  # noqa: E731
    assert count("gpt2-124m") == 124_439_808                                # GPT-2 small (tied)
    assert count("llama-3-1b") == 1_235_814_400                             # Llama-3.2-1B (tied)
    specs = msc.tensor_list(msc.model_config("gpt-oss-20b"))
    blocks = [s for s in specs if s.name.endswith("gate_up_proj_blocks")]
    assert len(blocks) == 24 and blocks[0].shape == (32, 5760, 90, 16)
    assert 13.7e9 < sum(s.nbytes for s in specs) < 13.8e9                   # the release is 13.8 GB
    assert len(msc.tensor_list(msc.model_config("gpt-oss-120b"))) == 36 * 19 + 3


def test_layout_check_catches_a_wrong_shape():
    cfg = msc.model_config("gpt2-124m", tiny=True)
    specs = msc.gpt2_tensors(cfg)
    specs[0] = msc.TensorSpec(specs[0].name, (1, 1), "float32")
    with pytest.raises(CheckpointError, match="transformer.wte.weight"):
        msc.check_against_layout(cfg, specs)


def test_refuses_unknown_model_and_non_empty_dir(tmp_path):
    with pytest.raises(RequestError, match="unknown model"):
        msc.make_checkpoint(tmp_path / "x", "gpt-5")
    make(tmp_path, "gpt2-124m")
    with pytest.raises(RequestError, match="already holds"):
        make(tmp_path, "gpt2-124m")


def test_command_line(tmp_path, capsys):
    assert msc.main([str(tmp_path / "m"), "--model", "llama-3-1b", "--tiny", "--seed", "1"]) == 0
    assert "wrote 1 safetensors file(s)" in capsys.readouterr().err
    assert msc.main([str(tmp_path / "m"), "--model", "llama-3-1b", "--tiny"]) == 2
