"""Tiny random checkpoints in the real on-disk layouts, each with a float32 peer to compare against.

Helpers only (no tests). Used by ``tests/model/test_peer_logits.py`` (through ``tests/model/conftest.py``),
``tools/make_tiny_checkpoints.py`` and ``tools/int8_error.py``.

Every fixture is written by the peer library itself (Hugging Face transformers ``save_pretrained``) or,
for gpt-oss, by the layout the peer reads (HF ``*_blocks``/``*_scales`` MXFP4 tensors; the original
``block.N.*`` layout read back by the official ``gpt_oss.torch.model.Transformer.from_checkpoint``).
The peer that produces the expected logits is the torch model that was saved, kept in memory in float32.

What the set covers (the fact sheets' facts/hf_families.md §11 and facts/gptoss.md §1-4; spec/README.md, "Sources"):
GQA ratios 2 and 4 and MQA, sliding windows shorter than the sequence (Mistral, Qwen2 per-layer,
gpt-oss even layers), MoE with experts > top-k (Mixtral, Qwen3-MoE with and without ``norm_topk_prob``,
gpt-oss), tied and untied heads, GPT-2 with and without the ``transformer.`` prefix, several safetensors
shards with an index, 4.x-style configs (top-level ``rope_theta``, ``rope_scaling`` with ``type``,
``torch_dtype``, Qwen3-MoE ``num_experts``), RoPE scaling llama3 / linear / dynamic / yarn / longrope,
Qwen3 q/k-norm with head_dim != H/heads, Phi-3 fused projections with partial rotary, Gemma.

Parameters are re-drawn after HF's init (HF sets norms to 1, biases and some routers to 0, which
hides bugs): matrices N(0, 1/min(out, in)), embeddings N(0, 1/H), norm weights 1 + 0.1 N (Gemma: 0.1 N),
biases and gpt-oss sinks 0.1 N / N(0, 1). Everything is seeded from the fixture name.

torch, transformers (and gpt_oss for ``gpt_oss_original``) are imported lazily by the builders, so
importing this module costs nothing when they are absent.
"""
from __future__ import annotations

import inspect
import json
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

VOCAB = 200           # every fixture's vocabulary size
SHARD_BYTES = 100_000  # max_shard_size for the sharded fixtures: forces 3+ files and an index


# -- the peers ---------------------------------------------------------------------------------
class HFPeer:
    """A float32 transformers causal LM. ``logits`` [T, V], ``states`` named hidden states,
    ``decode_logits`` token by token through HF's own KV cache."""

    kind = "transformers"

    def __init__(self, model):
        self.model = model.eval()

    def _run(self, ids, **kw):
        import torch
        with torch.no_grad():
            return self.model(input_ids=torch.tensor([list(ids)], dtype=torch.long), **kw)

    def logits(self, ids) -> np.ndarray:
        return self._run(ids).logits[0].float().numpy()                 # [T, V]

    def states(self, ids) -> list[tuple[str, np.ndarray]]:
        """Named intermediates in execution order: the embedding output (``hidden_states[0]``), per
        layer i the outputs of its direct children (``layer i.input_layernorm``, ``.self_attn`` (after
        o_proj), ``.post_attention_layernorm``, ``.mlp``, ... as HF names them) and the layer output,
        then the final-norm output (``hidden_states[-1]``)."""
        T = len(ids)
        captured: list[tuple[str, np.ndarray]] = []

        def hook(name):
            def fn(_m, _i, out):
                out = out[0] if isinstance(out, (tuple, list)) else out
                if hasattr(out, "shape") and out.ndim == 3 and tuple(out.shape[:2]) == (1, T):
                    captured.append((name, out[0].detach().float().numpy()))
            return fn

        base = self.model.base_model
        layers = getattr(base, "layers", None)
        layers = layers if layers is not None else base.h
        handles = []
        for i, layer in enumerate(layers):
            for child_name, child in layer.named_children():
                handles.append(child.register_forward_hook(hook(f"layer {i}.{child_name}")))
            handles.append(layer.register_forward_hook(hook(f"layer {i} output")))
        try:
            hs = self._run(ids, output_hidden_states=True).hidden_states
        finally:
            for h in handles:
                h.remove()
        return ([("embeddings", hs[0][0].float().numpy())] + captured
                + [("final norm (hidden_states[-1])", hs[-1][0].float().numpy())])

    def decode_logits(self, ids, prefill: int = 1) -> np.ndarray:
        """Logits [T, V] from HF's own KV cache: tokens 0..prefill-1 in one call, then one at a time."""
        import torch
        ids = [int(t) for t in ids]
        chunks = [ids[:prefill]] + [[t] for t in ids[prefill:]]
        # transformers 5.x renamed the argument to ``cache`` (``past_key_values`` goes in 5.40)
        arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        rows, cache, start = [], None, 0
        with torch.no_grad():
            for chunk in chunks:
                pos = torch.arange(start, start + len(chunk), dtype=torch.long)[None]
                out = self.model(input_ids=torch.tensor([chunk], dtype=torch.long), position_ids=pos,
                                 use_cache=True, **{arg: cache})
                cache = getattr(out, "cache", None)
                cache = out.past_key_values if cache is None else cache
                rows.append(out.logits[0].float().numpy())              # [len(chunk), V]
                start += len(chunk)
        return np.concatenate(rows)                                     # [T, V]


