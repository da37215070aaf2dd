"""Group B of the reliability facts, section 4 (tensor semantics and MXFP4): one test per row, on tiny
checkpoints written here (HF Llama-like, HF gpt-oss with MXFP4 experts, original gpt-oss, Mixtral).

Rows: B1 missing tensor, B2 extra tensors, B3 shape mismatch with the config, B4 wrong dtype for a role,
B5 MXFP4 blocks/scales mismatch, B6 E8M0 scale extremes, B7 non-finite weights, B9 degenerate shapes
(B8, a tensor in two shards, is in test_hostile_container.py). Only GptevoError subclasses may escape,
and each message names the file or tensor, what was found and what was expected. Expected overflow
and NaN facts are re-derived here from the E2M1 table (tests/_builders/tiny_models.decode_mxfp4), never from gptevo.
"""
import json
import os
import subprocess
import sys
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import gptevo
from _st_writer import assemble, build, layout as st_layout, write as write_bytes
from gptevo import weights as weights_module
from gptevo.checkpoint import Checkpoint
from gptevo.config_adapters import config_from_dict, load_config
from gptevo.errors import CheckpointError, FormatError, GptevoError, NumericalError, RequestError
from gptevo.model import Model
from _builders.tiny_models import (decode_mxfp4, gptoss_original_tensors, hf_tensors, make_roles, quantize_experts,
                                   store_dtype)

LLAMA_CFG = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
             "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
             "tie_word_embeddings": False, "hidden_act": "silu"}
GPTOSS_CFG = {"model_type": "gpt_oss", "attention_bias": True, "head_dim": 8, "hidden_size": 32,
              "intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
              "num_local_experts": 4, "num_experts_per_tok": 2, "vocab_size": 64, "max_position_embeddings": 64,
              "rms_norm_eps": 1e-5, "rope_theta": 150000.0, "sliding_window": 3,
              "layer_types": ["sliding_attention", "full_attention"], "swiglu_limit": 1.5,
              "tie_word_embeddings": False}
GPTOSS_ORIGINAL_CFG = {"num_hidden_layers": 2, "num_experts": 4, "experts_per_token": 2, "vocab_size": 64,
                       "hidden_size": 32, "intermediate_size": 32, "swiglu_limit": 1.5, "head_dim": 8,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 3,
                       "initial_context_length": 64, "rope_theta": 150000.0, "rope_scaling_factor": 1.0,
                       "rope_ntk_alpha": 1.0, "rope_ntk_beta": 32.0}
MIXTRAL_CFG = {"model_type": "mixtral", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 24,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
               "max_position_embeddings": 64, "num_local_experts": 4, "num_experts_per_tok": 2,
               "tie_word_embeddings": False}
IDS = [3, 17, 42, 5, 9, 60, 1, 33]
F32_MAX = float(np.finfo(np.float32).max)
HF_X = "model.layers.{i}.mlp.experts."


# -- tiny checkpoint builder --------------------------------------------------------------------------
def tensors_for(cfg: dict, dtype=np.float32, seed=0, form="hf", **kw) -> dict:
    """Tensor name -> array (floats stored as ``dtype``, MXFP4 bytes as uint8 copies)."""
    c = config_from_dict(cfg, "test config")
    roles = store_dtype(make_roles(c, seed), dtype)
    if c.family == "gpt_oss":
        roles = quantize_experts(roles)
    t = gptoss_original_tensors(roles) if form == "original" else hf_tensors(c, roles, **kw)
    return {k: v.copy() if v.dtype == np.uint8 else np.asarray(v).astype(dtype) for k, v in t.items()}


def write_dir(tmp_path, name: str, cfg: dict, tensors: dict, original: bool = False) -> str:
    """<tmp>/<name>/ with config.json and model.safetensors (in original/ for the gpt-oss original form)."""
    root = os.path.join(str(tmp_path), name)
    d = os.path.join(root, "original") if original else root
    os.makedirs(d, exist_ok=True)
    write_bytes(os.path.join(d, "model.safetensors"), build(tensors))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    return root


