"""Check that loading a gpt-oss-20b-sized sharded checkpoint does not read it into memory.

Writes the real gpt-oss-20b HF layout (config.json from the published values, 3 shards + index,
MXFP4 expert blocks/scales, bf16 elsewhere) as *sparse* files: the headers are real, the data
sections are holes, so ~13.8 GB of checkpoint costs almost no disk. Then, in a fresh process, it
loads the directory with gptevo and reports the peak resident memory after load and after scoring
one token (the forward reads only the rows it needs: one embedding row, 4 experts per layer, ...).

    python tools/check_lazy_load.py [WORKDIR] [--logits]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

E, L, H, V, NH, NKV, D, I = 32, 24, 2880, 201088, 64, 8, 64, 2880

CONFIG = {
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "attention_bias": True,
    "eos_token_id": 200002, "pad_token_id": 199999, "experts_per_token": 4, "num_experts_per_tok": 4,
    "head_dim": D, "hidden_act": "silu", "hidden_size": H, "initial_context_length": 4096,
    "intermediate_size": I, "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(L)],
    "max_position_embeddings": 131072, "num_attention_heads": NH, "num_hidden_layers": L,
    "num_key_value_heads": NKV, "num_local_experts": E, "rms_norm_eps": 1e-5,
    "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                     "original_max_position_embeddings": 4096, "truncate": False},
    "rope_theta": 150000, "sliding_window": 128, "swiglu_limit": 7.0, "tie_word_embeddings": False,
    "vocab_size": V, "torch_dtype": "bfloat16",
    "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
}


def tensors():
    """(name, dtype, shape) of every tensor of gpt-oss-20b in the HF layout."""
    yield "model.embed_tokens.weight", "BF16", [V, H]
    for n in range(L):
        p = f"model.layers.{n}."
        yield p + "input_layernorm.weight", "BF16", [H]
        yield p + "post_attention_layernorm.weight", "BF16", [H]
        for proj, rows in (("q_proj", NH * D), ("k_proj", NKV * D), ("v_proj", NKV * D)):
            yield p + f"self_attn.{proj}.weight", "BF16", [rows, H]
            yield p + f"self_attn.{proj}.bias", "BF16", [rows]
        yield p + "self_attn.o_proj.weight", "BF16", [H, NH * D]
        yield p + "self_attn.o_proj.bias", "BF16", [H]
        yield p + "self_attn.sinks", "BF16", [NH]
        yield p + "mlp.router.weight", "BF16", [E, H]
        yield p + "mlp.router.bias", "BF16", [E]
        yield p + "mlp.experts.gate_up_proj_blocks", "U8", [E, 2 * I, H // 32, 16]
        yield p + "mlp.experts.gate_up_proj_scales", "U8", [E, 2 * I, H // 32]
        yield p + "mlp.experts.gate_up_proj_bias", "BF16", [E, 2 * I]
        yield p + "mlp.experts.down_proj_blocks", "U8", [E, H, I // 32, 16]
        yield p + "mlp.experts.down_proj_scales", "U8", [E, H, I // 32]
        yield p + "mlp.experts.down_proj_bias", "BF16", [E, H]
    yield "model.norm.weight", "BF16", [H]
    yield "lm_head.weight", "BF16", [V, H]


def write_sparse_shards(out: str, n_shards: int = 3) -> int:
    """Write config, index and sparse shards; return the total checkpoint size in bytes."""
    items = list(tensors())
    per = -(-len(items) // n_shards)
    weight_map, total = {}, 0
    for s in range(n_shards):
        chunk = items[s * per:(s + 1) * per]
        fname = f"model-{s:05d}-of-{n_shards - 1:05d}.safetensors"
        header, offset = {}, 0
        for name, dt, shape in chunk:
            size = (2 if dt == "BF16" else 1)
            for d in shape:
                size *= d
            header[name] = {"dtype": dt, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(out, fname), "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + offset)          # a hole: no data blocks on disk
        total += 8 + len(raw) + offset
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(CONFIG, f)
    return total


CHILD = r"""
import resource, sys, time
def rss_mb(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.time(); import gptevo
base = rss_mb()
m = gptevo.load(sys.argv[1])
print(f"after import: peak RSS {base:.0f} MB; after load: peak RSS {rss_mb():.0f} MB ({time.time()-t:.1f} s)")
print("torch imported:", "torch" in sys.modules)
if "--logits" in sys.argv:
    t = time.time(); out = m.logits([200006])
    print(f"after logits of 1 token: peak RSS {rss_mb():.0f} MB, shape {out.shape} ({time.time()-t:.1f} s)")
"""


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    flags = [a for a in args if a.startswith("--")]
    paths = [a for a in args if not a.startswith("--")]
    work = paths[0] if paths else tempfile.mkdtemp(prefix="gptevo-lazy-")
    os.makedirs(work, exist_ok=True)
    total = write_sparse_shards(work)
    du = sum(os.stat(os.path.join(work, f)).st_blocks * 512 for f in os.listdir(work))
    print(f"checkpoint: {total / 1e9:.2f} GB in 3 shards at {work} ({du / 1e6:.1f} MB actually on disk)")
    return subprocess.call([sys.executable, "-c", CHILD, work, *flags])


if __name__ == "__main__":
    sys.exit(main())