class OfficialGptOssPeer:
    """The official ``gpt_oss.torch.model.Transformer`` converted to float32 with ``.float()``.

    It has no KV cache (its generator re-runs the whole prefix each step), so by causality its
    decode logits are the rows of the full forward."""

    kind = "gpt_oss"

    def __init__(self, model):
        self.model = model.eval()

    def logits(self, ids) -> np.ndarray:
        import torch
        with torch.no_grad():
            return self.model(torch.tensor(list(ids), dtype=torch.long)).float().numpy()   # [T, V]

    def states(self, ids) -> list[tuple[str, np.ndarray]]:
        """Named intermediates in execution order: embedding, per block the norms, o-proj output, router
        logits and both residual outputs, then the final norm."""
        import torch
        captured: list[tuple[str, np.ndarray]] = []

        def hook(name):
            return lambda _m, _i, out: captured.append((name, out.detach().float().numpy()))

        handles = [self.model.embedding.register_forward_hook(hook("embedding"))]
        for n, block in enumerate(self.model.block):
            for mod, label in ((block.attn.norm, "attn.norm"), (block.attn.out, "attn.out (o proj)"),
                               (block.attn, "attn (residual)"), (block.mlp.norm, "mlp.norm"),
                               (block.mlp.gate, "mlp.gate (router logits)"), (block.mlp, "mlp (residual)")):
                handles.append(mod.register_forward_hook(hook(f"block.{n}.{label}")))
        handles.append(self.model.norm.register_forward_hook(hook("final norm")))
        try:
            with torch.no_grad():
                self.model(torch.tensor(list(ids), dtype=torch.long))
        finally:
            for h in handles:
                h.remove()
        return captured

    def decode_logits(self, ids, prefill: int = 1) -> np.ndarray:
        return self.logits(ids)


@dataclass
class Built:
    """A fixture on disk: ``path`` holds config.json + safetensors; ``peer`` computes the expected values."""

    name: str
    family: str
    path: Path
    ids: list[int]
    peer: object


@dataclass(frozen=True)
class FixtureSpec:
    name: str
    family: str
    seq_len: int
    build: Callable[["FixtureSpec", Path], Built] = field(repr=False)
    description: str = ""
    needs: tuple[str, ...] = ("torch", "transformers")


# -- shared helpers ----------------------------------------------------------------------------
_REASONS = {
    "torch": "torch is not installed (pip install torch); peer tests need it",
    "transformers": "transformers is not installed (pip install transformers); HF peer tests need it",
    "gpt_oss": "the official gpt-oss code is not installed "
               "(pip install --no-deps --ignore-requires-python gpt-oss==0.0.9)",
}


MIN_VERSIONS = {"transformers": "5.0"}   # the builders use 5.x config keys (rope_parameters, dtype=)


def require(module: str):
    """pytest.importorskip with the install hint as the reason (for tests)."""
    import pytest
    return pytest.importorskip(module, minversion=MIN_VERSIONS.get(module),
                               reason=_REASONS.get(module, f"{module} is not installed"))


