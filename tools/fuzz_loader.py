#!/usr/bin/env python3
"""Fuzz the model loaders: mutated safetensors files, shard indexes, config.json files and whole model
directories (tensor-level mutations, then ``gptevo.load`` and ``model.logits``).

Usage (from the repository root):
    python tools/fuzz_loader.py                       # 10000 cases in this process
    python tools/fuzz_loader.py -n 50000 --seed 7     # more cases, another seed
    python tools/fuzz_loader.py --target model        # only one kind of case (bytes, header, index,
                                                      # config or model)
    python tools/fuzz_loader.py --subprocess          # chunks in child processes: catches SIGBUS/segfaults,
                                                      # with an address-space cap (--rss-limit-mb)
    python tools/fuzz_loader.py --replay 1234         # rerun case 1234 of --seed and show the traceback

Every case is built from a valid seed input by a few random mutations (byte flips, truncation,
insertion, a new header length, JSON fields replaced by random JSON values, keys deleted). "model"
cases write a tiny Llama-like or gpt-oss-like (MXFP4 experts) model directory whose tensors were
deleted, renamed, reshaped, re-typed, given NaN/inf values or extreme MXFP4 scale bytes, or joined by
extra tensors (the file itself stays a valid safetensors file, so the model-level checks are reached),
sometimes with a mutated config too; then load it (``check_weights`` and ``mmap`` at random) and
compute logits for a few (sometimes invalid) token ids. The
loaders may accept the input or raise a gptevo.errors.GptevoError subclass; anything else (a bare
KeyError, ValueError, RecursionError, ...) "escapes". Prints a progress line and, at the end, the
count per outcome. Exit status 1 if anything escaped or a child process died, else 0.
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from gptevo.checkpoint import Checkpoint  # noqa: E402
from gptevo.config_adapters import config_from_dict, load_config  # noqa: E402
from gptevo.errors import GptevoError  # noqa: E402
from gptevo.safetensors_reader import SafetensorsFile  # noqa: E402

# -- seed inputs ------------------------------------------------------------------------------------
TENSORS = [("a", "F32", [2, 3], 4), ("b", "BF16", [4], 2), ("blocks", "U8", [2, 3, 16], 1),
           ("scales", "U8", [2, 3], 1), ("s", "I64", [], 8), ("z", "F16", [0, 5], 2), ("m", "BOOL", [3], 1)]
CONFIGS = [
    {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 256,
     "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "vocab_size": 128,
     "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    {"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": 128, "vocab_size": 128,
     "eos_token_id": 50256},
    {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 256,
     "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "vocab_size": 128,
     "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
    {"model_type": "qwen3_moe", "hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 256,
     "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "vocab_size": 128,
     "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "mlp_only_layers": [1]},
    {"model_type": "gpt_oss", "hidden_size": 64, "intermediate_size": 64, "max_position_embeddings": 256,
     "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "vocab_size": 128,
     "num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16,
     "layer_types": ["sliding_attention", "full_attention"],
     "rope_parameters": {"rope_type": "yarn", "factor": 32.0, "rope_theta": 150000.0, "truncate": False,
                         "original_max_position_embeddings": 4096}},
    {"model_type": "phi3", "hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 256,
     "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 128, "original_max_position_embeddings": 64,
     "rope_parameters": {"rope_type": "longrope", "short_factor": [1] * 8, "long_factor": [2] * 8}},
    {"model_type": "gemma", "hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 256,
     "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 1, "vocab_size": 128,
     "head_dim": 16, "hidden_act": "gelu"},
    {"num_hidden_layers": 2, "num_experts": 4, "experts_per_token": 2, "vocab_size": 201088, "hidden_size": 64,
     "intermediate_size": 64, "head_dim": 16, "num_attention_heads": 4, "num_key_value_heads": 2,
     "sliding_window": 128, "initial_context_length": 4096, "rope_theta": 150000, "rope_scaling_factor": 32.0,
     "rope_ntk_alpha": 1, "rope_ntk_beta": 32, "swiglu_limit": 7.0},
]
SPECIAL = [0, 1, -1, 2**31, 2**32, 2**48, 2**63, 2**64, 10**30, 1e999, float("nan"), True, False, None, "",
           "F32", "f32", "F4", "__metadata__", "../x.safetensors", "/etc/passwd", [], {}, [0, 0], [2**62, 8]]


def header_and_data(rng: random.Random) -> tuple[dict, bytes]:
    header, chunks, pos = {}, [], 0
    for name, dtype, shape, itemsize in rng.sample(TENSORS, rng.randint(1, len(TENSORS))):
        n = int(np.prod(shape, dtype=np.int64)) * itemsize
        raw = bytes(rng.choice([0, 1]) if dtype == "BOOL" else rng.randrange(256) for _ in range(n))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        chunks.append(raw)
        pos += n
    if rng.random() < 0.5:
        header["__metadata__"] = {"format": "pt"}
    return header, b"".join(chunks)


def assemble(header: dict | str, data: bytes) -> bytes:
    hb = (header if isinstance(header, str) else json.dumps(header, allow_nan=True)).encode()
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb + data


def random_json(rng: random.Random, depth: int = 0):
    r = rng.random()
    if r < 0.45 or depth > 2:
        return copy.deepcopy(rng.choice(SPECIAL))   # never share the mutable [] / {} between cases
    if r < 0.6:
        return rng.randint(-2**70, 2**70)
    if r < 0.7:
        return rng.uniform(-1e6, 1e6)
    if r < 0.85:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["dtype", "shape", "data_offsets", "x", ""]): random_json(rng, depth + 1)
            for _ in range(rng.randint(0, 3))}


def mutate_dict(rng: random.Random, d: dict) -> dict:
    d = json.loads(json.dumps(d, allow_nan=True))
    for _ in range(rng.randint(1, 3)):
        target = d
        if rng.random() < 0.5:
            nested = [k for k, v in d.items() if isinstance(v, dict)]
            if nested:
                target = d[rng.choice(nested)]
        keys = list(target) + ["new_key"]
        key = rng.choice(keys)
        if rng.random() < 0.2:
            target.pop(key, None)
        else:
            target[key] = random_json(rng)
    return d


def mutate_bytes(rng: random.Random, b: bytes) -> bytes:
    b = bytearray(b)
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["flip", "cut", "insert", "length", "dup"])
        pos = rng.randrange(len(b) + 1)
        if kind == "flip" and b:
            b[min(pos, len(b) - 1)] = rng.randrange(256)
        elif kind == "cut":
            del b[pos:]
        elif kind == "insert":
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif kind == "length" and len(b) >= 8:
            b[0:8] = rng.choice([0, 1, 7, 100_000_001, 2**63, 2**64 - 1, rng.randrange(2**16)]).to_bytes(8, "little")
        elif kind == "dup" and len(b) > 16:
            b[pos:pos] = b[8:8 + rng.randint(1, 32)]
    return bytes(b)


# -- tiny model directories (tensor-level mutations) ------------------------------------------------
MODEL_CONFIGS = {
    "llama": {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
              "max_position_embeddings": 64, "rope_theta": 10000.0, "tie_word_embeddings": False},
    "gpt_oss": {"model_type": "gpt_oss", "attention_bias": True, "head_dim": 8, "hidden_size": 32,
                "intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
                "num_hidden_layers": 2, "num_local_experts": 4, "num_experts_per_tok": 2, "vocab_size": 64,
                "max_position_embeddings": 64, "rope_theta": 150000.0, "sliding_window": 3,
                "layer_types": ["sliding_attention", "full_attention"], "tie_word_embeddings": False},
}
ST_NAMES = {"float32": "F32", "float16": "F16", "float64": "F64", "bfloat16": "BF16", "uint8": "U8",
            "int8": "I8", "int32": "I32", "int64": "I64", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3"}


def _np_dtypes():
    import ml_dtypes
    return [np.dtype(t) for t in (np.float32, np.float16, np.float64, ml_dtypes.bfloat16, np.uint8, np.int8,
                                  np.int32, np.bool_, ml_dtypes.float8_e4m3fn)]


def tiny_model_tensors(kind: str, g: np.random.Generator) -> dict:
    """Tensor name -> array of a valid tiny HF checkpoint for MODEL_CONFIGS[kind] (written by hand)."""
    import ml_dtypes
    V, H, nh, G, D = 64, 32, 4, 2, 8
    oss = kind == "gpt_oss"
    fdt = ml_dtypes.bfloat16 if oss else np.float32
    w = lambda *shape: (g.standard_normal(shape) * 0.3).astype(fdt)   # noqa: E731
    t = {"model.embed_tokens.weight": w(V, H), "model.norm.weight": w(H), "lm_head.weight": w(V, H)}
    for i in range(2):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        t.update({p + "input_layernorm.weight": w(H), p + "post_attention_layernorm.weight": w(H),
                  a + "q_proj.weight": w(nh * D, H), a + "k_proj.weight": w(G * D, H),
                  a + "v_proj.weight": w(G * D, H), a + "o_proj.weight": w(H, nh * D)})
        if not oss:
            t.update({m + "gate_proj.weight": w(48, H), m + "up_proj.weight": w(48, H),
                      m + "down_proj.weight": w(H, 48)})
            continue
        E, I = 4, 32
        t.update({a + "q_proj.bias": w(nh * D), a + "k_proj.bias": w(G * D), a + "v_proj.bias": w(G * D),
                  a + "o_proj.bias": w(H), a + "sinks": w(nh), m + "router.weight": w(E, H), m + "router.bias": w(E),
                  m + "experts.gate_up_proj_bias": w(E, 2 * I), m + "experts.down_proj_bias": w(E, H)})
        for part, (rows, cols) in (("gate_up_proj", (2 * I, H)), ("down_proj", (H, I))):
            t[f"{m}experts.{part}_blocks"] = g.integers(0, 256, (E, rows, cols // 32, 16), dtype=np.uint8)
            t[f"{m}experts.{part}_scales"] = g.integers(118, 128, (E, rows, cols // 32), dtype=np.uint8)
    return t


def tensors_file(tensors: dict) -> bytes:
    header, chunks, pos = {}, [], 0
    for name, a in tensors.items():
        raw = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": ST_NAMES[a.dtype.name], "shape": list(a.shape), "data_offsets": [pos, pos + len(raw)]}
        chunks.append(raw)
        pos += len(raw)
    return assemble(header, b"".join(chunks))


def mutate_tensors(rng: random.Random, g: np.random.Generator, t: dict) -> None:
    """A few tensor-level mutations in place; the result is still a valid safetensors file."""
    for _ in range(rng.randint(1, 3)):
        name = rng.choice(sorted(t))
        a = t[name]
        kind = rng.choice(["delete", "rename", "shape", "dtype", "value", "value", "scale", "extra"])
        if kind == "delete":
            del t[name]
        elif kind == "rename":
            t[rng.choice([name + ".x", name.replace("0", "1"), name.replace("model.", ""), name.upper(),
                          name.replace("weight", "bias")])] = t.pop(name)
        elif kind == "shape":
            shape = list(a.shape)
            choice = rng.random()
            if choice < 0.3 and shape:
                i = rng.randrange(len(shape))
                shape[i] = max(0, shape[i] + rng.choice([-1, 1, -shape[i]]))
            elif choice < 0.5:
                shape = shape[:-1] if shape else [1]
            elif choice < 0.7:
                shape = shape + [1]
            elif choice < 0.85:
                shape = [2**40, 0]
            else:
                shape = []
            t[name] = np.zeros(shape, a.dtype)
        elif kind == "dtype":
            t[name] = a.astype(rng.choice(_np_dtypes()))
        elif kind == "value" and a.size and (a.dtype.kind == "f" or a.dtype.name in ("bfloat16", "float8_e4m3fn")):
            b = np.array(a)
            b.reshape(-1)[rng.randrange(b.size)] = rng.choice([np.nan, np.inf, -np.inf, 1e38, -1e38, 0.0])
            t[name] = b
        elif kind == "scale" and a.size and a.dtype == np.uint8:
            b = np.array(a)
            flat = b.reshape(-1)
            for _ in range(rng.randint(1, 4)):
                flat[rng.randrange(flat.size)] = rng.choice([255, 254, 253, 0, 1, rng.randrange(256)])
            t[name] = b
        elif kind == "extra":
            t[rng.choice(["extra.a", "model.layers.9.x", "model.layers.0.self_attn.rotary_emb.inv_freq"])] = \
                g.standard_normal(rng.choice([(3,), (2, 2), (0,)])).astype(rng.choice(_np_dtypes()))


def model_case(rng: random.Random, case_dir: str) -> None:
    """Write a mutated tiny model directory, load it and run logits (and sometimes a cached forward)."""
    import gptevo
    kind = rng.choice(sorted(MODEL_CONFIGS))
    g = np.random.default_rng(rng.randrange(2**32))
    t = tiny_model_tensors(kind, g)
    with np.errstate(all="ignore"):      # casts of NaN/inf to integer dtypes are part of the mutation
        mutate_tensors(rng, g, t)
    cfg = MODEL_CONFIGS[kind]
    if rng.random() < 0.15:
        cfg = mutate_dict(rng, cfg)
    with open(os.path.join(case_dir, "model.safetensors"), "wb") as f:
        f.write(tensors_file(t))
    with open(os.path.join(case_dir, "config.json"), "w") as f:
        f.write(json.dumps(cfg, allow_nan=True))
    ids = [rng.randrange(64) for _ in range(rng.randint(1, 6))]
    if rng.random() < 0.1:
        ids[rng.randrange(len(ids))] = rng.choice([-1, 64, 2**40, 1.5, True])
    with np.errstate(all="ignore"):      # overflow warnings from huge weights are expected, not findings
        model = gptevo.load(case_dir, check_weights=rng.random() < 0.5, mmap=rng.random() < 0.7)
        model.logits(ids)
        if rng.random() < 0.3:
            cache = model.new_cache(8)
            model.forward(ids[:1], cache)
            model.forward(ids[1:2] or [0], cache)


LAST_ESCAPE = [""]
TARGETS = ["bytes", "header", "header", "index", "config", "model", "model"]


# -- one case ---------------------------------------------------------------------------------------
def run_case(index: int, seed: int, workdir: str, reraise: bool = False, only: str | None = None) -> str:
    """Run case ``index``; return the outcome name (``ok`` or an exception class name)."""
    rng = random.Random(seed * 1_000_003 + index)
    target = rng.choice(TARGETS)
    if only is not None:
        target = only
    case_dir = os.path.join(workdir, f"c{index % 4}")
    shutil.rmtree(case_dir, ignore_errors=True)
    os.makedirs(case_dir)
    try:
        if target in ("bytes", "header"):
            header, data = header_and_data(rng)
            content = assemble(mutate_dict(rng, header), data) if target == "header" else \
                mutate_bytes(rng, assemble(header, data))
            path = os.path.join(case_dir, "model.safetensors")
            with open(path, "wb") as f:
                f.write(content)
            for mode in ("mmap", "read"):
                with SafetensorsFile(path, mode=mode) as sf:
                    for name in sf.names():
                        sf.get(name)
            Checkpoint(case_dir).close()
        elif target == "index":
            weight_map = {}
            for i in range(rng.randint(1, 3)):
                header, data = header_and_data(rng)
                with open(os.path.join(case_dir, f"s{i}.safetensors"), "wb") as f:
                    f.write(assemble(header, data))
                weight_map.update({t: f"s{i}.safetensors" for t in header if t != "__metadata__"})
            index = mutate_dict(rng, {"metadata": {"total_size": 1}, "weight_map": weight_map})
            text = json.dumps(index, allow_nan=True)
            if rng.random() < 0.3:
                text = mutate_bytes(rng, b"\0" * 8 + text.encode())[8:].decode("utf-8", "replace")
            with open(os.path.join(case_dir, "model.safetensors.index.json"), "w") as f:
                f.write(text)
            with Checkpoint(case_dir, mode=rng.choice(["mmap", "read"])) as ck:
                for name in ck.names():
                    ck.get(name)
        elif target == "model":
            model_case(rng, case_dir)
        else:
            cfg = mutate_dict(rng, rng.choice(CONFIGS))
            if rng.random() < 0.5:
                config_from_dict(cfg, "fuzz/config.json")
            else:
                with open(os.path.join(case_dir, "config.json"), "w") as f:
                    f.write(json.dumps(cfg, allow_nan=True))
                if rng.random() < 0.3:
                    with open(os.path.join(case_dir, "generation_config.json"), "w") as f:
                        f.write(json.dumps({"eos_token_id": random_json(rng)}, allow_nan=True))
                load_config(case_dir)
        return "ok"
    except GptevoError as exc:
        return type(exc).__name__
    except Exception as exc:   # noqa: BLE001 -- the point: anything else escaped
        if reraise:
            raise
        LAST_ESCAPE[0] = f"{type(exc).__name__}: {str(exc)[:150]}"
        return "ESCAPED:" + type(exc).__name__


def run_in_process(start: int, count: int, seed: int, progress: bool, only: str | None = None) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    escaped: list[int] = []
    workdir = tempfile.mkdtemp(prefix="gptevo-fuzz-")
    t0 = time.perf_counter()
    step = max(1, count // 20)
    try:
        for i in range(start, start + count):
            outcome = run_case(i, seed, workdir, only=only)
            counts[outcome] += 1
            if outcome.startswith("ESCAPED") and len(escaped) < 10:
                escaped.append((i, LAST_ESCAPE[0]))
            if progress and (i - start + 1) % step == 0:
                bad = sum(v for k, v in counts.items() if k.startswith("ESCAPED"))
                print(f"[{i - start + 1:>7}/{count}] {time.perf_counter() - t0:6.1f}s  escaped={bad}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for i, message in escaped:
        counts[f"example: --replay {i} --seed {seed}  ({message})"] += 0
    return counts


def run_subprocesses(n: int, seed: int, chunk: int, rss_mb: int, only: str | None = None) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    t0 = time.perf_counter()
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--start", str(start), "-n", str(size),
               "--seed", str(seed), "--rss-limit-mb", str(rss_mb)] + (["--target", only] if only else [])
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode < 0 or not res.stdout.strip():
            counts[f"CRASH: child for cases {start}..{start + size - 1} exited {res.returncode}"] += 1
            print(res.stderr[-2000:], file=sys.stderr)
        else:
            counts.update(json.loads(res.stdout.strip().splitlines()[-1]))
        bad = sum(v for k, v in counts.items() if k.startswith(("ESCAPED", "CRASH")))
        print(f"[{start + size:>7}/{n}] {time.perf_counter() - t0:6.1f}s  escaped/crashed={bad}", flush=True)
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--cases", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--subprocess", action="store_true", help="run chunks in child processes (crash detection)")
    p.add_argument("--chunk", type=int, default=1000, help="cases per child process")
    p.add_argument("--rss-limit-mb", type=int, default=4096, help="address-space cap of each child (MB)")
    p.add_argument("--replay", type=int, help="rerun one case and print its traceback")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--target", choices=sorted(set(TARGETS)), help="run only this kind of case")
    a = p.parse_args(argv)
    if a.replay is not None:
        workdir = tempfile.mkdtemp(prefix="gptevo-fuzz-")
        try:
            print(run_case(a.replay, a.seed, workdir, reraise=True, only=a.target))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return 0
    if a.worker:
        import resource
        limit = a.rss_limit_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        print(json.dumps(run_in_process(a.start, a.cases, a.seed, progress=False, only=a.target)))
        return 0
    t0 = time.perf_counter()
    counts = (run_subprocesses(a.cases, a.seed, a.chunk, a.rss_limit_mb, a.target) if a.subprocess
              else run_in_process(0, a.cases, a.seed, progress=True, only=a.target))
    print(f"\n{a.cases} cases ({a.target or 'all targets'}), seed {a.seed}, {time.perf_counter() - t0:.1f}s")
    width = max(len(k) for k in counts) if counts else 10
    for outcome, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {outcome:<{width}}  {count}")
    failed = any(k.startswith(("ESCAPED", "CRASH")) for k in counts)
    print("FAIL: exceptions other than GptevoError escaped" if failed else "OK: only GptevoError subclasses raised")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