def make(tmp_path, cfg=LLAMA_CFG, mutate=None, name="m", dtype=np.float32, form="hf", **kw) -> str:
    t = tensors_for(cfg, dtype=dtype, form=form, **kw)
    if mutate is not None:
        mutate(t)
    return write_dir(tmp_path, name, cfg, t, original=form == "original")


class Spy(Checkpoint):
    """A Checkpoint that records which tensors' data was read."""

    def __init__(self, path, **kw):
        super().__init__(path, **kw)
        self.read: list[str] = []

    def get(self, name):
        self.read.append(name)
        return super().get(name)


def spy_load(d: str, **kw):
    """(outcome, spy): build the model from a Spy checkpoint; outcome is the Model or the GptevoError."""
    spy = Spy(d)
    try:
        return Model.from_checkpoint(load_config(d), spy, **kw), spy
    except GptevoError as exc:
        return exc, spy


# -- B1 missing tensor ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg,form,name", [
    (LLAMA_CFG, "hf", "model.layers.1.mlp.up_proj.weight"),
    (LLAMA_CFG, "hf", "model.embed_tokens.weight"),
    (LLAMA_CFG, "hf", "model.norm.weight"),
    (LLAMA_CFG, "hf", "lm_head.weight"),
    (GPTOSS_CFG, "hf", "model.layers.0.self_attn.sinks"),
    (GPTOSS_CFG, "hf", "model.layers.1.mlp.experts.gate_up_proj_scales"),
    (GPTOSS_CFG, "hf", "model.layers.0.mlp.experts.down_proj_blocks"),
    (GPTOSS_CFG, "hf", "model.layers.1.mlp.router.bias"),
    (GPTOSS_ORIGINAL_CFG, "original", "block.1.mlp.mlp1_weight.scales"),
    (GPTOSS_ORIGINAL_CFG, "original", "block.0.attn.qkv.bias"),
])
def test_b1_missing_tensor_is_named_never_initialised(tmp_path, cfg, form, name):
    d = make(tmp_path, cfg, mutate=lambda t: t.pop(name), form=form)
    with pytest.raises(CheckpointError, match=r"lacks tensor '" + name.replace(".", r"\.") + "'"):
        gptevo.load(d)
    outcome, spy = spy_load(d)
    assert isinstance(outcome, CheckpointError) and spy.read == []     # nothing read before the error


# -- B2 extra tensors -----------------------------------------------------------------------------------
def test_b2_extra_tensors_are_listed_and_never_read(tmp_path):
    extras = {
        "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32),
        # a BOOL byte 2 raises FormatError if read, NaN fails check_weights if scanned: neither may happen
        "zz.flags": np.array([0, 2, 1], np.uint8).view(np.bool_),
        "zz.nan": np.full((3, 2), np.nan, np.float32),
        "zz.empty_huge": np.zeros((0, 5), np.float32),
    }
    d = make(tmp_path, mutate=lambda t: t.update(extras))
    plain = gptevo.load(make(tmp_path, name="plain"))
    model = gptevo.load(d, check_weights=True)
    assert model.unused_tensors == sorted(extras)
    assert np.array_equal(model.logits(IDS), plain.logits(IDS))
    model, spy = spy_load(d, check_weights=True)
    assert isinstance(model, Model) and not set(spy.read) & set(extras)


# -- B3 shape mismatch with the config -------------------------------------------------------------------
@pytest.mark.parametrize("cfg,name,shape,expected", [
    (LLAMA_CFG, "model.layers.1.self_attn.k_proj.weight", (16, 33), [16, 32]),
    (LLAMA_CFG, "model.embed_tokens.weight", (64, 33), [64, 32]),
    (LLAMA_CFG, "model.layers.0.mlp.down_proj.weight", (32, 47), [32, 48]),
    (LLAMA_CFG, "model.layers.0.input_layernorm.weight", (33,), [32]),
    (GPTOSS_CFG, "model.layers.0.self_attn.sinks", (5,), [4]),
    (GPTOSS_CFG, "model.layers.1.mlp.experts.gate_up_proj_bias", (4, 63), [4, 64]),
    (GPTOSS_CFG, "model.layers.1.mlp.router.weight", (5, 32), [4, 32]),
])
def test_b3_shape_mismatch_names_tensor_file_and_both_shapes(tmp_path, cfg, name, shape, expected):
    def mutate(t):
        t[name] = np.zeros(shape, t[name].dtype)
    d = make(tmp_path, cfg, mutate=mutate)
    found = str(list(shape)).replace("[", r"\[").replace("]", r"\]")
    want = str(expected).replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{name}' has shape {found}, "
                                             rf"expected {want}"):
        gptevo.load(d)
    outcome, spy = spy_load(d)
    assert isinstance(outcome, CheckpointError) and spy.read == []     # header check before any read


