"""Valid safetensors files and checkpoint directories load exactly (values, dtypes, shapes, layouts)."""
import json
import mmap
import os

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _st_writer import assemble, build, layout, write
from gptevo.checkpoint import Checkpoint
from gptevo.errors import CheckpointError, FormatError
from gptevo.safetensors_reader import SafetensorsFile

RNG = np.random.default_rng(0)
ARRAYS = {
    "f32": RNG.standard_normal((3, 5)).astype(np.float32),
    "f16": RNG.standard_normal((4,)).astype(np.float16),
    "f64": np.array(2.5),                                                  # 0-rank scalar
    "bf16": RNG.standard_normal((2, 3)).astype(ml_dtypes.bfloat16),
    "e4m3": np.array([0.5, -2.0, 448.0], dtype=ml_dtypes.float8_e4m3fn),
    "e5m2": np.array([1.0, -0.25], dtype=ml_dtypes.float8_e5m2),
    "i64": np.array([-1, 2**40], dtype=np.int64), "i32": np.arange(3, dtype=np.int32),
    "i16": np.array([-7], dtype=np.int16), "i8": np.array([-128, 127], dtype=np.int8),
    "u8": np.arange(16, dtype=np.uint8).reshape(1, 16), "bool": np.array([True, False, True]),
    "empty": np.zeros((0, 4), dtype=np.float32),
}


def _mapped(a: np.ndarray) -> bool:
    while a is not None:
        if isinstance(a, mmap.mmap):
            return True
        a = getattr(a, "base", None)
    return False


@pytest.mark.parametrize("mode", ["mmap", "read"])
def test_every_dtype_round_trips(tmp_path, mode):
    path = write(tmp_path / "a.safetensors", build(ARRAYS, metadata={"format": "np"}))
    with SafetensorsFile(path, mode=mode) as f:
        assert f.names() == sorted(ARRAYS) and f.metadata == {"format": "np"}
        for name, want in ARRAYS.items():
            got = f.get(name)
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert got.tobytes() == want.tobytes(), name                               # bit-exact
            assert not got.flags.writeable
            info = f.info(name)
            assert info.shape == want.shape and info.nbytes == want.nbytes
        assert _mapped(f.get("f32")) == (mode == "mmap")


def test_reads_files_written_by_the_safetensors_package(tmp_path):
    from safetensors.numpy import save_file
    arrays = {"w": RNG.standard_normal((8, 4)).astype(np.float32), "b": np.arange(6, dtype=np.int64),
              "h": RNG.standard_normal((5,)).astype(ml_dtypes.bfloat16)}
    save_file(arrays, str(tmp_path / "m.safetensors"), metadata={"k": "v"})
    f = SafetensorsFile(tmp_path / "m.safetensors")
    for name, want in arrays.items():
        assert f.get(name).tobytes() == want.tobytes()
    assert f.metadata == {"k": "v"} and f.info("w").dtype == "F32" and f.info("h").np_dtype == want.dtype


def test_misaligned_tensor_is_an_aligned_copy(tmp_path):
    arrays = {"a_byte": np.array([7], np.uint8), "b_f32": np.array([1.5, -2.0, 3.25], np.float32)}
    header, data = layout(arrays)                       # b_f32 begins at data offset 1
    path = write(tmp_path / "m.safetensors", assemble(header, data))
    for mode in ("mmap", "read"):
        x = SafetensorsFile(path, mode=mode).get("b_f32")
        assert x.flags.aligned and x.tolist() == [1.5, -2.0, 3.25]


def test_unknown_tensor_name_is_checkpoint_error(tmp_path):
    path = write(tmp_path / "a.safetensors", build({"x": np.zeros(2, np.float32)}))
    with pytest.raises(CheckpointError, match="nope"):
        SafetensorsFile(path).get("nope")
    with pytest.raises(CheckpointError):
        SafetensorsFile(path).info(["unhashable"])


def test_bool_tensor_with_bytes_other_than_0_1(tmp_path):
    header = {"b": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}
    path = write(tmp_path / "a.safetensors", assemble(header, b"\x01\x02"))
    with pytest.raises(FormatError, match="BOOL"):
        SafetensorsFile(path).get("b")


