"""Train gptevo's bundled model: a tiny gpt-oss trained on five Jane Austen novels.

Stages (``--stage all`` runs them in order; each can be rerun alone, and training resumes from its
last checkpoint):
  tokenizer  byte-level BPE (``tokenizers``), vocab 4094 + ``<|startoftext|>``/``<|endoftext|>``,
             fit on the five training novels only; pre-tokenizer = the o200k split regex, as in the
             real gpt-oss tokenizer.json;
  train      the model below in torch (fp32 on CPU), AdamW, time-budgeted cosine schedule
             (``--minutes``), checkpoints every ``--ckpt-every`` seconds in WORKDIR/bundled/;
             optional MXFP4 quantization-aware phase at the end (straight-through estimator whose
             forward uses gptevo's own ``mxfp4_encode``/``mxfp4_decode``);
  export     quantize the expert weights with ``gptevo.ops.mxfp4.mxfp4_encode``, fine-tune the
             non-expert weights briefly with the experts frozen at their decoded values, and write
             the Hugging Face gpt-oss layout into ``--out`` (config.json, generation_config.json,
             tokenizer.json, tokenizer_config.json, model.safetensors);
  package    rewrite the package data from the export stage's saved model (no training);
  report     held-out (Persuasion) perplexity of the torch model per token and per byte, against an
             add-one-smoothed unigram baseline fit on the training novels.

The torch block follows gptevo's reference equations (spec/ops, /facts §2: openai/gpt-oss
``gpt_oss/torch/model.py``): pre-norm RMSNorm; fused qkv with bias, GQA, half-split YaRN RoPE with
concentration on q and k, attention sinks, sliding window on even layers; router = top-k on biased
logits then softmax over the k; experts = interleaved gate/linear clamped SwiGLU with biases, the
down-projection bias added before the routing weight; untied embedding/unembedding.

Corpus: ``python tools/austen_corpus.py`` first (writes WORKDIR/clean/*.txt).
Run: ``nice -n 10 python tools/train_bundled.py --stage all --minutes 27``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

TRAIN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey")
HELDOUT_NOVEL = "persuasion"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# The o200k pre-tokenizer split (as in the gpt-oss tokenizer.json "Split" pre-tokenizer).
from gptevo.tokenizer import O200K_PATTERN  # noqa: E402

# Model sizes (gpt-oss-20b values in comments).
CFG = dict(
    vocab_size=4096,            # 201088
    hidden_size=192,            # 2880
    num_hidden_layers=4,        # 24
    num_attention_heads=8,      # 64
    num_key_value_heads=2,      # 8
    head_dim=32,                # 64
    num_local_experts=4,        # 32
    num_experts_per_tok=2,      # 4
    intermediate_size=256,      # 2880
    sliding_window=64,          # 128
    rope_theta=150000.0,        # same
    rope_factor=32.0,           # same (YaRN)
    beta_fast=32.0,             # same
    beta_slow=1.0,              # same
    initial_context_length=4096,  # same
    swiglu_limit=7.0,           # same
    swiglu_alpha=1.702,         # same (hard-coded in gpt-oss)
    rms_norm_eps=1e-5,          # same
)


# ----------------------------------------------------------------------------------------------
# tokenizer and data
# ----------------------------------------------------------------------------------------------
def read_novel(workdir, name):
    path = os.path.join(workdir, "clean", name + ".txt")
    if not os.path.exists(path):
        raise SystemExit(f"{path} missing: run `python tools/austen_corpus.py {workdir}` first")
    with open(path, encoding="utf-8") as f:
        return f.read()


def train_tokenizer(workdir, vocab_size):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((read_novel(workdir, n) for n in TRAIN_NOVELS), trainer=trainer)
    tok.add_special_tokens([BOS, EOS])            # ids vocab-2, vocab-1 (like 199998/199999)
    if tok.get_vocab_size() != vocab_size:
        raise SystemExit(f"tokenizer has {tok.get_vocab_size()} tokens, expected {vocab_size}")
    return tok


def encode_corpus(tok, workdir):
    """Training stream (novels joined by <|endoftext|>) and held-out ids, as int32 arrays."""
    eos = tok.token_to_id(EOS)
    train = []
    for name in TRAIN_NOVELS:
        train.extend(tok.encode(read_novel(workdir, name)).ids)
        train.append(eos)
    held = tok.encode(read_novel(workdir, HELDOUT_NOVEL)).ids
    return np.array(train, dtype=np.int32), np.array(held, dtype=np.int32)


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------
def yarn_cos_sin(c, T):
    """YaRN RoPE table (facts §2.3): cos, sin [T, head_dim/2] float32, concentration applied."""
    d, base, s = c["head_dim"], c["rope_theta"], c["rope_factor"]
    d_half, L0 = d // 2, c["initial_context_length"]
    freq = base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)               # [d/2]
    low = d_half * math.log(L0 / (c["beta_fast"] * 2 * math.pi)) / math.log(base)
    high = d_half * math.log(L0 / (c["beta_slow"] * 2 * math.pi)) / math.log(base)
    ramp = ((torch.arange(d_half, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    mask = 1 - ramp
    inv_freq = (1 / (s * freq)) * (1 - mask) + (1 / freq) * mask                   # [d/2]
    conc = 0.1 * math.log(s) + 1.0
    theta = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None, :]      # [T,d/2]
    return torch.cos(theta) * conc, torch.sin(theta) * conc


def rope(x, cos, sin):
    """Half-split rotation: dim i pairs with dim i + d/2. x [B,T,H,d]; cos/sin [T,d/2]."""
    d_half = x.shape[-1] // 2
    x1, x2 = x[..., :d_half], x[..., d_half:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.scale, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale


class Attention(nn.Module):
    def __init__(self, c, layer):
        super().__init__()
        H, G, d, D = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["hidden_size"]
        self.H, self.G, self.d = H, G, d
        self.window = c["sliding_window"] if layer % 2 == 0 else None            # even layers slide
        self.norm = RMSNorm(D, c["rms_norm_eps"])
        self.qkv = nn.Linear(D, (H + 2 * G) * d)                                  # rows: q | k | v
        self.out = nn.Linear(H * d, D)
        self.sinks = nn.Parameter(torch.zeros(H))

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        H, G, d = self.H, self.G, self.d
        R = H // G
        qkv = self.qkv(self.norm(x))                                              # [B,T,(H+2G)d]
        q = qkv[..., :H * d].view(B, T, H, d)
        k = qkv[..., H * d:(H + G) * d].view(B, T, G, d)
        v = qkv[..., (H + G) * d:].view(B, T, G, d)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        q = q.view(B, T, G, R, d).permute(0, 2, 3, 1, 4)                          # [B,G,R,T,d]
        k = k.permute(0, 2, 1, 3)[:, :, None]                                     # [B,G,1,T,d]
        v = v.permute(0, 2, 1, 3)[:, :, None]                                     # [B,G,1,T,d]
        s = (q @ k.transpose(-1, -2)) / math.sqrt(d)                              # [B,G,R,T,T]
        i = torch.arange(T)[:, None]
        j = torch.arange(T)[None, :]
        visible = j <= i
        if self.window is not None:
            visible = visible & (j > i - self.window)
        s = s.masked_fill(~visible, float("-inf"))
        sink = self.sinks.view(1, G, R, 1, 1).expand(B, G, R, T, 1)               # [B,G,R,T,1]
        p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1]         # [B,G,R,T,T]
        o = (p @ v).permute(0, 3, 1, 2, 4).reshape(B, T, H * d)                   # [B,T,H*d], h = g*R+r
        return x + self.out(o)


def clamped_swiglu(h, alpha, limit):
    """gpt-oss activation: gate = even columns (clamped above), linear = odd columns (clamped both)."""
    g = h[..., 0::2].clamp(max=limit)
    lin = h[..., 1::2].clamp(min=-limit, max=limit)
    return g * torch.sigmoid(alpha * g) * (lin + 1)


class MoE(nn.Module):
    def __init__(self, c, layer):
        super().__init__()
        E, D, I = c["num_local_experts"], c["hidden_size"], c["intermediate_size"]
        L = c["num_hidden_layers"]
        self.k, self.alpha, self.limit = c["num_experts_per_tok"], c["swiglu_alpha"], c["swiglu_limit"]
        self.norm = RMSNorm(D, c["rms_norm_eps"])
        self.gate = nn.Linear(D, E)                                                # router
        self.mlp1_weight = nn.Parameter(torch.randn(E, 2 * I, D) * 0.02)           # [E,2I,D] (out,in)
        self.mlp1_bias = nn.Parameter(torch.zeros(E, 2 * I))
        self.mlp2_weight = nn.Parameter(torch.randn(E, D, I) * (0.02 / math.sqrt(2 * L)))  # [E,D,I]
        self.mlp2_bias = nn.Parameter(torch.zeros(E, D))
        self.frozen = None     # (w1, w2) decoded MXFP4 tensors used instead of the parameters
        self.fake_quant = None  # callable w -> decoded(encoded(w)) for the straight-through phase
        self.aux = torch.zeros(())

    def weights(self):
        if self.frozen is not None:
            return self.frozen
        w1, w2 = self.mlp1_weight, self.mlp2_weight
        if self.fake_quant is not None:
            w1 = w1 + (self.fake_quant(w1) - w1).detach()
            w2 = w2 + (self.fake_quant(w2) - w2).detach()
        return w1, w2

    def forward(self, x):
        B, T, D = x.shape
        t = self.norm(x).reshape(B * T, D)                                        # [N,D]
        logits = self.gate(t)                                                     # [N,E]
        top_v, top_i = logits.topk(self.k, dim=-1)                                # [N,k]
        w = torch.softmax(top_v, dim=-1)                                          # [N,k]
        E = logits.shape[-1]
        probs = torch.softmax(logits, dim=-1)                                     # [N,E] (aux loss only)
        frac = F.one_hot(top_i, E).float().sum(1).mean(0) / self.k                # [E]
        self.aux = E * (frac * probs.mean(0)).sum()
        w1, w2 = self.weights()
        out = torch.zeros_like(t)
        for e in range(E):
            tok, slot = (top_i == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            h = t[tok] @ w1[e].T + self.mlp1_bias[e]                              # [n,2I]
            y = clamped_swiglu(h, self.alpha, self.limit) @ w2[e].T + self.mlp2_bias[e]  # [n,D]
            out = out.index_add(0, tok, y * w[tok, slot, None])
        return x + out.view(B, T, D)


class GptOss(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        V, D, L = c["vocab_size"], c["hidden_size"], c["num_hidden_layers"]
        self.embedding = nn.Embedding(V, D)
        self.attn = nn.ModuleList([Attention(c, i) for i in range(L)])
        self.mlp = nn.ModuleList([MoE(c, i) for i in range(L)])
        self.norm = RMSNorm(D, c["rms_norm_eps"])
        self.unembedding = nn.Linear(D, V, bias=False)
        for name, p in self.named_parameters():
            if name.endswith("qkv.weight") or name.endswith("gate.weight") or "embedding" in name:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("out.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * L))
            elif name.endswith(".bias") and p.dim() == 1:
                nn.init.zeros_(p)
        self._rope = {}

    def forward(self, ids):
        T = ids.shape[1]
        if T not in self._rope:
            self._rope[T] = yarn_cos_sin(self.c, T)
        cos, sin = self._rope[T]
        x = self.embedding(ids)
        for attn, mlp in zip(self.attn, self.mlp):
            x = mlp(attn(x, cos, sin))
        return self.unembedding(self.norm(x))

    def aux_loss(self):
        return sum(m.aux for m in self.mlp) / len(self.mlp)


# ----------------------------------------------------------------------------------------------
# evaluation helpers
# ----------------------------------------------------------------------------------------------
def eval_windows(ids, T):
    """Chunks of length <= T with stride T-1: every token after the first is predicted once."""
    return [ids[s:s + T] for s in range(0, len(ids) - 1, T - 1) if len(ids[s:s + T]) > 1]


@torch.no_grad()
def heldout_nll(model, ids, T, max_windows=None, batch=16):
    """(sum of NLL in nats, number of predicted tokens) over the held-out windows."""
    model.eval()
    wins = eval_windows(ids, T)
    if max_windows:
        wins = wins[:max_windows]
    full = [w for w in wins if len(w) == T]
    rest = [w for w in wins if len(w) != T]
    total, count = 0.0, 0
    for b in range(0, len(full), batch):
        x = torch.from_numpy(np.stack(full[b:b + batch]).astype(np.int64))
        logits = model(x[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += x[:, 1:].numel()
    for w in rest:
        x = torch.from_numpy(w.astype(np.int64))[None]
        logits = model(x[:, :-1])
        total += F.cross_entropy(logits[0], x[0, 1:], reduction="sum").item()
        count += x.shape[1] - 1
    model.train()
    return total, count


def predicted_bytes(tok, ids, T, max_windows=None):
    """UTF-8 bytes of the tokens that the held-out windows predict."""
    wins = eval_windows(ids, T)
    if max_windows:
        wins = wins[:max_windows]
    from eval_bundled import token_byte_lengths

    lens = token_byte_lengths(tok)
    return int(sum(lens[w[1:]].sum() for w in wins))


def unigram_nll(train_ids, ids, V, T, max_windows=None):
    """Add-one-smoothed unigram fit on the training stream, scored on the same predicted tokens."""
    counts = np.bincount(train_ids, minlength=V).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    wins = eval_windows(ids, T)
    if max_windows:
        wins = wins[:max_windows]
    tgt = np.concatenate([w[1:] for w in wins])
    return float(-logp[tgt].sum()), int(tgt.size)


# ----------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------
def paths(workdir):
    d = os.path.join(workdir, "bundled")
    os.makedirs(d, exist_ok=True)
    return dict(dir=d, tok=os.path.join(d, "tokenizer.json"), data=os.path.join(d, "ids.npz"),
                ckpt=os.path.join(d, "ckpt.pt"), final=os.path.join(d, "final.pt"),
                export=os.path.join(d, "export.pt"))


def load_data(P):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(P["tok"])
    z = np.load(P["data"])
    return tok, z["train"], z["held"]


def stage_tokenizer(args, P):
    t0 = time.time()
    tok = train_tokenizer(args.workdir, CFG["vocab_size"])
    tok.save(P["tok"])
    train, held = encode_corpus(tok, args.workdir)
    np.savez(P["data"], train=train, held=held)
    print(f"[tokenizer] vocab={tok.get_vocab_size()} train_tokens={len(train)} held_tokens={len(held)} "
          f"({time.time() - t0:.0f}s)", flush=True)


def lr_at(frac, peak, warm=0.03, floor=0.1):
    """Warmup then cosine decay to floor*peak, as a function of the elapsed fraction of the budget."""
    if frac < warm:
        return peak * frac / warm
    f = min(1.0, (frac - warm) / (1 - warm))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * f)))


def mxfp4_roundtrip_fn():
    """w -> decode(encode(w)) with gptevo's MXFP4 codec (the one the export uses), or None."""
    try:
        from gptevo.ops.mxfp4 import mxfp4_decode, mxfp4_encode
    except ImportError:
        return None

    def fq(w):
        blocks, scales = mxfp4_encode(w.detach().cpu().numpy().astype(np.float32))
        return torch.from_numpy(np.asarray(mxfp4_decode(blocks, scales), dtype=np.float32))
    return fq


