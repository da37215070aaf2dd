"""One hand-built bad input per row of the reliability facts, section 4: group A (safetensors
container), group E (files, shards, paths) and group C (config.json). Each must raise our error
class with a message naming the problem, never a bare KeyError/ValueError/struct.error or a crash.
"""
import json
import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from _st_writer import assemble, build, write
from gptevo.checkpoint import Checkpoint
from gptevo.config_adapters import config_from_dict, load_config
from gptevo.errors import ConfigError, FormatError
from gptevo.safetensors_reader import SafetensorsFile

F32_4 = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}


def bad(tmp_path, content: bytes, match: str, name="bad.safetensors"):
    path = write(tmp_path / name, content)
    with pytest.raises(FormatError, match=match):
        SafetensorsFile(path)


# -- A. safetensors container ----------------------------------------------------------------------
@pytest.mark.parametrize("size", range(8))
def test_a1_short_file(tmp_path, size):
    bad(tmp_path, b"\x01" * size, "header too small")


def test_a2_header_length_past_eof(tmp_path):
    bad(tmp_path, struct.pack("<Q", 1000) + b"{" + b" " * 191, "invalid header length")


@pytest.mark.parametrize("n", [2**63, 2**64 - 1, 100_000_001])
def test_a3_header_length_huge(tmp_path, n):
    bad(tmp_path, struct.pack("<Q", n) + b"{}", "header too large")


@pytest.mark.parametrize("header,match", [(b"\xff", "must begin with"), (b'{"\xff": 1}', "UTF-8 at byte 2"),
                                          (b"{", "line 1 column 2"),
                                          (b"[]", "must begin with"), (b'{"a": [1, 2]} x', "invalid JSON"),
                                          (b"  {}", "must begin with"), (b"{}\x00\x00", "invalid JSON"),
                                          (b'"str"', "must begin with")])
def test_a4_not_utf8_json_or_object(tmp_path, header, match):
    bad(tmp_path, assemble(header, pad=False), match)


@pytest.mark.parametrize("header,match", [
    ('{"a": NaN}', "NaN"), ('{"a": Infinity}', "Infinity"), ('{"a": -Infinity}', "Infinity"),
    ('{"a": 1e999}', "overflows"), ('{"a": ' + "9" * 5000 + "}", "invalid JSON"),
    ("{" + '"a":' * 0 + '"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "nesting|invalid JSON"),
])
def test_a5_non_standard_json(tmp_path, header, match):
    bad(tmp_path, assemble(header), match)


def test_a6_duplicate_tensor_key(tmp_path):
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    bad(tmp_path, assemble('{"a": %s, "a": %s}' % (entry, entry), b"\0" * 4), "duplicate key 'a'")
    bad(tmp_path, assemble('{"__metadata__": {}, "__metadata__": {}}'), "duplicate key '__metadata__'")


@pytest.mark.parametrize("b_offsets", [[0, 16], [8, 24]])
def test_a7_overlapping_offsets(tmp_path, b_offsets):
    header = dict(F32_4, b={"dtype": "F32", "shape": [4], "data_offsets": b_offsets})
    bad(tmp_path, assemble(header, b"\0" * 24), "overlaps|unindexed|not fully covered")


def test_a8_hole_and_trailing_bytes(tmp_path):
    hole = dict(F32_4, b={"dtype": "F32", "shape": [1], "data_offsets": [20, 24]})
    bad(tmp_path, assemble(hole, b"\0" * 24), "unindexed bytes after tensor 'a'")
    bad(tmp_path, assemble(F32_4, b"\0" * 16 + b"PK\x03\x04 polyglot"), "not fully covered")
    late = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}
    bad(tmp_path, assemble(late, b"\0" * 8), "at the start of the data section")


def test_a9_truncated_data(tmp_path):
    bad(tmp_path, assemble(F32_4, b"\0" * 10), "truncated")


@pytest.mark.parametrize("offsets", [[16, 0], [-4, 12], [0.0, 16.0], [0, 8, 16], [0], "0-16", [False, True],
                                     None, [0, 2**70]])
def test_a10_bad_offset_values(tmp_path, offsets):
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": offsets}}
    bad(tmp_path, assemble(header, b"\0" * 16), "data_offsets")


def test_a11_size_not_shape_times_dtype(tmp_path):
    header = {"x": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}}
    bad(tmp_path, assemble(header, b"\0" * 16), r"tensor 'x'.*needs 20 bytes.*hold 16")


@pytest.mark.parametrize("shape", [[2, 2**63], [2**62, 8], [2**64 - 2, 2], [2**40, 2**40, 2**40]])
def test_a12_shape_product_overflow(tmp_path, shape):
    header = {"x": {"dtype": "F32", "shape": shape, "data_offsets": [0, 16]}}
    bad(tmp_path, assemble(header, b"\0" * 16), "needs")