def test_b3_config_disagreeing_with_tensors_fails_before_any_allocation(tmp_path):
    """hidden_size 2880 vs a 2881 tensor, scaled down; and an allocation-bomb config over tiny tensors."""
    d = make(tmp_path)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({**LLAMA_CFG, "hidden_size": 40, "head_dim": 10}, f)
    shape_msg = r"model\.embed_tokens\.weight' has shape \[64, 32\], expected \[64, 40\]"
    with pytest.raises(CheckpointError, match=shape_msg):
        gptevo.load(d)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({**LLAMA_CFG, "vocab_size": 2**24, "num_hidden_layers": 4096, "intermediate_size": 2**20,
                   "max_position_embeddings": 2**24}, f)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=r"lacks tensor 'model\.layers\.2\."):
            gptevo.load(d)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20, f"{peak} bytes traced before the error"   # a [2**24, 32] table is 2 GiB


# -- B4 wrong dtype for a role ---------------------------------------------------------------------------
X0 = HF_X.format(i=0)


@pytest.mark.parametrize("cfg,name,cast,found,expected", [
    (GPTOSS_CFG, X0 + "gate_up_proj_blocks", np.float32, "float32", "uint8"),
    (GPTOSS_CFG, X0 + "down_proj_scales", ml_dtypes.bfloat16, "bfloat16", "uint8"),
    (GPTOSS_CFG, X0 + "down_proj_scales", np.int8, "int8", "uint8"),
    (LLAMA_CFG, "model.embed_tokens.weight", np.int32, "int32", "float32"),
    (LLAMA_CFG, "model.layers.0.self_attn.q_proj.weight", np.uint8, "uint8", "float32"),
    (LLAMA_CFG, "model.norm.weight", np.bool_, "bool", "float32"),
    (LLAMA_CFG, "lm_head.weight", ml_dtypes.float8_e4m3fn, "float8_e4m3fn", "float32"),
])
def test_b4_wrong_dtype_for_role(tmp_path, cfg, name, cast, found, expected):
    def mutate(t):
        t[name] = np.zeros(t[name].shape, cast)
    d = make(tmp_path, cfg, mutate=mutate)
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' has dtype .*{found}.*, expected one of .*{expected}"):
        gptevo.load(d)


def test_b4_f4_where_u8_expected_is_refused_by_the_container(tmp_path):
    """An ``F4`` (or ``F8_E8M0``) tensor is refused by the safetensors reader, naming the dtype."""
    t = tensors_for(GPTOSS_CFG)
    header, data = st_layout(t)
    for key, dtype in ((X0 + "gate_up_proj_blocks", "F4"), (X0 + "gate_up_proj_scales", "F8_E8M0")):
        bad = json.loads(json.dumps(header))
        bad[key]["dtype"] = dtype
        d = os.path.join(str(tmp_path), dtype)
        os.makedirs(d)
        write_bytes(os.path.join(d, "model.safetensors"), assemble(bad, data))
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(GPTOSS_CFG, f)
        with pytest.raises(FormatError, match=rf"'{key}': unsupported dtype '{dtype}'"):
            gptevo.load(d)


def test_b4_per_expert_tensors_mixing_dtypes(tmp_path):
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"

    def mutate(t):
        t[name] = t[name].astype(ml_dtypes.bfloat16)
    d = make(tmp_path, MIXTRAL_CFG, mutate=mutate, per_expert="mixtral")
    with pytest.raises(CheckpointError, match=r"mix dtypes \['bfloat16', 'float32'\]"):
        gptevo.load(d)