def stage_train(args, P):
    tok, train, held = load_data(P)
    torch.manual_seed(0)
    model = GptOss(CFG)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": other, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    step, elapsed = 0, 0.0
    rng = np.random.default_rng(0)
    if os.path.exists(P["ckpt"]):
        ck = torch.load(P["ckpt"], weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, elapsed = ck["step"], ck["elapsed"]
        rng = np.random.default_rng(step)
        print(f"[train] resumed at step {step}, {elapsed:.0f}s elapsed", flush=True)
    nparam = sum(p.numel() for p in model.parameters())
    print(f"[train] params={nparam} train_tokens={len(train)} T={args.seq} B={args.batch}", flush=True)
    budget = args.minutes * 60.0
    T, B = args.seq, args.batch
    last_ckpt, last_log, start = time.time(), time.time(), time.time() - elapsed
    fq = None
    while elapsed < budget:
        frac = elapsed / budget
        if args.qat_frac > 0 and frac >= 1 - args.qat_frac and fq is None:
            fq = mxfp4_roundtrip_fn()
            if fq is not None:
                for m in model.mlp:
                    m.fake_quant = fq
                print(f"[train] step {step}: MXFP4 straight-through phase on", flush=True)
            else:
                args.qat_frac = 0.0
                print("[train] gptevo mxfp4 codec unavailable: no quantization-aware phase", flush=True)
        lr = lr_at(frac, args.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = rng.integers(0, len(train) - T - 1, size=B)
        x = torch.from_numpy(np.stack([train[s:s + T + 1] for s in starts]).astype(np.int64))
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        aux = model.aux_loss()
        opt.zero_grad(set_to_none=True)
        (loss + args.aux_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        now = time.time()
        elapsed = now - start
        if now - last_log > args.log_every:
            nll, n = heldout_nll(model, held, T, max_windows=32)
            print(f"[train] step {step} {elapsed:.0f}s lr {lr:.2e} loss {loss.item():.3f} aux {aux.item():.3f} "
                  f"held-out(32 win) ppl {math.exp(nll / n):.1f}", flush=True)
            last_log = time.time()
        if now - last_ckpt > args.ckpt_every or elapsed >= budget:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                        "elapsed": elapsed, "cfg": CFG}, P["ckpt"] + ".tmp")
            os.replace(P["ckpt"] + ".tmp", P["ckpt"])
            last_ckpt = time.time()
    for m in model.mlp:
        m.fake_quant = None
    torch.save({"model": model.state_dict(), "step": step, "elapsed": elapsed, "cfg": CFG}, P["final"])
    print(f"[train] done: {step} steps in {elapsed:.0f}s", flush=True)


def quantize_experts(model):
    """Encode each expert weight with gptevo's MXFP4 encoder; freeze the model on the decoded values.

    Returns {layer: (mlp1_blocks, mlp1_scales, mlp2_blocks, mlp2_scales)} as uint8 numpy arrays.
    """
    from gptevo.ops.mxfp4 import mxfp4_decode, mxfp4_encode

    packed = {}
    for i, m in enumerate(model.mlp):
        b1, s1 = mxfp4_encode(m.mlp1_weight.detach().numpy().astype(np.float32))   # [E,2I,D/32,16],[E,2I,D/32]
        b2, s2 = mxfp4_encode(m.mlp2_weight.detach().numpy().astype(np.float32))   # [E,D,I/32,16],[E,D,I/32]
        packed[i] = tuple(np.ascontiguousarray(a, dtype=np.uint8) for a in (b1, s1, b2, s2))
        w1 = torch.from_numpy(np.asarray(mxfp4_decode(b1, s1), dtype=np.float32))
        w2 = torch.from_numpy(np.asarray(mxfp4_decode(b2, s2), dtype=np.float32))
        m.frozen = (w1, w2)
    return packed


def round_bf16_(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))


