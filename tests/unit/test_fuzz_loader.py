"""Hypothesis fuzzing of the loaders: mutated safetensors bytes, mutated header fields, mutated shard
indexes and mutated config dicts. Whatever the input, only GptevoError subclasses may escape.

Each example runs a batch of mutations, so the CI profile's 25 examples per test still cover a few
hundred inputs (tools/fuzz_loader.py runs many thousands, optionally in subprocesses).
"""
import atexit
import json
import os
import shutil
import tempfile

import ml_dtypes
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from _st_writer import assemble, build, layout
from gptevo.checkpoint import Checkpoint
from gptevo.config import ModelConfig
from gptevo.config_adapters import config_from_dict
from gptevo.errors import ConfigError, GptevoError
from gptevo.safetensors_reader import SafetensorsFile
from gptevo.strict_json import loads_strict

ARRAYS = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, dtype=ml_dtypes.bfloat16),
          "c": np.arange(32, dtype=np.uint8).reshape(2, 16), "d": np.array(7, dtype=np.int64),
          "e": np.array([True, False])}
HEADER, DATA = layout(ARRAYS)
VALID = build(ARRAYS, metadata={"format": "np"})
TMP = tempfile.mkdtemp(prefix="gptevo-fuzz-")
atexit.register(shutil.rmtree, TMP, ignore_errors=True)
CAP = min(200, settings.default.max_examples)      # the profile decides; 200 only caps "thorough"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([0, 1, 4, 16, 2**63, -1])
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
    | st.sampled_from(["F32", "BF16", "U8", "f32", "F4", "__metadata__"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10)


def load_all(content: bytes, name="f.safetensors") -> None:
    path = os.path.join(TMP, name)
    with open(path, "wb") as f:
        f.write(content)
    try:
        for mode in ("mmap", "read"):
            with SafetensorsFile(path, mode=mode) as sf:
                for n in sf.names():
                    sf.info(n)
                    sf.get(n)
    except GptevoError:
        pass


byte_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, len(VALID) - 1), st.integers(0, 255)),
    st.tuples(st.just("cut"), st.integers(0, len(VALID)), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, len(VALID)), st.integers(0, 255)),
    st.tuples(st.just("length"), st.integers(0, 2**64 - 1), st.just(0)),
)


def apply(m) -> bytes:
    kind, pos, val = m
    b = bytearray(VALID)
    if kind == "flip":
        b[pos] = val
    elif kind == "cut":
        del b[pos:]
    elif kind == "insert":
        b[pos:pos] = bytes([val])
    else:
        b[0:8] = pos.to_bytes(8, "little")
    return bytes(b)


@settings(max_examples=CAP)
@given(st.lists(byte_mutation, min_size=1, max_size=10))
def test_mutated_bytes_raise_only_our_errors(mutations):
    for m in mutations:
        load_all(apply(m))


@settings(max_examples=CAP)
@given(st.lists(st.tuples(st.sampled_from(sorted(HEADER) + ["__metadata__", "new"]),
                          st.sampled_from(["dtype", "shape", "data_offsets", "extra", None]), json_values),
                min_size=1, max_size=8))
def test_mutated_header_fields_raise_only_our_errors(mutations):
    for tensor, field, value in mutations:
        header = json.loads(json.dumps(HEADER))
        if field is None:
            header[tensor] = value
        else:
            header.setdefault(tensor, {})
            if isinstance(header[tensor], dict):
                header[tensor][field] = value
        load_all(assemble(json.dumps(header, allow_nan=True), DATA))


@settings(max_examples=CAP)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "zz", ""]), json_values), min_size=1, max_size=6))
def test_mutated_shard_index_raises_only_our_errors(entries):
    d = tempfile.mkdtemp(dir=TMP)
    with open(os.path.join(d, "s1.safetensors"), "wb") as f:
        f.write(build({"a": np.zeros(2, np.float32)}))
    with open(os.path.join(d, "s2.safetensors"), "wb") as f:
        f.write(build({"b": np.zeros(2, np.float32)}))
    for tensor, shard in entries:
        wm = {"a": "s1.safetensors", "b": "s2.safetensors", tensor: shard}
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"weight_map": wm}, f, allow_nan=True)
        try:
            ck = Checkpoint(d)
            for n in ck.names():
                ck.get(n)
        except GptevoError:
            pass


CONFIGS = [
    {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 256,
     "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "vocab_size": 128,
     "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
    {"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": 128, "vocab_size": 128},
    {"model_type": "qwen3_moe", "hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 256,
     "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "vocab_size": 128,
     "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "mlp_only_layers": [1],
     "use_sliding_window": True, "sliding_window": 4},
    {"model_type": "phi3", "hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 256,
     "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 128, "partial_rotary_factor": 0.5,
     "rope_scaling": {"type": "longrope", "short_factor": [1] * 4, "long_factor": [2] * 4}},
    {"model_type": "gpt_oss", "hidden_size": 64, "intermediate_size": 64, "max_position_embeddings": 256,
     "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "vocab_size": 128,
     "num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16,
     "layer_types": ["sliding_attention", "full_attention"]},
    {"num_hidden_layers": 2, "num_experts": 4, "experts_per_token": 2, "vocab_size": 128, "hidden_size": 64,
     "intermediate_size": 64, "head_dim": 16, "num_attention_heads": 4, "num_key_value_heads": 2},
]
NESTED = {"rope_parameters.rope_type", "rope_parameters.factor", "rope_parameters.rope_theta",
          "rope_scaling.type", "rope_scaling.short_factor", "rope_parameters.truncate",
          "rope_parameters.original_max_position_embeddings", "rope_parameters.beta_fast"}
CONFIG_KEYS = sorted({k for c in CONFIGS for k in c} | NESTED | {
    "model_type", "architectures", "rope_theta", "rms_norm_eps", "sliding_window", "eos_token_id",
    "layer_types", "head_dim", "partial_rotary_factor", "decoder_sparse_step"})


@settings(max_examples=CAP)
@given(st.integers(0, len(CONFIGS) - 1),
       st.lists(st.tuples(st.sampled_from(CONFIG_KEYS), json_values | st.none(), st.booleans()),
                min_size=1, max_size=8))
def test_mutated_configs_raise_only_config_errors(which, mutations):
    for key, value, delete in mutations:
        d = json.loads(json.dumps(CONFIGS[which]))
        target = d
        if "." in key:
            outer, key = key.split(".")
            target = d.setdefault(outer, {})
        if delete:
            target.pop(key, None)
        else:
            target[key] = value
        try:
            c = config_from_dict(loads_strict(json.dumps(d, allow_nan=True), "fuzz.json", ConfigError), "fuzz.json")
        except ConfigError:
            continue
        assert isinstance(c, ModelConfig)