# -- B5 MXFP4 blocks / scales mismatch --------------------------------------------------------------------
@pytest.mark.parametrize("form,blocks,scales,bad_shape,name,expected", [
    # scales one block longer than blocks (E=4, rows=2I=64, G=1)
    ("hf", None, (4, 64, 2), None, "scales", [4, 64, 1]),
    # blocks with 8 bytes per block instead of 16
    ("hf", (4, 64, 1, 8), None, None, "blocks", [4, 64, 1, 16]),
    # blocks and scales agree with each other (G=2) but 2*32 inputs != hidden_size 32
    ("hf", (4, 64, 2, 16), (4, 64, 2), None, "blocks", [4, 64, 1, 16]),
    # scales missing the expert axis
    ("hf", None, (64, 1), None, "scales", [4, 64, 1]),
    ("original", None, (4, 64, 3), None, "scales", [4, 64, 1]),
])
def test_b5_mxfp4_blocks_scales_mismatch(tmp_path, form, blocks, scales, bad_shape, name, expected):
    cfg = GPTOSS_ORIGINAL_CFG if form == "original" else GPTOSS_CFG
    b_name = "block.0.mlp.mlp1_weight.blocks" if form == "original" else X0 + "gate_up_proj_blocks"
    s_name = "block.0.mlp.mlp1_weight.scales" if form == "original" else X0 + "gate_up_proj_scales"

    def mutate(t):
        if blocks is not None:
            t[b_name] = np.zeros(blocks, np.uint8)
        if scales is not None:
            t[s_name] = np.full(scales, 127, np.uint8)
    d = make(tmp_path, cfg, mutate=mutate, form=form)
    named = b_name if name == "blocks" else s_name
    want = str(expected).replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(CheckpointError, match=rf"'{named}' has shape .* expected {want}"):
        gptevo.load(d)


# -- B6 E8M0 scale extremes --------------------------------------------------------------------------------
def _set_block(t, layer, which, index, scale, codes):
    """Give one MXFP4 block (``which`` = gate_up or down) a scale byte and 32 copies of 4-bit ``codes``."""
    x = HF_X.format(i=layer)
    t[x + f"{which}_proj_scales"][index] = scale
    byte = (codes & 0x0F) | ((codes & 0x0F) << 4)
    t[x + f"{which}_proj_blocks"][index] = byte


def _f32_decoded_is_finite(scale: int, code: int) -> bool:
    """Independent: decode one block in float64 with the test's own table and ask float32."""
    blocks = np.full((1, 16), (code & 0x0F) | ((code & 0x0F) << 4), np.uint8)
    if scale == 255:
        return False                                   # E8M0 NaN (OCP MX v1.0), whatever the codes
    with np.errstate(over="ignore"):
        return bool(np.isfinite(decode_mxfp4(blocks, np.array([scale], np.uint8)).astype(np.float32)).all())


@pytest.mark.parametrize("scale,code", [(255, 0), (255, 1), (254, 4), (254, 7), (254, 12), (253, 6),
                                        (253, 15)])
def test_b6_bad_scale_rejected_by_check_weights(tmp_path, scale, code):
    assert not _f32_decoded_is_finite(scale, code)
    d = make(tmp_path, GPTOSS_CFG, mutate=lambda t: _set_block(t, 1, "down", (2, 5, 0), scale, code))
    gptevo.load(d)                                     # default: not scanned (lazy); see the forward test
    which = "scales" if scale == 255 else "blocks"
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor 'model\.layers\.1\.mlp\.experts\."
                                             rf"down_proj_{which}' .*{scale}.*"):
        gptevo.load(d, check_weights=True)
    with pytest.raises(CheckpointError, match=r"\[2, 5, 0\]"):
        gptevo.load(d, check_weights=True)


@pytest.mark.parametrize("scale,code", [(254, 3), (254, 11), (253, 5), (253, 13), (252, 7), (0, 7)])
def test_b6_extreme_but_finite_scales_are_accepted(tmp_path, scale, code):
    assert _f32_decoded_is_finite(scale, code)
    d = make(tmp_path, GPTOSS_CFG, mutate=lambda t: _set_block(t, 0, "gate_up", (1, 3, 0), scale, code))
    gptevo.load(d, check_weights=True)