def stage_export(args, P):
    tok, train, held = load_data(P)
    model = GptOss(CFG)
    model.load_state_dict(torch.load(P["final"], weights_only=False)["model"])
    nll, n = heldout_nll(model, held, args.seq, max_windows=64)
    print(f"[export] float model held-out(64 win) ppl {math.exp(nll / n):.2f}", flush=True)
    round_bf16_(model)
    packed = quantize_experts(model)
    nll, n = heldout_nll(model, held, args.seq, max_windows=64)
    print(f"[export] MXFP4 experts, before fine-tune: ppl {math.exp(nll / n):.2f}", flush=True)
    if args.finetune_minutes > 0:
        for mm in model.mlp:
            mm.mlp1_weight.requires_grad_(False)
            mm.mlp2_weight.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr * 0.1, betas=(0.9, 0.95), weight_decay=0.0)
        rng = np.random.default_rng(12345)
        t0, step, T, B = time.time(), 0, args.seq, args.batch
        while time.time() - t0 < args.finetune_minutes * 60:
            frac = (time.time() - t0) / (args.finetune_minutes * 60)
            for g in opt.param_groups:
                g["lr"] = args.lr * 0.1 * 0.5 * (1 + math.cos(math.pi * frac))
            starts = rng.integers(0, len(train) - T - 1, size=B)
            x = torch.from_numpy(np.stack([train[s:s + T + 1] for s in starts]).astype(np.int64))
            logits = model(x[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            (loss + args.aux_coef * model.aux_loss()).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
        round_bf16_(model)
        nll, n = heldout_nll(model, held, args.seq, max_windows=64)
        print(f"[export] after {step} fine-tune steps: ppl {math.exp(nll / n):.2f}", flush=True)
    torch.save({"model": model.state_dict(), "packed": packed, "cfg": CFG}, P["export"])
    write_package(model, packed, tok, args.out, args.seq)


# Sampling defaults written to generation_config.json, chosen with tools/tune_bundled_sampling.py
# (the measurements are in gptevo/data/austen/README.md).
SAMPLING_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}


def hf_config(c, context: int):
    """config.json with exactly the keys of the real gpt-oss HF config (facts §1.3), scaled down.

    eos/pad = <|endoftext|> (the only end token of this plain-text model). ``max_position_embeddings``
    is the trained context (``--seq``): the model has never seen a longer sequence, so gptevo refuses
    one. The YaRN values stay gpt-oss's (``factor`` is given, so max_position_embeddings does not enter
    the frequencies, in gptevo or in transformers)."""
    L = c["num_hidden_layers"]
    V = c["vocab_size"]
    return {
        "architectures": ["GptOssForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": V - 1,
        "experts_per_token": c["num_experts_per_tok"],
        "head_dim": c["head_dim"],
        "hidden_act": "silu",
        "hidden_size": c["hidden_size"],
        "initial_context_length": c["initial_context_length"],
        "initializer_range": 0.02,
        "intermediate_size": c["intermediate_size"],
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(L)],
        "max_position_embeddings": int(context),
        "model_type": "gpt_oss",
        "num_attention_heads": c["num_attention_heads"],
        "num_experts_per_tok": c["num_experts_per_tok"],
        "num_hidden_layers": L,
        "num_key_value_heads": c["num_key_value_heads"],
        "num_local_experts": c["num_local_experts"],
        "output_router_logits": False,
        "pad_token_id": V - 1,
        "quantization_config": {
            "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                       "model.embed_tokens", "lm_head"],
            "quant_method": "mxfp4",
        },
        "rms_norm_eps": c["rms_norm_eps"],
        "rope_scaling": {
            "beta_fast": c["beta_fast"],
            "beta_slow": c["beta_slow"],
            "factor": c["rope_factor"],
            "original_max_position_embeddings": c["initial_context_length"],
            "rope_type": "yarn",
            "truncate": False,
        },
        "rope_theta": c["rope_theta"],
        "router_aux_loss_coef": 0.9,
        "sliding_window": c["sliding_window"],
        "swiglu_limit": c["swiglu_limit"],
        "tie_word_embeddings": False,
        "transformers_version": "4.55.0.dev0",
        "use_cache": True,
        "vocab_size": V,
    }


def write_package(model, packed, tok, out, context: int):
    """Write the HF gpt-oss layout (names: facts §4; experts as MXFP4 _blocks/_scales, rest bf16)."""
    from safetensors.torch import save_file

    c = model.c
    os.makedirs(out, exist_ok=True)
    H, G, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    bf = lambda t: t.detach().to(torch.bfloat16).contiguous()   # noqa: E731
    u8 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.uint8))  # noqa: E731
    T = {"model.embed_tokens.weight": bf(model.embedding.weight),
         "model.norm.weight": bf(model.norm.scale),
         "lm_head.weight": bf(model.unembedding.weight)}
    for i, (a, m) in enumerate(zip(model.attn, model.mlp)):
        p = f"model.layers.{i}."
        W, b = a.qkv.weight, a.qkv.bias
        T[p + "input_layernorm.weight"] = bf(a.norm.scale)
        T[p + "self_attn.q_proj.weight"] = bf(W[:H * d])
        T[p + "self_attn.k_proj.weight"] = bf(W[H * d:(H + G) * d])
        T[p + "self_attn.v_proj.weight"] = bf(W[(H + G) * d:])
        T[p + "self_attn.q_proj.bias"] = bf(b[:H * d])
        T[p + "self_attn.k_proj.bias"] = bf(b[H * d:(H + G) * d])
        T[p + "self_attn.v_proj.bias"] = bf(b[(H + G) * d:])
        T[p + "self_attn.o_proj.weight"] = bf(a.out.weight)
        T[p + "self_attn.o_proj.bias"] = bf(a.out.bias)
        T[p + "self_attn.sinks"] = bf(a.sinks)
        T[p + "post_attention_layernorm.weight"] = bf(m.norm.scale)
        T[p + "mlp.router.weight"] = bf(m.gate.weight)
        T[p + "mlp.router.bias"] = bf(m.gate.bias)
        b1, s1, b2, s2 = packed[i]
        T[p + "mlp.experts.gate_up_proj_blocks"] = u8(b1)
        T[p + "mlp.experts.gate_up_proj_scales"] = u8(s1)
        T[p + "mlp.experts.gate_up_proj_bias"] = bf(m.mlp1_bias)
        T[p + "mlp.experts.down_proj_blocks"] = u8(b2)
        T[p + "mlp.experts.down_proj_scales"] = u8(s2)
        T[p + "mlp.experts.down_proj_bias"] = bf(m.mlp2_bias)
    save_file(T, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    V = c["vocab_size"]
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_config(c, context), f, indent=2, sort_keys=True)
        f.write("\n")
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": V - 2, "do_sample": True, "eos_token_id": [V - 1],
                   "pad_token_id": V - 1, **SAMPLING_DEFAULTS, "transformers_version": "4.55.0.dev0"},
                  f, indent=2)
        f.write("\n")
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "model_max_length": int(context),
                   "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False},
                  f, indent=2)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out))
    print(f"[export] wrote {out}: {len(T)} tensors, {total / 1e6:.2f} MB in all", flush=True)


