#!/usr/bin/env python3
"""Fuzz the model loaders: mutated safetensors files, shard indexes and config.json files.

Usage (from the repository root):
    python tools/fuzz_loader.py                       # 10000 cases in this process
    python tools/fuzz_loader.py -n 50000 --seed 7     # more cases, another seed
    python tools/fuzz_loader.py --subprocess          # chunks in child processes: catches SIGBUS/segfaults,
                                                      # with an address-space cap (--rss-limit-mb)
    python tools/fuzz_loader.py --replay 1234         # rerun case 1234 of --seed and show the traceback

Every case is built from a valid seed input by a few random mutations (byte flips, truncation,
insertion, a new header length, JSON fields replaced by random JSON values, keys deleted). The
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


LAST_ESCAPE = [""]


# -- one case ---------------------------------------------------------------------------------------
def run_case(index: int, seed: int, workdir: str, reraise: bool = False) -> str:
    """Run case ``index``; return the outcome name (``ok`` or an exception class name)."""
    rng = random.Random(seed * 1_000_003 + index)
    target = rng.choice(["bytes", "header", "header", "index", "config"])
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


def run_in_process(start: int, count: int, seed: int, progress: bool) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    escaped: list[int] = []
    workdir = tempfile.mkdtemp(prefix="gptevo-fuzz-")
    t0 = time.perf_counter()
    step = max(1, count // 20)
    try:
        for i in range(start, start + count):
            outcome = run_case(i, seed, workdir)
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


def run_subprocesses(n: int, seed: int, chunk: int, rss_mb: int) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    t0 = time.perf_counter()
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--start", str(start), "-n", str(size),
               "--seed", str(seed), "--rss-limit-mb", str(rss_mb)]
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
    a = p.parse_args(argv)
    if a.replay is not None:
        workdir = tempfile.mkdtemp(prefix="gptevo-fuzz-")
        try:
            print(run_case(a.replay, a.seed, workdir, reraise=True))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return 0
    if a.worker:
        import resource
        limit = a.rss_limit_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        print(json.dumps(run_in_process(a.start, a.cases, a.seed, progress=False)))
        return 0
    t0 = time.perf_counter()
    counts = (run_subprocesses(a.cases, a.seed, a.chunk, a.rss_limit_mb) if a.subprocess
              else run_in_process(0, a.cases, a.seed, progress=True))
    print(f"\n{a.cases} cases, seed {a.seed}, {time.perf_counter() - t0:.1f}s")
    width = max(len(k) for k in counts) if counts else 10
    for outcome, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {outcome:<{width}}  {count}")
    failed = any(k.startswith(("ESCAPED", "CRASH")) for k in counts)
    print("FAIL: exceptions other than GptevoError escaped" if failed else "OK: only GptevoError subclasses raised")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