def test_b6_nan_scales_without_check_raise_numerical_error_in_forward(tmp_path):
    def mutate(t):
        for which in ("gate_up", "down"):
            t[HF_X.format(i=0) + f"{which}_proj_scales"][...] = 255   # every expert of layer 0: always routed
    model = gptevo.load(make(tmp_path, GPTOSS_CFG, mutate=mutate))
    with pytest.raises(NumericalError, match=r"non-finite logits.*position 0.*check_weights=True"):
        model.logits(IDS)
    with pytest.raises(NumericalError):
        gptevo.generate(model, IDS[:3], max_new_tokens=2, temperature=0)
    model.check_finite = False                         # opt out: the raw (NaN) logits are observable
    assert np.isnan(model.logits(IDS)).all()


# -- B7 non-finite weights --------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg,dtype,name,index,value", [
    (LLAMA_CFG, ml_dtypes.bfloat16, "model.embed_tokens.weight", (5, 7), np.nan),
    (LLAMA_CFG, np.float32, "model.norm.weight", (31,), np.inf),
    (LLAMA_CFG, np.float16, "model.layers.1.self_attn.v_proj.weight", (15, 0), -np.inf),
    (LLAMA_CFG, np.float32, "lm_head.weight", (63, 31), np.nan),
    (GPTOSS_CFG, ml_dtypes.bfloat16, "model.layers.1.mlp.experts.down_proj_bias", (3, 30), -np.inf),
    (GPTOSS_CFG, ml_dtypes.bfloat16, "model.layers.0.self_attn.sinks", (2,), np.nan),
])
def test_b7_non_finite_weight_found_by_check_weights(tmp_path, cfg, dtype, name, index, value):
    def mutate(t):
        t[name] = t[name].copy()
        t[name][index] = value
    d = make(tmp_path, cfg, mutate=mutate, dtype=dtype)
    want = str(list(index)).replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{name}' holds {value} at index {want}"):
        gptevo.load(d, check_weights=True)


def test_b7_per_expert_and_fused_tensors_are_scanned(tmp_path):
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"

    def mutate(t):
        t[name][31, 23] = np.inf
    d = make(tmp_path, MIXTRAL_CFG, mutate=mutate, per_expert="mixtral")
    with pytest.raises(CheckpointError, match=rf"'{name}' holds inf at index \[31, 23\]"):
        gptevo.load(d, check_weights=True)

    def fused(t):                                       # Phi-3 fused qkv: one stored tensor, three roles
        t["model.layers.0.self_attn.qkv_proj.weight"][40, 1] = np.nan
    d = make(tmp_path, name="fused", mutate=fused, phi3_fused=True)
    with pytest.raises(CheckpointError, match=r"qkv_proj\.weight' holds nan at index \[40, 1\]"):
        gptevo.load(d, check_weights=True)


def test_b7_scan_is_chunked_and_indexes_across_chunks(tmp_path, monkeypatch):
    """With 7-element chunks the NaN at flat index 8*32+9 lies in a later chunk; its index must be exact."""
    monkeypatch.setattr(weights_module, "SCAN_CHUNK", 7)
    monkeypatch.setattr(weights_module, "SCAN_BLOCKS", 5)

    def mutate(t):
        t["model.layers.1.mlp.gate_proj.weight"][8, 9] = np.nan
    d = make(tmp_path, mutate=mutate)
    with pytest.raises(CheckpointError, match=r"gate_proj\.weight' holds nan at index \[8, 9\]"):
        gptevo.load(d, check_weights=True)
    d = make(tmp_path, GPTOSS_CFG, name="oss", mutate=lambda t: _set_block(t, 1, "gate_up", (3, 63, 0), 255, 0))
    with pytest.raises(CheckpointError, match=r"255 \(E8M0 NaN\) at block \[3, 63, 0\]"):
        gptevo.load(d, check_weights=True)