def stage_package(args, P):
    """Rewrite the package data from the exported (fine-tuned) model without training again."""
    tok, _, _ = load_data(P)
    model = GptOss(CFG)
    ck = torch.load(P["export"], weights_only=False)
    model.load_state_dict(ck["model"])
    write_package(model, ck["packed"], tok, args.out, args.seq)


def stage_report(args, P):
    tok, train, held = load_data(P)
    model = GptOss(CFG)
    ck = torch.load(P["export"], weights_only=False)
    model.load_state_dict(ck["model"])
    quantize_experts(model)
    T, V = args.seq, CFG["vocab_size"]
    nll, n = heldout_nll(model, held, T)
    unll, un = unigram_nll(train, held, V, T)
    nbytes = predicted_bytes(tok, held, T)
    print(f"[report] held-out {HELDOUT_NOVEL}: {n} predicted tokens, {nbytes} bytes, windows of {T}")
    print(f"[report] torch MXFP4 model: ppl/token {math.exp(nll / n):.2f}  ppl/byte {math.exp(nll / nbytes):.4f}"
          f"  bits/byte {nll / nbytes / math.log(2):.3f}")
    print(f"[report] unigram (add-one): ppl/token {math.exp(unll / un):.2f}  ppl/byte {math.exp(unll / nbytes):.4f}"
          f"  bits/byte {unll / nbytes / math.log(2):.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", default="all", choices=["all", "tokenizer", "train", "export", "package", "report"])
    ap.add_argument("--workdir", default="/work/work-data")
    ap.add_argument("--out", default=os.path.join(ROOT, "gptevo", "data", "austen"))
    ap.add_argument("--minutes", type=float, default=27.0)
    ap.add_argument("--finetune-minutes", type=float, default=3.0)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--qat-frac", type=float, default=0.15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=float, default=60.0)
    ap.add_argument("--ckpt-every", type=float, default=120.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    P = paths(args.workdir)
    stages = ["tokenizer", "train", "export", "report"] if args.stage == "all" else [args.stage]
    for s in stages:
        if s == "tokenizer" and args.stage == "all" and os.path.exists(P["data"]):
            continue
        globals()["stage_" + s](args, P)


if __name__ == "__main__":
    main()