def test_trailing_whitespace_padding_accepted(tmp_path):
    hb = json.dumps({"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}).encode() + b" \n\t  "
    path = write(tmp_path / "a.safetensors", assemble(hb, b"\x05", pad=False))
    assert SafetensorsFile(path).get("x").tolist() == [5]


@settings(max_examples=25)
@given(st.dictionaries(st.text("abc._0", min_size=1, max_size=6),
                       st.tuples(st.sampled_from(["f32", "f16", "i32", "u8", "bool", "bf16"]),
                                 st.lists(st.integers(0, 4), max_size=3)), max_size=5))
def test_property_random_valid_files_round_trip(tmp_path_factory, spec):
    dtypes = {"f32": np.float32, "f16": np.float16, "i32": np.int32, "u8": np.uint8, "bool": np.bool_,
              "bf16": ml_dtypes.bfloat16}
    arrays = {}
    for name, (dt, shape) in spec.items():
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        arrays[name] = (np.arange(n) % 2 == 1 if dt == "bool" else np.arange(n)).astype(dtypes[dt]).reshape(shape)
    path = write(tmp_path_factory.mktemp("p") / "r.safetensors", build(arrays))
    f = SafetensorsFile(path)
    assert f.names() == sorted(arrays)
    for name, want in arrays.items():
        got = f.get(name)
        assert got.shape == want.shape and got.dtype == want.dtype and np.array_equal(got, want)


# -- checkpoint directories ------------------------------------------------------------------------
def _shards(tmp_path, parts: dict[str, dict[str, np.ndarray]], weight_map=None):
    for shard, arrays in parts.items():
        write(tmp_path / shard, build(arrays))
    wm = weight_map or {t: s for s, arrays in parts.items() for t in arrays}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 1},
                                                                       "weight_map": wm}))


def test_single_file_directory_and_file_path(tmp_path):
    arrays = {"model.embed_tokens.weight": np.ones((4, 2), np.float32), "lm_head.weight": np.zeros((4, 2), np.float32)}
    write(tmp_path / "model.safetensors", build(arrays))
    for ck in (Checkpoint(tmp_path), Checkpoint(tmp_path / "model.safetensors")):
        assert ck.names() == sorted(arrays) and "lm_head.weight" in ck and len(ck) == 2
        assert ck.info("lm_head.weight").shape == (4, 2)
        assert np.array_equal(ck.get("model.embed_tokens.weight"), arrays["model.embed_tokens.weight"])
        with pytest.raises(CheckpointError):
            ck.get("missing.weight")


def test_sharded_directory(tmp_path):
    a = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}
    b = {"b.weight": np.arange(4, dtype=np.int32), "c.bias": np.ones(2, np.float16)}
    _shards(tmp_path, {"model-00001-of-00002.safetensors": a, "model-00002-of-00002.safetensors": b})
    ck = Checkpoint(tmp_path)
    assert ck.names() == ["a.weight", "b.weight", "c.bias"] and ck.metadata == {"total_size": 1}
    assert np.array_equal(ck.get("b.weight"), b["b.weight"]) and ck.info("a.weight").dtype == "F32"
    assert len(ck.files) == 2


def test_single_file_wins_over_index(tmp_path):
    _shards(tmp_path, {"s1.safetensors": {"x": np.zeros(1, np.float32)}})
    write(tmp_path / "model.safetensors", build({"y": np.zeros(1, np.float32)}))
    assert Checkpoint(tmp_path).names() == ["y"]


def test_original_gpt_oss_layout(tmp_path):
    orig = tmp_path / "original"
    orig.mkdir()
    write(orig / "model.safetensors", build({"embedding.weight": np.ones((3, 2), np.float32)}))
    assert Checkpoint(tmp_path).names() == ["embedding.weight"]
    write(tmp_path / "model.safetensors", build({"model.embed_tokens.weight": np.ones((3, 2), np.float32)}))
    assert Checkpoint(tmp_path).names() == ["model.embed_tokens.weight"]    # HF weights at the top win


def test_no_weights_at_all(tmp_path):
    with pytest.raises(FormatError, match="no model.safetensors"):
        Checkpoint(tmp_path)
    with pytest.raises(FormatError, match="no such"):
        Checkpoint(tmp_path / "absent")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(FormatError, match="not a .safetensors"):
        Checkpoint(tmp_path / "x.txt")


def test_hub_cache_snapshot_symlinks_into_blobs_are_allowed(tmp_path):
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    write(repo / "blobs" / "0f1e", build({"a": np.arange(3, dtype=np.float32)}))
    write(repo / "blobs" / "9d8c", build({"b": np.arange(2, dtype=np.int32)}))
    os.symlink("../../blobs/0f1e", snap / "s1.safetensors")
    os.symlink("../../blobs/9d8c", snap / "s2.safetensors")
    (snap / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    ck = Checkpoint(snap)
    assert ck.get("a").tolist() == [0.0, 1.0, 2.0] and ck.get("b").tolist() == [0, 1]