def test_b7_without_check_the_forward_raises_at_the_first_poisoned_position(tmp_path):
    def mutate(t):
        t["model.embed_tokens.weight"][5, 7] = np.nan  # only token 5's row
    model = gptevo.load(make(tmp_path, mutate=mutate))
    clean = [i for i in IDS if i != 5]
    assert np.isfinite(model.logits(clean)).all()      # the NaN row is never read for these ids
    ids = [3, 17, 42, 5, 9, 60]
    # (full sequence: masked future keys still leak NaN through 0 * NaN in probs @ v, so any position)
    with pytest.raises(NumericalError, match=r"non-finite logits: nan at position \d+, vocab id"):
        model.logits(ids)
    cache = model.new_cache(16)
    assert np.isfinite(model.forward(ids[:3], cache)).all()   # token 5 not seen yet
    with pytest.raises(NumericalError, match=r"at position 3, vocab id"):
        model.forward(ids[3:], cache)
    with pytest.raises(RequestError, match="reset"):   # the poisoned cache is not reused silently
        model.forward([1], cache)


# -- B9 zero-size and degenerate shapes ----------------------------------------------------------------------
@pytest.mark.parametrize("name,shape", [
    ("model.embed_tokens.weight", (2**40, 0)),
    ("model.embed_tokens.weight", (0, 32)),
    ("model.norm.weight", ()),
    ("model.layers.0.self_attn.q_proj.weight", (32,)),
    ("model.layers.0.self_attn.q_proj.weight", (1, 32, 32)),
    ("lm_head.weight", (64, 0)),
])
def test_b9_degenerate_shapes_fail_the_expected_shape_check(tmp_path, name, shape):
    def mutate(t):
        t[name] = np.zeros(shape, np.float32)
    d = make(tmp_path, mutate=mutate)
    found = str(list(shape)).replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(CheckpointError, match=rf"'{name}' has shape {found}, expected"):
        gptevo.load(d)
    outcome, spy = spy_load(d)
    assert isinstance(outcome, CheckpointError) and spy.read == []


def test_b9_rank_above_the_cap_is_a_format_error(tmp_path):
    d = make(tmp_path, mutate=lambda t: t.__setitem__("model.norm.weight", np.zeros((1,) * 9 + (32,), np.float32)))
    with pytest.raises(FormatError, match=r"model\.norm\.weight.*at most 8"):
        gptevo.load(d)


# -- load options and a file that shrinks after load (A15 at the model level) --------------------------------
def test_load_options_are_validated():
    with pytest.raises(RequestError, match="check_weights"):
        gptevo.load("/nonexistent", check_weights="yes")
    with pytest.raises(RequestError, match="mmap"):
        gptevo.load("/nonexistent", mmap=1)


def test_file_truncated_after_load_without_mmap_keeps_working(tmp_path):
    d = make(tmp_path)
    want = gptevo.load(d).logits(IDS)
    model = gptevo.load(d, mmap=False)
    os.truncate(os.path.join(d, "model.safetensors"), 0)
    assert np.array_equal(model.logits(IDS), want)     # private copies: no SIGBUS, same numbers
    with pytest.raises(FormatError):
        gptevo.load(d)


# -- hypothesis: tensor-level mutations of whole model directories; only GptevoError may escape -------------
_BASE = {"llama": None, "gpt_oss": None}
_DTYPES = [np.float32, np.float16, np.float64, ml_dtypes.bfloat16, np.uint8, np.int8, np.int32, np.bool_]
mutation = st.tuples(
    st.sampled_from(["delete", "shape", "dtype", "nan", "scale", "extra", "rename"]),
    st.integers(0, 10**6),                                   # which tensor (mod the count)
    st.sampled_from([[], [0], [2**40, 0], [1, 1], [33], [64, 33], [4, 64, 1, 16], [4, 64, 2]]),
    st.sampled_from(_DTYPES),
    st.sampled_from([np.nan, np.inf, -np.inf, 255, 254, 253]),
)


def _base(kind):
    if _BASE[kind] is None:
        _BASE[kind] = tensors_for(GPTOSS_CFG if kind == "gpt_oss" else LLAMA_CFG,
                                  dtype=ml_dtypes.bfloat16 if kind == "gpt_oss" else np.float32)
    return _BASE[kind]