@pytest.mark.parametrize("shape", [[True, 4], [4.0], [-1, 4], ["4"], 4, [1] * 9])
def test_a12_bad_shape_values(tmp_path, shape):
    header = {"x": {"dtype": "F32", "shape": shape, "data_offsets": [0, 16]}}
    bad(tmp_path, assemble(header, b"\0" * 16), "shape")


@pytest.mark.parametrize("dtype", ["F128", "f32", "F6_E2M3", "F4", "F8_E8M0", "C64", "U16", 3, None])
def test_a13_unknown_dtype(tmp_path, dtype):
    header = {"x": {"dtype": dtype, "shape": [4], "data_offsets": [0, 16]}}
    bad(tmp_path, assemble(header, b"\0" * 16), "unsupported dtype")


@pytest.mark.parametrize("meta", [{"k": 1}, {"k": {"nested": "x"}}, ["a"], "text", {"k": None}])
def test_a14_metadata_abuse(tmp_path, meta):
    bad(tmp_path, assemble({"__metadata__": meta}), "__metadata__")


def test_a14_huge_metadata_string(tmp_path):
    bad(tmp_path, assemble({"__metadata__": {"k": "x" * 16_000_001}}), "more than")


def test_a14_extra_field_and_empty_name(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16], "x": 1}}
    bad(tmp_path, assemble(header, b"\0" * 16), "unexpected")
    bad(tmp_path, assemble({"": F32_4["a"]}, b"\0" * 16), "non-empty")


@pytest.mark.parametrize("mode", ["mmap", "read"])
def test_a15_file_truncated_after_open_no_sigbus(tmp_path, mode):
    """Run in a subprocess: a SIGBUS there is a failed test, not a dead test run."""
    path = write(tmp_path / "m.safetensors", build({"big": np.ones(1 << 16, np.float32)}))
    code = f"""
import os, sys
from gptevo.safetensors_reader import SafetensorsFile
from gptevo.errors import FormatError
f = SafetensorsFile({str(path)!r}, mode={mode!r})
os.truncate({str(path)!r}, 100)
try:
    f.get("big").sum()
except FormatError as e:
    print("FormatError:", e)
    sys.exit(0)
sys.exit(3)
"""
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, (res.returncode, res.stdout, res.stderr)
    assert "changed size" in res.stdout or "shrank" in res.stdout


def test_a15_file_replaced_by_rename_keeps_old_bytes(tmp_path):
    path = write(tmp_path / "m.safetensors", build({"x": np.array([1.0, 2.0], np.float32)}))
    f = SafetensorsFile(path)
    write(tmp_path / "new.safetensors", build({"x": np.array([9.0, 9.0], np.float32)}))
    os.replace(tmp_path / "new.safetensors", path)
    assert f.get("x").tolist() == [1.0, 2.0]


def test_a16_misaligned_data_loads_correctly(tmp_path):
    header = {"p": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "x": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]}}
    path = write(tmp_path / "m.safetensors", assemble(header, b"\x00" + np.array([1.5, -3.0], np.float32).tobytes()))
    x = SafetensorsFile(path).get("x")
    assert x.flags.aligned and x.tolist() == [1.5, -3.0]


def test_not_a_regular_file(tmp_path):
    with pytest.raises(FormatError, match="regular file"):
        SafetensorsFile(tmp_path)
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(FormatError, match="regular file"):     # would block forever if opened
        SafetensorsFile(fifo)


# -- E. files, shards, paths -----------------------------------------------------------------------
def _index(tmp_path, weight_map):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("shard", ["../x.safetensors", "../../x.safetensors", "/etc/passwd", "sub/x.safetensors",
                                   "..", "x.bin", "", 5, "a\\b.safetensors"])
def test_e1_shard_path_traversal(tmp_path, shard):
    _index(tmp_path, {"w": shard})
    with pytest.raises(FormatError, match="weight_map"):
        Checkpoint(tmp_path)


