"""``gptevo bench``: the measurements on tiny synthetic models, the weight-bytes count, the llama-bench
side-by-side (a fake llama-bench script and a hand-written GGUF header), and the errors."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import stat
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

import gptevo
from gptevo import bench, bench_llama, cli
from gptevo.errors import FormatError, RequestError

TOOL = Path(__file__).resolve().parents[2] / "tools" / "make_synthetic_checkpoint.py"
_spec = importlib.util.spec_from_file_location("make_synthetic_checkpoint", TOOL)
msc = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = msc
_spec.loader.exec_module(msc)

FAST = ["--backend", "reference", "--tokens", "3", "--prompt-tokens", "8", "--warmup", "1", "--bandwidth-mib", "8",
        "--prefill-sizes", "8,16", "--batch-sizes", "1,3", "--batch-steps", "2"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return {m: msc.make_checkpoint(root / m, m, tiny=True, stream=io.StringIO())
            for m in ("gpt2-124m", "gpt-oss-20b")}


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    rc = cli.main(argv, env={}, stdin=io.StringIO(), stdout=out, stderr=err)
    return rc, out.getvalue(), err.getvalue()


def manual_bytes_per_token(path: Path, k: int = 1, E: int = 1) -> int:
    """From the file itself: everything once, wte/wpe/embed_tokens one row (+ wte whole when tied),
    experts k/E."""
    from safetensors.numpy import load_file

    t = load_file(str(path / "model.safetensors"))
    total = 0
    for name, a in t.items():
        if name.endswith(("wte.weight", "wpe.weight", "embed_tokens.weight")):
            total += a.nbytes // a.shape[0] + (a.nbytes if name.endswith("wte.weight") else 0)
        elif ".experts." in name:
            total += a.nbytes * k // E
        else:
            total += a.nbytes
    return total


def test_bench_json_on_tiny_gpt2(models):
    rc, out, err = run(["bench", str(models["gpt2-124m"]), *FAST, "--json"])
    assert rc == 0, err
    r = json.loads(out)
    assert r["backend"] == "reference" and r["family"] == "gpt2" and r["weights"] == "stored"
    assert r["decode"]["tokens"] == 3 and r["decode"]["tok_s"] > 0 and r["prefill"]["tokens"] == 8
    assert r["peak_rss_bytes"] > 10e6 and r["bandwidth_bytes_s"] > 1e8
    assert r["weight_bytes_per_token"] == manual_bytes_per_token(models["gpt2-124m"])
    assert r["roofline_fraction"] == pytest.approx(
        r["weight_bytes_per_token"] * r["decode"]["tok_s"] / r["bandwidth_bytes_s"])
    assert r["llama"] is None
    assert [d["tokens"] for d in r["prefill_sweep"]] == [8, 16] and r["prefill_sweep"][0] == r["prefill"]
    assert [(d["batch"], d["steps"], d["tokens"]) for d in r["batch_decode"]] == [(1, 2, 2), (3, 2, 6)]
    assert all(d["tok_s"] == pytest.approx(d["tokens"] / d["seconds"]) for d in r["batch_decode"])


def test_repeats_report_mean_and_spread_of_every_sample(models):
    rc, out, err = run(["bench", str(models["gpt2-124m"]), *FAST, "--repeats", "3", "--json"])
    assert rc == 0, err
    r = json.loads(out)
    for d in [r["decode"], r["prefill"], *r["prefill_sweep"]]:
        assert d["repeats"] == 3 and len(d["samples"]) == 3 and all(v > 0 for v in d["samples"])
        assert d["tok_s"] == pytest.approx(np.mean(d["samples"]))
        assert d["stddev"] == pytest.approx(np.std(d["samples"], ddof=1))
    rc, out, err = run(["bench", str(models["gpt2-124m"]), *FAST, "--repeats", "2"])
    assert rc == 0 and " ± " in out.split("decode tok/s (tg3)")[1].splitlines()[0]


def test_bench_counts_top_k_experts(models):
    m = gptevo.load(models["gpt-oss-20b"], backend="reference")
    assert bench.weight_bytes_per_token(m) == manual_bytes_per_token(models["gpt-oss-20b"], k=2, E=4)
    assert bench.weight_dtypes(m) == "bfloat16 + mxfp4"


def test_bench_table_and_prefill_skip(models):
    rc, out, err = run(["bench", str(models["gpt-oss-20b"]), *FAST, "--prompt-tokens", "0"])
    assert rc == 0, err
    for label in ("decode tok/s (tg3)", "prefill tok/s (pp0)", "peak RSS", "weight bytes / token",
                  "roofline (decode)", "memory read bandwidth", "gptevo (reference)", "prefill tok/s (pp16)",
                  "decode tok/s, batch 3 (aggregate)"):
        assert label in out
    assert "llama.cpp" not in out


# -- llama-bench side by side ----------------------------------------------------------------------
FAKE = r'''#!{python}
import json, sys
a = sys.argv
p, n, t = int(a[a.index("-p") + 1]), int(a[a.index("-n") + 1]), int(a[a.index("-t") + 1])
assert a[a.index("-o") + 1] == "json" and a[a.index("-r") + 1] == "3" and a[-2:] == ["--repack", "0"]
if {fail}:
    sys.stderr.write("error: failed to load model\n"); sys.exit(1)
print("main: some log line before the JSON")
print(json.dumps([{{"build_commit": "abc1234", "model_type": "gpt2 ?B all F32", "model_size": 1000,
                   "n_threads": t, "n_prompt": p, "n_gen": n, "avg_ts": 500.0 if n else 2500.0,
                   "stddev_ts": 5.0}}], indent=1))
'''


def fake_llama(tmp_path, fail=False) -> str:
    path = tmp_path / ("llama-bench-fail" if fail else "llama-bench")
    path.write_text(FAKE.format(python=sys.executable, fail=fail))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def _gguf_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def write_gguf(path: Path, meta: list[tuple[str, int, object]], tensors: list[tuple[str, tuple, int]]) -> Path:
    """A GGUF v3 file: metadata (string=8, u32=4, array of strings=(9, list)) and zero-filled tensors
    (name, ne dims, nbytes), aligned to 32 bytes."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta))
    for key, t, v in meta:
        head += _gguf_string(key) + struct.pack("<I", t)
        if t == 8:
            head += _gguf_string(v)
        elif t == 4:
            head += struct.pack("<I", v)
        elif t == 9:
            head += struct.pack("<IQ", 8, len(v)) + b"".join(_gguf_string(x) for x in v)
    offset, infos = 0, b""
    for name, dims, nbytes in tensors:
        infos += _gguf_string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        infos += struct.pack("<IQ", 0, offset)
        offset += -(-nbytes // 32) * 32
    blob = head + infos
    blob += b"\0" * (-len(blob) % 32)
    path.write_bytes(blob + b"\0" * offset)
    return path


def test_gguf_bytes_per_token_dense_tied_and_moe(tmp_path):
    dense = write_gguf(tmp_path / "d.gguf", [("general.architecture", 8, "gpt2"),
                                             ("tokenizer.ggml.tokens", 9, ["a", "b", "c"])],
                       [("token_embd.weight", (4, 10), 160), ("position_embd.weight", (4, 8), 128),
                        ("output_norm.weight", (4,), 16), ("blk.0.ffn_up.weight", (4, 16), 256)])
    r = bench_llama.gguf_bytes_per_token(str(dense))
    assert r["bytes_per_token"] == 16 + 160 + 16 + 32 + 256   # output_norm padded to its 32-byte slot
    moe = write_gguf(tmp_path / "m.gguf", [("general.architecture", 8, "gpt-oss"), ("gpt-oss.expert_count", 4, 4),
                                           ("gpt-oss.expert_used_count", 4, 2)],
                     [("token_embd.weight", (4, 10), 160), ("output.weight", (4, 10), 160),
                      ("blk.0.ffn_down_exps.weight", (4, 8, 4), 512)])
    r = bench_llama.gguf_bytes_per_token(str(moe))
    assert (r["bytes_per_token"], r["experts"], r["experts_used"]) == (16 + 160 + 256, 4, 2)
    with pytest.raises(FormatError, match="not a GGUF"):
        bench_llama.gguf_bytes_per_token(str(TOOL))


def test_side_by_side_with_fake_llama_bench(models, tmp_path):
    gguf = write_gguf(tmp_path / "tiny.gguf", [("general.architecture", 8, "gpt2")],
                      [("token_embd.weight", (64, 257), 64 * 257 * 4)])
    args = ["bench", str(models["gpt2-124m"]), *FAST,
            "--llama-bench", fake_llama(tmp_path), "--gguf", str(gguf), "--llama-args", "--repack 0"]
    rc, out, err = run(args + ["--json"])
    assert rc == 0, err
    r = json.loads(out)
    L = r["llama"]
    assert L["decode"]["tok_s"] == 500.0 and L["decode"]["stddev"] == 5.0 and L["decode"]["n_gen"] == 3
    assert L["prefill"]["tok_s"] == 2500.0 and L["prefill"]["n_prompt"] == 8
    assert L["bytes_per_token"] == 64 * 4 + 64 * 257 * 4 and L["roofline_fraction"] > 0
    rc, out, err = run(args)
    assert rc == 0, err
    head = next(line for line in out.splitlines() if "llama.cpp" in line)
    assert "gptevo (reference)" in head and "abc1234" in head and "tiny.gguf" in head
    decode = next(line for line in out.splitlines() if "decode tok/s" in line)
    assert decode.rstrip().endswith("500.0 ± 5.0")
    assert "2500.0 ± 5.0" in next(line for line in out.splitlines() if "prefill tok/s" in line)


def test_failing_llama_bench_still_prints_ours(models, tmp_path):
    gguf = write_gguf(tmp_path / "x.gguf", [], [])
    rc, out, err = run(["bench", str(models["gpt2-124m"]), *FAST, "--llama-bench", fake_llama(tmp_path, fail=True),
                        "--gguf", str(gguf), "--llama-args=--repack 0"])
    assert rc == 0, err
    assert "llama-bench decode failed: exit status 1: error: failed to load model" in out


def test_parse_llama_bench_json():
    assert bench_llama.parse_llama_bench_json('log\n[{"avg_ts": 1.5}]\n')[0]["avg_ts"] == 1.5
    with pytest.raises(FormatError, match="no JSON array"):
        bench_llama.parse_llama_bench_json("error: nothing")
    with pytest.raises(FormatError, match="avg_ts"):
        bench_llama.parse_llama_bench_json('[{"x": 1}]')


@pytest.mark.parametrize("extra, message", [
    (["--llama-bench", "/bin/true"], "go together"),
    (["--llama-bench", "/nonexistent/llama-bench", "--gguf", "x.gguf"], "not an executable file"),
    (["--tokens", "0"], "--tokens must be"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--batch-sizes", "1,x"], "--batch-sizes must be"),
    (["--prefill-sizes", "-4"], "--prefill-sizes must be"),
    (["--batch-steps", "0"], "--batch-steps must be"),
    (["--repeats", "0"], "--repeats must be"),
])
def test_bad_arguments(models, extra, message):
    rc, out, err = run(["bench", str(models["gpt2-124m"]), *FAST, *extra])
    assert rc == 2 and message in err


def test_weights_passed_only_when_given(models, monkeypatch):
    calls = []
    real = gptevo.load

    def fake_load(path, backend=None, **kw):
        calls.append(kw)
        if "weights" in kw:
            raise RequestError("load() got unknown option(s) weights")
        return real(path, backend=backend)

    monkeypatch.setattr(gptevo, "load", fake_load)
    assert run(["bench", str(models["gpt2-124m"]), *FAST])[0] == 0
    rc, out, err = run(["bench", str(models["gpt2-124m"]), *FAST, "--weights", "int8"])
    assert calls == [{}, {"weights": "int8"}]
    assert rc == 2 and "unknown option(s) weights" in err


def test_set_threads_and_bandwidth():
    env = {}
    try:
        assert bench.set_threads(3, env)["threads"] == 3
    finally:
        bench.set_blas_threads(os.cpu_count() or 1)
    assert env["OMP_NUM_THREADS"] == "3" and env["OPENBLAS_NUM_THREADS"] == "3"
    assert bench.set_threads(None, env)["set"] is False
    assert bench.memory_bandwidth(8 << 20, threads=2, repeats=1) > 1e8


def test_bytes_per_token_counts_shared_memory_once():
    import types

    import numpy as np

    fused = np.ones((12, 4), dtype=np.float32)                              # [q|k|v rows, D]
    embed = np.ones((10, 4), dtype=np.float32)
    layer = types.SimpleNamespace(wqkv=fused, wq=fused[:4], wk=fused[4:8], wv=fused[8:], attn_norm=np.ones(4))
    w = types.SimpleNamespace(embed=embed, pos_embed=None, lm_head=embed, final_norm=np.ones(4, np.float32),
                              final_norm_bias=None, layers=[layer])
    model = types.SimpleNamespace(weights=w, config=types.SimpleNamespace(num_experts=0, experts_per_token=0))
    assert bench.weight_bytes_per_token(model) == 16 + 160 + 16 + 192 + 32  # row, tied head, norm, qkv, norm


def test_llama_bench_killed_by_a_signal(tmp_path):
    script = tmp_path / "crash"
    script.write_text(f"#!{sys.executable}\nimport os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    script.chmod(0o755)
    r = bench_llama.run_llama_bench(str(script), "x.gguf", n_prompt=0, n_gen=4, threads=1)
    assert r["error"] == "killed by SIGSEGV" and "-o" in r["command"]


def test_numba_widens_16_bit_expert_biases_once_and_reports_stored_dtypes(models):
    """numba's load hook stores bf16 expert biases as float32 (the same values; moe_experts widened
    them in every call), and ``weight_dtypes`` still names the stored dtypes."""
    from gptevo import backends
    if "numba" not in backends.available():
        pytest.skip("numba is not installed")
    ref = gptevo.load(models["gpt-oss-20b"], backend="reference")
    m = gptevo.load(models["gpt-oss-20b"], backend="numba")
    for got, stored in zip(m.weights.layers, ref.weights.layers):
        for name in ("experts_gate_up_bias", "experts_down_bias"):
            assert getattr(stored, name).dtype.name == "bfloat16"
            assert getattr(got, name).dtype == np.float32
            np.testing.assert_array_equal(getattr(got, name), getattr(stored, name).astype(np.float32))
    assert bench.weight_dtypes(m) == bench.weight_dtypes(ref) == "bfloat16 + mxfp4"


FAKE_PAIRS = r'''#!{python}
import json, sys
a = sys.argv
p, n, r = int(a[a.index("-p") + 1]), int(a[a.index("-n") + 1]), int(a[a.index("-r") + 1])
with open({log!r}, "a") as f:
    f.write(f"{{p}} {{n}} {{r}}\n")
    f.flush()
calls = sum(1 for _ in open({log!r}))
print(json.dumps([{{"build_commit": "abc1234", "model_size": 1, "n_prompt": p, "n_gen": n,
                   "avg_ts": 100.0 * calls if n else 2500.0, "stddev_ts": 0.0}}]))
'''


def test_interleaved_decode_pairs_ours_with_llama_bench(models, tmp_path):
    """``--interleave``: decode in pairs (ours, then llama-bench -r 1), each pair's ratio reported;
    llama's prefill still one -r R run; --interleave alone is refused."""
    log = tmp_path / "calls.txt"
    fake = tmp_path / "llama-bench-pairs"
    fake.write_text(FAKE_PAIRS.format(python=sys.executable, log=str(log)))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    gguf = write_gguf(tmp_path / "tiny.gguf", [("general.architecture", 8, "gpt2")],
                      [("token_embd.weight", (64, 257), 64 * 257 * 4)])
    args = ["bench", str(models["gpt2-124m"]), *FAST, "--repeats", "3", "--llama-bench", str(fake),
            "--gguf", str(gguf), "--interleave"]
    rc, out, err = run(args + ["--json"])
    assert rc == 0, err
    r = json.loads(out)
    assert log.read_text().split("\n")[:4] == ["0 3 1", "0 3 1", "0 3 1", "8 0 3"]
    pr, ours = r["paired_decode"], r["decode"]["samples"]
    assert r["llama"]["decode"]["samples"] == [100.0, 200.0, 300.0] and r["llama"]["decode"]["tok_s"] == 200.0
    assert pr["ratios"] == pytest.approx([o / t for o, t in zip(ours, [100.0, 200.0, 300.0])])
    assert pr["median_ratio"] == pytest.approx(float(np.median(pr["ratios"])))
    assert r["llama"]["prefill"]["tok_s"] == 2500.0
    assert r["llama"]["peak_rss_bytes"] is None      # the forks inherited our loaded model's RSS
    rc, out, err = run(args)
    assert rc == 0, err
    assert "decode, ours / llama.cpp in 3 pairs" in out and "median" in out
    rc, out, err = run(["bench", str(models["gpt2-124m"]), *FAST, "--interleave"])
    assert rc == 2 and "--interleave needs --llama-bench" in err