def _apply(t: dict, m) -> None:
    kind, which, shape, dtype, value = m
    name = sorted(t)[which % len(t)]
    a = t[name]
    if kind == "delete":
        del t[name]
    elif kind == "rename":
        t[name.replace("0", "1") + "x"] = t.pop(name)
    elif kind == "shape":
        t[name] = np.zeros(shape, a.dtype)
    elif kind == "dtype":
        t[name] = a.astype(dtype)
    elif kind == "extra":
        t["extra." + name] = np.zeros(shape, dtype)
    elif a.size:
        b = np.array(a)
        if kind == "scale" and b.dtype == np.uint8:
            b.reshape(-1)[which % b.size] = int(value) if np.isfinite(value) else 255
        elif kind == "nan" and (b.dtype.kind == "f" or b.dtype.name == "bfloat16"):   # NaN/inf fit floats only
            b.reshape(-1)[which % b.size] = value if not np.isfinite(value) else np.nan
        t[name] = b


@settings(max_examples=min(25, settings.default.max_examples))
@given(st.lists(st.tuples(st.sampled_from(["llama", "gpt_oss"]), st.booleans(),
                          st.lists(mutation, min_size=1, max_size=3)), min_size=8, max_size=8))
def test_mutated_model_directories_raise_only_our_errors(tmp_path_factory, cases):
    """8 mutated model directories per example (200 in the CI profile): load + logits + a cached step."""
    tmp = tmp_path_factory.mktemp("fuzz")
    for n, (kind, check, mutations) in enumerate(cases):
        t = dict(_base(kind))
        for m in mutations:
            _apply(t, m)
        d = write_dir(tmp, f"c{n}", GPTOSS_CFG if kind == "gpt_oss" else LLAMA_CFG, t)
        try:
            with np.errstate(all="ignore"):
                model = gptevo.load(d, check_weights=check)
                model.logits(IDS[:4])
                cache = model.new_cache(4)
                model.forward(IDS[:2], cache)
                model.forward(IDS[2:3], cache)
        except GptevoError as exc:
            assert str(exc), "every error carries a message"


def test_file_truncated_after_load_with_mmap_is_a_format_error_not_sigbus(tmp_path):
    """In a child process (a SIGBUS would kill it with -7, which the test reports instead of dying)."""
    d = make(tmp_path)
    script = ("import os, sys, gptevo\n"
              "m = gptevo.load(sys.argv[1])\n"
              "m.logits([1, 2])\n"
              "os.truncate(os.path.join(sys.argv[1], 'model.safetensors'), 100)\n"
              "try:\n"
              "    m.logits([1, 2])\n"
              "except gptevo.FormatError as e:\n"
              "    print('FormatError:', e)\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run([sys.executable, "-c", script, d], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": root})
    assert res.returncode == 0, f"child exited {res.returncode}: {res.stderr[-500:]}"
    assert "FormatError:" in res.stdout and "changed size" in res.stdout and "model.safetensors" in res.stdout


def test_fuzz_tool_model_target_runs_clean():
    """tools/fuzz_loader.py --target model (tensor-level mutations) on a few cases: exit 0, nothing escaped."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run([sys.executable, os.path.join(root, "tools", "fuzz_loader.py"), "-n", "60",
                          "--target", "model", "--seed", "3"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "OK: only GptevoError subclasses raised" in res.stdout and "CheckpointError" in res.stdout



def test_b5_mxfp4_input_width_not_a_multiple_of_32():
    """A config with hidden_size 48 over MXFP4 experts: blocks [E, 2I, 1, 16] and scales [E, 2I, 1] agree
    with each other and with 48 // 32 = 1 block, yet hold only 32 inputs. Refused from the headers."""
    from gptevo.layouts import Mxfp4
    from gptevo.weights import check_source

    class Headers:
        def info(self, name):
            return ("uint8", (4, 64, 1, 16)) if name.endswith("blocks") else ("uint8", (4, 64, 1))

        def get(self, name):
            raise AssertionError("data read")

    with pytest.raises(CheckpointError, match=r"'x\.blocks' is MXFP4 .* input width of 48; expected a positive "
                                             r"multiple of 32"):
        check_source(Headers(), Mxfp4("x.blocks", "x.scales", (4, 64, 48)))
    check_source(Headers(), Mxfp4("x.blocks", "x.scales", (4, 64, 32)))   # the same headers fit 32 inputs