def have(module: str) -> bool:
    """True when ``module`` can be imported (without importing it)."""
    import importlib.util
    import sys
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def seed_of(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def token_ids(name: str, n: int, vocab: int = VOCAB) -> list[int]:
    rng = np.random.default_rng(seed_of(name) + 1)
    return [int(t) for t in rng.integers(0, vocab, n)]


def _is_embedding(pname: str) -> bool:
    return any(s in pname for s in ("embed_tokens", "wte", "wpe", "embedding.weight"))


def _is_norm(pname: str) -> bool:
    return any(s in pname for s in ("norm", "ln_", "layernorm"))


def randomize_(model, seed: int, norm_offset: bool = False) -> None:
    """Re-draw every parameter (see the module docstring); in place, under torch.no_grad."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            x = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if _is_norm(pname) and p.ndim == 1:
                val = 0.1 * x if norm_offset else 1.0 + 0.1 * x
            elif pname.endswith("sinks"):
                val = x
            elif p.ndim == 1:                     # biases (and gpt-oss router bias)
                val = 0.1 * x
            elif _is_embedding(pname):            # 1/sqrt(H): tied heads give logits of O(1) too
                val = x / math.sqrt(p.shape[-1])
            else:                                 # matrices and stacked expert matrices
                fan_in = min(p.shape[-1], p.shape[-2]) if p.ndim >= 2 else p.shape[-1]
                val = x / math.sqrt(fan_in)
            p.copy_(val.to(p.dtype))


def _save_hf(model, path: Path, shard: bool, **kw) -> None:
    if shard:
        kw["max_shard_size"] = SHARD_BYTES
    try:                                          # 4.x needs it; 5.x always writes safetensors
        model.save_pretrained(path, safe_serialization=True, **kw)
    except TypeError:
        model.save_pretrained(path, **kw)


def rewrite_config_4x(path: Path, renames: dict[str, str] | None = None) -> None:
    """Turn the 5.x config.json into the 4.x form (facts hf_families §10): top-level ``rope_theta``,
    ``rope_scaling`` with the legacy ``type`` key (or null), ``torch_dtype`` instead of ``dtype``;
    ``renames`` renames further keys (Qwen3-MoE ``num_local_experts`` -> ``num_experts``)."""
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    rp = cfg.pop("rope_parameters", None)
    if rp is not None:
        rp = dict(rp)
        cfg["rope_theta"] = rp.pop("rope_theta", 10000.0)
        rtype = rp.pop("rope_type", "default")
        cfg["rope_scaling"] = None if rtype == "default" else {"type": rtype, **rp}
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    for old, new in (renames or {}).items():
        if old in cfg:
            cfg[new] = cfg.pop(old)
    cfg["transformers_version"] = "4.44.2"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def _hf_model(model_type: str, name: str, norm_offset: bool = False, model_cls=None, **kw):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(seed_of(name))
    kw.setdefault("vocab_size", VOCAB)
    for key, tok in (("bos_token_id", 1), ("eos_token_id", 2), ("pad_token_id", 0)):
        kw.setdefault(key, tok)                   # the defaults (50256, 32000, ...) lie outside VOCAB
    cfg = AutoConfig.for_model(model_type, **kw)
    cfg._attn_implementation = "eager"
    cls = model_cls or AutoModelForCausalLM
    model = cls.from_config(cfg, attn_implementation="eager", dtype=torch.float32) \
        if cls is AutoModelForCausalLM else cls(cfg)
    model = model.float().eval()
    randomize_(model, seed_of(name), norm_offset=norm_offset)
    return model


def _llama_like(model_type: str, *, shard=False, style4x=False, renames=None, norm_offset=False,
                save_kw=None, **kw) -> Callable[[FixtureSpec, Path], Built]:
    """A builder for any family that HF saves with a plain ``save_pretrained(**save_kw)``."""
    def build(spec: FixtureSpec, path: Path) -> Built:
        model = _hf_model(model_type, spec.name, norm_offset=norm_offset, **kw)
        _save_hf(model, path, shard, **(save_kw or {}))
        if style4x:
            rewrite_config_4x(path, renames)
        return Built(spec.name, spec.family, path, token_ids(spec.name, spec.seq_len), HFPeer(model))
    return build


SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)


def _small(**over):
    d = dict(SMALL)
    d.update(over)
    return d


# -- GPT-2 -------------------------------------------------------------------------------------
GPT2_KW = dict(n_embd=64, n_head=4, n_layer=2, n_positions=64, activation_function="gelu_new",
               vocab_size=VOCAB, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _build_gpt2(prefix: bool, shard: bool = False):
    def build(spec: FixtureSpec, path: Path) -> Built:
        from transformers import GPT2LMHeadModel
        model = _hf_model("gpt2", spec.name, model_cls=GPT2LMHeadModel, **GPT2_KW)
        # GPT2LMHeadModel saves "transformer.h.0..."; its GPT2Model saves "h.0..." like the original
        # openai-community/gpt2 files. Both are tied: no lm_head on disk.
        _save_hf(model if prefix else model.transformer, path, shard)
        return Built(spec.name, spec.family, path, token_ids(spec.name, spec.seq_len), HFPeer(model))
    return build


# -- gpt-oss -----------------------------------------------------------------------------------
GPT_OSS_SIZES = dict(num_hidden_layers=2, num_experts=4, experts_per_token=2, vocab_size=VOCAB,
                     hidden_size=64, intermediate_size=64, swiglu_limit=7.0, head_dim=16,
                     num_attention_heads=8, num_key_value_heads=2, sliding_window=4,
                     initial_context_length=4096, rope_theta=150000.0, rope_scaling_factor=32.0,
                     rope_ntk_alpha=1.0, rope_ntk_beta=32.0)


def quantize_mxfp4(w_out_in: np.ndarray):
    """Encode ``[..., out, in]`` with OUR encoder; return (blocks, scales, decoded float32)."""
    from gptevo.ops.mxfp4 import mxfp4_decode, mxfp4_encode
    blocks, scales = mxfp4_encode(w_out_in)
    return blocks, scales, mxfp4_decode(blocks, scales, dtype="float32")


def _write_sharded(tensors: dict, path: Path, n_files: int, first_index: int = 0) -> None:
    """Write ``tensors`` (name -> numpy array) into n_files safetensors files plus the HF index.

    ``first_index=0`` reproduces the gpt-oss converter's off-by-one names
    (model-00000-of-00002 ... model-00002-of-00002 for three files, facts gptoss §4)."""
    from safetensors.numpy import save_file
    names = sorted(tensors)
    last = first_index + n_files - 1
    weight_map, total = {}, 0
    for f in range(n_files):
        part = names[f::n_files]
        fname = f"model-{first_index + f:05d}-of-{last:05d}.safetensors"
        save_file({k: np.ascontiguousarray(tensors[k]) for k in part}, str(path / fname),
                  metadata={"format": "pt"})
        for k in part:
            weight_map[k] = fname
            total += tensors[k].nbytes
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _gpt_oss_hf_model(name: str):
    """A float32 eager GptOssForCausalLM with the GPT_OSS_SIZES shapes and the release's YaRN rope."""
    import torch
    s = GPT_OSS_SIZES
    model = _hf_model(
        "gpt_oss", name, vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["num_attention_heads"], num_key_value_heads=s["num_key_value_heads"],
        head_dim=s["head_dim"], num_local_experts=s["num_experts"], num_experts_per_tok=s["experts_per_token"],
        experts_per_token=s["experts_per_token"], sliding_window=s["sliding_window"],
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
        swiglu_limit=s["swiglu_limit"],
        rope_parameters={"rope_type": "yarn", "rope_theta": s["rope_theta"], "factor": s["rope_scaling_factor"],
                         "beta_fast": s["rope_ntk_beta"], "beta_slow": s["rope_ntk_alpha"],
                         "original_max_position_embeddings": s["initial_context_length"], "truncate": False})
    with torch.no_grad():
        for layer in model.model.layers:        # larger gate/up weights: the swiglu clamp at 7 is hit
            layer.mlp.experts.gate_up_proj.mul_(3.0)
    return model


def _build_gpt_oss_hf_dequantized(spec: FixtureSpec, path: Path) -> Built:
    """A plain ``save_pretrained`` of GptOssForCausalLM: dequantized experts ``gate_up_proj
    [E, H, 2I]`` / ``down_proj [E, I, H]`` ([E, in, out], as BF16 re-uploads of gpt-oss store them)."""
    model = _gpt_oss_hf_model(spec.name)
    _save_hf(model, path, shard=False)
    return Built(spec.name, spec.family, path, token_ids(spec.name, spec.seq_len), HFPeer(model))


def _build_gpt_oss_hf(spec: FixtureSpec, path: Path) -> Built:
    """GptOssForCausalLM (float32, eager) with MXFP4 experts stored as the HF release stores them:
    ``mlp.experts.gate_up_proj_blocks [E, 2I, H/32, 16]`` (same bytes as the original mlp1),
    ``_scales [E, 2I, H/32]``, ``down_proj_blocks [E, H, I/32, 16]``; the in-memory experts
    ([E, in, out]) are set to the decoded values. config.json is in the published 4.x style
    (``rope_scaling`` with ``rope_type: yarn``, ``truncate: false``, top-level ``rope_theta``,
    ``quantization_config``); three shards with the converter's off-by-one names."""
    import torch
    model = _gpt_oss_hf_model(spec.name)
    tensors = {}
    with torch.no_grad():
        for n, layer in enumerate(model.model.layers):
            ex = layer.mlp.experts
            x = f"model.layers.{n}.mlp.experts."
            # gate_up_proj [E, H, 2I] (in, out) -> [E, 2I, H] (out, in) for blocks along H
            gu = ex.gate_up_proj.detach().numpy().transpose(0, 2, 1)
            b, sc, dec = quantize_mxfp4(gu)
            tensors[x + "gate_up_proj_blocks"], tensors[x + "gate_up_proj_scales"] = b, sc
            ex.gate_up_proj.copy_(torch.from_numpy(dec.transpose(0, 2, 1).copy()))
            dn = ex.down_proj.detach().numpy().transpose(0, 2, 1)        # [E, H, I]
            b, sc, dec = quantize_mxfp4(dn)
            tensors[x + "down_proj_blocks"], tensors[x + "down_proj_scales"] = b, sc
            ex.down_proj.copy_(torch.from_numpy(dec.transpose(0, 2, 1).copy()))
    for k, v in model.state_dict().items():
        if k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj"):
            continue
        tensors[k] = v.detach().float().numpy()
    path.mkdir(parents=True, exist_ok=True)
    _write_sharded(tensors, path, n_files=3, first_index=0)
    model.config.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    cfg["rope_scaling"] = rp                     # keeps "rope_type": "yarn" as the release does
    cfg["torch_dtype"] = cfg.pop("dtype", "bfloat16")
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    cfg["transformers_version"] = "4.55.0.dev0"
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return Built(spec.name, spec.family, path, token_ids(spec.name, spec.seq_len), HFPeer(model))


def _bf16_round(t):
    """float32 tensor rounded to the nearest bfloat16 value, kept as bfloat16."""
    import torch
    return t.to(torch.bfloat16)


def _build_gpt_oss_original(spec: FixtureSpec, path: Path) -> Built:
    """The original layout (``original/`` of the release): config.json with the 16 ModelConfig keys,
    one ``model.safetensors`` with bf16 tensors and MXFP4 ``mlp{1,2}_weight.{blocks,scales}`` encoded
    by our encoder. The peer is the official ``Transformer.from_checkpoint`` reading that very file on
    CPU, then ``.float()``: the official loader decodes the MXFP4 bytes itself (exact in bf16)."""
    import torch
    from gpt_oss.torch.model import ModelConfig, Transformer
    from safetensors.torch import save_file

    torch.manual_seed(seed_of(spec.name))
    cfg = ModelConfig(**GPT_OSS_SIZES)
    model = Transformer(cfg, device=torch.device("cpu"))   # bf16 params, torch.empty init
    randomize_(model, seed_of(spec.name))
    tensors = {}
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("mlp1_weight") or pname.endswith("mlp2_weight"):
                w = p.detach().float().numpy() * (3.0 if "mlp1" in pname else 1.0)   # [E, out, in]
                b, sc, _ = quantize_mxfp4(w)
                tensors[pname + ".blocks"] = torch.from_numpy(b)
                tensors[pname + ".scales"] = torch.from_numpy(sc)
            else:                          # everything else is bf16 on disk (facts gptoss §3)
                tensors[pname] = _bf16_round(p.detach().float()).contiguous()
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(GPT_OSS_SIZES, indent=2))
    official = Transformer.from_checkpoint(str(path), device="cpu").float().eval()
    return Built(spec.name, spec.family, path, token_ids(spec.name, spec.seq_len), OfficialGptOssPeer(official))