def test_e1_symlink_out_of_directory(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    write(outside / "secret.safetensors", build({"w": np.zeros(1, np.float32)}))
    model = tmp_path / "model"
    model.mkdir()
    os.symlink(outside / "secret.safetensors", model / "s1.safetensors")
    _index(model, {"w": "s1.safetensors"})
    with pytest.raises(FormatError, match="outside the model directory"):
        Checkpoint(model)


def test_e1_single_file_symlink_out_of_directory(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    write(outside / "secret.safetensors", build({"w": np.zeros(1, np.float32)}))
    model = tmp_path / "model"
    model.mkdir()
    os.symlink(outside / "secret.safetensors", model / "model.safetensors")
    with pytest.raises(FormatError, match="outside the model directory"):
        Checkpoint(model)


def test_e2_index_and_shards_disagree(tmp_path):
    write(tmp_path / "s1.safetensors", build({"a": np.zeros(1, np.float32)}))
    write(tmp_path / "s2.safetensors", build({"b": np.zeros(1, np.float32)}))
    _index(tmp_path, {"a": "s1.safetensors", "b": "s1.safetensors"})
    with pytest.raises(FormatError, match="'b' in 's1.safetensors'.*in 's2.safetensors'|does not contain"):
        Checkpoint(tmp_path)
    _index(tmp_path, {"a": "s1.safetensors", "b": "s3.safetensors"})
    with pytest.raises(FormatError, match="does not exist"):
        Checkpoint(tmp_path)
    _index(tmp_path, {"a": "s1.safetensors"})                     # s1 fine; s2 not referenced
    assert Checkpoint(tmp_path).names() == ["a"]
    write(tmp_path / "s1.safetensors", build({"a": np.zeros(1, np.float32), "z": np.zeros(1, np.float32)}))
    with pytest.raises(FormatError, match="does not list"):
        Checkpoint(tmp_path)
    for content in ('{"weight_map": {}}', "[]", '{"weight_map": {"a": "s1.safetensors"}, "metadata": 3}', "{"):
        (tmp_path / "model.safetensors.index.json").write_text(content)
        with pytest.raises(FormatError):
            Checkpoint(tmp_path)


def test_b8_same_tensor_in_two_shards(tmp_path):
    write(tmp_path / "s1.safetensors", build({"a": np.zeros(1, np.float32)}))
    write(tmp_path / "s2.safetensors", build({"a": np.ones(1, np.float32), "b": np.zeros(1, np.float32)}))
    _index(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors"})
    with pytest.raises(FormatError, match="tensor 'a' is in two shards"):
        Checkpoint(tmp_path)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"])
def test_e3_pickle_formats_refused_never_unpickled(tmp_path, name):
    marker = tmp_path / "PWNED"
    payload = (b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")   # protocol-0 pickle: os.system
    (tmp_path / name).write_bytes(payload)
    with pytest.raises(FormatError, match="pickle checkpoints are refused; convert to safetensors"):
        Checkpoint(tmp_path)
    assert not marker.exists()


# -- C. config.json --------------------------------------------------------------------------------
LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 256,
         "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "vocab_size": 128}


@pytest.mark.parametrize("value", ["36", -1, None, True, 2.0, [2], 0])
def test_c1_bad_hyperparameter_types(value):
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        config_from_dict(dict(LLAMA, num_hidden_layers=value), "cfg.json")


@pytest.mark.parametrize("key,value", [("num_hidden_layers", 10**9), ("vocab_size", 2**40),
                                       ("max_position_embeddings", 2**40), ("hidden_size", 10**400),
                                       ("intermediate_size", 2**40), ("num_attention_heads", 2**33)])
def test_c2_allocation_bomb_sizes(key, value):
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=key):
        config_from_dict(dict(LLAMA, **{key: value}), "cfg.json")
    assert time.perf_counter() - t0 < 1.0                      # rejected before building anything per layer


def test_c2_bomb_in_gpt_oss_original_and_qwen2_window_layers():
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        config_from_dict({"num_experts": 4, "experts_per_token": 2, "num_hidden_layers": 10**12}, "c.json")
    with pytest.raises(ConfigError):
        config_from_dict(dict(LLAMA, model_type="qwen2", use_sliding_window=True, max_window_layers=10**30),
                         "c.json")


@pytest.mark.parametrize("changes,match", [({"num_key_value_heads": 3}, "num_key_value_heads"),
                                           ({"num_attention_heads": 5}, "num_attention_heads")])
def test_c3_inconsistent_heads(changes, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(dict(LLAMA, **changes), "cfg.json")


def test_c4_code_references_ignored_never_imported(tmp_path):
    marker = tmp_path / "IMPORTED"
    (tmp_path / "evil_modeling.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    cfg = dict(LLAMA, auto_map={"AutoModelForCausalLM": "evil_modeling.EvilModel"}, trust_remote_code=True)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    c = load_config(tmp_path)
    assert c.family == "llama" and dict(c.extra).get("ignored_remote_code") is True
    assert not marker.exists() and "evil_modeling" not in sys.modules


@pytest.mark.parametrize("changes,match", [
    ({"rope_theta": float("nan")}, "rope_theta"), ({"rope_theta": float("inf")}, "rope_theta"),
    ({"rms_norm_eps": -1}, "rms_norm_eps"), ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
    ({"model_type": "mistral", "sliding_window": 0}, "sliding_window"),
    ({"rope_scaling": {"rope_type": "linear", "factor": float("nan")}}, "factor"),
])
def test_c5_non_finite_or_non_positive_floats(changes, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(dict(LLAMA, **changes), "cfg.json")


@pytest.mark.parametrize("text,match", [('{"rope_theta": NaN}', "NaN"), ('{"a": 1, "a": 2}', "duplicate"),
                                        ('{"rope_theta": 1e999}', "overflows"), ("[1, 2]", "JSON object")])
def test_c5_config_json_text_is_strict(tmp_path, text, match):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(tmp_path)