# -- the fixture table -------------------------------------------------------------------------
def _specs() -> list[FixtureSpec]:
    L = _llama_like
    return [
        FixtureSpec("gpt2", "gpt2", 16, _build_gpt2(prefix=True),
                    "GPT2LMHeadModel save: transformer. prefix, tied, Conv1D"),
        FixtureSpec("gpt2_noprefix", "gpt2", 16, _build_gpt2(prefix=False),
                    "GPT2Model save: no prefix (as openai-community/gpt2), tied"),
        FixtureSpec("llama3", "llama", 16, L(
            "llama", shard=True, **_small(tie_word_embeddings=False, rope_parameters={
                "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
            "llama3 rope scaling, GQA 2, untied, sharded (index)"),
        FixtureSpec("llama_linear_4x", "llama", 14, L(
            "llama", style4x=True, **_small(num_key_value_heads=1, tie_word_embeddings=True, rope_parameters={
                "rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
            "linear rope, MQA (GQA 4), tied, 4.x config (rope_theta, rope_scaling.type, torch_dtype)"),
        FixtureSpec("llama_dynamic", "llama", 20, L(
            "llama", **_small(max_position_embeddings=16, rope_parameters={
                "rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})),
            "dynamic NTK rope, T=20 > max_position_embeddings=16"),
        FixtureSpec("llama_yarn_4x", "llama", 16, L(
            "llama", style4x=True, **_small(rope_parameters={
                "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                "original_max_position_embeddings": 64})),
            "yarn rope (attention factor), 4.x config"),
        FixtureSpec("mistral", "mistral", 14, L(
            "mistral", **_small(num_key_value_heads=1, sliding_window=4, tie_word_embeddings=False)),
            "sliding window 4 < T=14 on every layer, MQA"),
        FixtureSpec("qwen2", "qwen2", 14, L(
            "qwen2", shard=True, **_small(tie_word_embeddings=True, use_sliding_window=True,
                                         sliding_window=4, max_window_layers=1)),
            "qkv bias, tied, layer 0 full / layer 1 sliding (W=4), sharded"),
        FixtureSpec("qwen3", "qwen3", 14, L(
            "qwen3", style4x=True, **_small(head_dim=32, tie_word_embeddings=True,
                                           rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
            "q/k norm, head_dim 32 != H/heads, tied, 4.x config"),
        FixtureSpec("mixtral", "mixtral", 14, L(
            "mixtral", shard=True, **_small(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2,
                                            sliding_window=None, tie_word_embeddings=False,
                                            rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
            "4 experts top-2 (per-expert w1/w2/w3 on disk), sharded"),
        FixtureSpec("mixtral_fused", "mixtral", 14, L(
            "mixtral", save_kw={"save_original_format": False},
            **_small(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
            "5.x fused experts on disk: mlp.experts.gate_up_proj [E,2I,H], down_proj [E,H,I], mlp.gate"),
        FixtureSpec("qwen3_moe", "qwen3_moe", 14, L(
            "qwen3_moe", **_small(head_dim=32, num_experts=8, num_experts_per_tok=2,
                                  moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=[1],
                                  tie_word_embeddings=False)),
            "8 experts top-2, norm_topk_prob true, layer 1 dense"),
        FixtureSpec("qwen3_moe_nonorm_4x", "qwen3_moe", 14, L(
            "qwen3_moe", style4x=True, renames={"num_local_experts": "num_experts"},
            **_small(head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                     norm_topk_prob=False, tie_word_embeddings=False)),
            "norm_topk_prob false, all layers MoE, 4.x config with num_experts"),
        FixtureSpec("phi3", "phi3", 20, L(
            "phi3", **_small(num_key_value_heads=2, tie_word_embeddings=False, sliding_window=8,
                             original_max_position_embeddings=16, rope_parameters={
                                 "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                 "short_factor": [1.0, 1.1, 1.3, 1.6], "long_factor": [1.0, 2.0, 4.0, 8.0],
                                 "original_max_position_embeddings": 16})),
            "fused qkv/gate_up, partial rotary 0.5, longrope (T=20 > 16), window 8"),
        FixtureSpec("gemma", "gemma", 14, L(
            "gemma", norm_offset=True, **_small(num_key_value_heads=1, head_dim=16,
                                                hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
                                                tie_word_embeddings=True)),
            "(1+w) RMSNorm, sqrt(H) embed scale, tanh GELU, MQA, tied"),
        FixtureSpec("gpt_oss_hf", "gpt_oss", 14, _build_gpt_oss_hf,
                    "HF layout, MXFP4 *_blocks/_scales, sinks, window 4 on even layers, 3 off-by-one shards"),
        FixtureSpec("gpt_oss_hf_dequantized", "gpt_oss", 14, _build_gpt_oss_hf_dequantized,
                    "HF layout with float experts [E, in, out] (no MXFP4), single file"),
        FixtureSpec("gpt_oss_original", "gpt_oss", 14, _build_gpt_oss_original,
                    "original layout (block.N.*), peer = official gpt_oss.torch", ("torch", "gpt_oss")),
    ]


FIXTURES: dict[str, FixtureSpec] = {s.name: s for s in _specs()}


def build_fixture(name: str, path) -> Built:
    """Write fixture ``name`` into directory ``path`` (created) and return it with its peer."""
    spec = FIXTURES[name]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return spec.build(spec, path)
