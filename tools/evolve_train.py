"""Train every ladder step of ``gptevo evolve`` at one small scale on Jane Austen; ship the held-out losses.

    nice -n 19 python tools/evolve_train.py [--scale small] [--seeds 0,1] [--tokens 1000000]
        [--workdir /work/work-data] [--out gptevo/data/evolve/quality.json] [--only ID,ID] [--plan]

Every step of ``gptevo.evolve.ladder.ladder(scale)`` (the one definition; spec/evolution.md) is
trained from scratch with the same recipe: the same token budget, the same seeds (a seed fixes both
the initial weights and the order of the training windows, so runs with one seed see the same text),
the same optimiser and schedule. Steps that need no training of their own reuse others: ``pre_norm``
has an empty architectural diff (it is ``no_dropout``), and ``mxfp4`` is the trained ``gpt_oss``
models with their expert matrices quantized to MXFP4 after training (gptevo's ``mxfp4_encode``).

Data: the bundled model's tokenizer (gptevo/data/austen/tokenizer.json, vocab 4096 = the small
scale's vocabulary); training text = the five novels the bundled model was trained on, joined by
``<|endoftext|>``; held-out = *Persuasion*. Training windows of ``--seq`` tokens are drawn at random
(batch ``--batch``). Loss = cross-entropy (+ 0.01 x the seed's load-balancing loss on MoE steps).
AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), learning rate warmed up over 5% of the steps
to ``--lr`` then cosine to 10% of it, gradient clipping at 1. Dropout, where a step has it, is
GPT-2's: on the embeddings, the attention probabilities and each residual branch.

Evaluation (torch, no dropout): held-out loss in nats per token over ``--eval-windows`` windows of
``--seq`` tokens from the start of Persuasion (stride seq - 1, every token after a window's first is
predicted), the same text in windows of 2 x seq (longer than any training window: extrapolation),
and a learning curve on the first 16 windows at 10 points of training.

Check that the numbers belong to gptevo's architecture: for the first seed of each step the trained
weights are loaded into gptevo (``gptevo.evolve.random_model.weights_from_arrays``) and the NumPy
reference's logits on a held-out window of 2 x seq tokens are compared with torch's; the normalized
error max|a - b| / max(max|b|, 1) is stored (it must be < 1e-4 or the run stops).

Runs are saved one by one under WORKDIR/evolve/runs/ (a rerun skips the finished ones), then
``--out`` is written: the schema is documented in gptevo/evolve/quality.py. CPU seconds
(``time.process_time``) are recorded per run; ``--plan`` times a few steps of each config and prints
the CPU time the whole run would take, without training.
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

from gptevo.config import ModelConfig  # noqa: E402
from gptevo.evolve.ladder import ladder, SCALES  # noqa: E402

TRAIN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey")
HELDOUT_NOVEL = "persuasion"
TOKENIZER = os.path.join(ROOT, "gptevo", "data", "austen", "tokenizer.json")
EOS = "<|endoftext|>"
AUX_COEF = 0.01
CHECK_TOL = 1e-4


# -- data ------------------------------------------------------------------------------------------
def load_tokens(workdir: str) -> tuple[np.ndarray, np.ndarray]:
    """(training ids, held-out ids) as int64 arrays, cached in WORKDIR/evolve/tokens.npz."""
    cache = os.path.join(workdir, "evolve", "tokens.npz")
    if os.path.exists(cache):
        z = np.load(cache)
        return z["train"], z["held"]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(TOKENIZER)

    def read(name):
        path = os.path.join(workdir, "clean", name + ".txt")
        if not os.path.exists(path):
            raise SystemExit(f"{path} missing: run `python tools/austen_corpus.py {workdir}` first")
        with open(path, encoding="utf-8") as f:
            return f.read()

    eos = tok.token_to_id(EOS)
    train = []
    for name in TRAIN_NOVELS:
        train.extend(tok.encode(read(name)).ids)
        train.append(eos)
    held = tok.encode(read(HELDOUT_NOVEL)).ids
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    np.savez(cache, train=np.array(train, np.int64), held=np.array(held, np.int64))
    return np.array(train, np.int64), np.array(held, np.int64)


def eval_windows(held: np.ndarray, T: int, n: int) -> np.ndarray:
    """``n`` windows of T tokens with stride T - 1 from the start of ``held``: [n, T]."""
    return np.stack([held[s * (T - 1): s * (T - 1) + T] for s in range(n)])


# -- the model: every ModelConfig flag the ladder uses ---------------------------------------------
class Norm(nn.Module):
    def __init__(self, c: ModelConfig, dim: int, bias: bool = True):
        super().__init__()
        self.layer = c.norm == "layernorm"
        self.eps = c.norm_eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if self.layer and bias else None

    def forward(self, x):
        if self.layer:
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(c: ModelConfig, T: int):
    """cos, sin [T, Dh/2] (times YaRN's attention factor) from gptevo's own rope_frequencies."""
    from gptevo.ops.rope import rope_frequencies

    inv, factor = rope_frequencies(head_dim=c.head_dim, theta=c.rope_theta, rotary_dim=c.rotary_dim,
                                   scaling=c.scaling or None, seq_len=T)
    angle = torch.arange(T, dtype=torch.float32)[:, None] * torch.from_numpy(np.asarray(inv, np.float32))[None]
    return torch.cos(angle) * factor, torch.sin(angle) * factor                     # [T,Dh/2] each


def apply_rope(x, cos, sin):
    """Half-split rotation of x [B,T,H,Dh]: dim i pairs with dim i + Dh/2."""
    h = cos.shape[-1]
    a, b = x[..., :h], x[..., h:2 * h]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([a * c - b * s, b * c + a * s, x[..., 2 * h:]], dim=-1)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, layer: int, p: float):
        super().__init__()
        D, H, G, Dh = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        self.H, self.G, self.Dh, self.p = H, G, Dh, p
        self.q = nn.Linear(D, H * Dh, bias=c.qkv_bias)
        self.k = nn.Linear(D, G * Dh, bias=c.qkv_bias)
        self.v = nn.Linear(D, G * Dh, bias=c.qkv_bias)
        self.o = nn.Linear(H * Dh, D, bias=c.o_bias)
        self.q_norm = Norm(c, Dh, bias=False) if c.qk_norm else None
        self.k_norm = Norm(c, Dh, bias=False) if c.qk_norm else None
        self.sinks = nn.Parameter(torch.zeros(H)) if c.attention_sinks else None
        self.window = c.window_for_layer(layer)
        self.scale = c.attn_scale if c.attn_scale is not None else 1.0 / math.sqrt(Dh)

    def forward(self, x, rope):
        B, T, _ = x.shape
        H, G, Dh = self.H, self.G, self.Dh
        q = self.q(x).view(B, T, H, Dh)
        k = self.k(x).view(B, T, G, Dh)
        v = self.v(x).view(B, T, G, Dh)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k = k.repeat_interleave(H // G, dim=2)                                       # head h -> KV h // (H/G)
        v = v.repeat_interleave(H // G, dim=2)
        s = torch.einsum("bthd,bshd->bhts", q, k) * self.scale                       # [B,H,T,T]
        i = torch.arange(T)[:, None]
        j = torch.arange(T)[None, :]
        visible = j <= i
        if self.window is not None:
            visible = visible & (j > i - self.window)                                # W keys incl. self
        s = s.masked_fill(~visible, float("-inf"))
        if self.sinks is not None:
            sink = self.sinks.view(1, H, 1, 1).expand(B, H, T, 1)
            prob = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1]
        else:
            prob = torch.softmax(s, dim=-1)
        prob = F.dropout(prob, self.p, self.training)
        o = torch.einsum("bhts,bshd->bthd", prob, v).reshape(B, T, H * Dh)
        return self.o(o)


class DenseMLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        D, I, b = c.hidden_size, c.intermediate_size, c.mlp_bias
        self.gelu = c.mlp == "gelu"
        if self.gelu:
            self.fc, self.proj = nn.Linear(D, I, bias=b), nn.Linear(I, D, bias=b)
        else:
            self.gate, self.up, self.down = nn.Linear(D, I, bias=b), nn.Linear(D, I, bias=b), nn.Linear(I, D, bias=b)

    def forward(self, x):
        if self.gelu:
            return self.proj(F.gelu(self.fc(x), approximate="tanh"))
        return self.down(F.silu(self.gate(x)) * self.up(x))


class MoE(nn.Module):
    def __init__(self, c: ModelConfig, layers: int):
        super().__init__()
        D, E = c.hidden_size, c.num_experts
        I = c.moe_intermediate_size or c.intermediate_size
        self.c, self.I = c, I
        self.router = nn.Linear(D, E, bias=c.mlp_bias)
        self.gate_up = nn.Parameter(torch.randn(E, 2 * I, D) * 0.02)                 # [E,2I,D]
        self.down = nn.Parameter(torch.randn(E, D, I) * (0.02 / math.sqrt(2 * layers)))  # [E,D,I]
        self.gate_up_bias = nn.Parameter(torch.zeros(E, 2 * I)) if c.mlp_bias else None
        self.down_bias = nn.Parameter(torch.zeros(E, D)) if c.mlp_bias else None
        self.frozen = None          # (gate_up, down) decoded MXFP4 values used instead (evaluation)
        self.aux = torch.zeros(())

    def act(self, h):
        c, I = self.c, self.I
        if c.expert_activation == "clamped_swiglu":
            g = h[..., 0::2].clamp(max=c.swiglu_limit)
            lin = h[..., 1::2].clamp(min=-c.swiglu_limit, max=c.swiglu_limit)
            return g * torch.sigmoid(c.swiglu_alpha * g) * (lin + 1)
        return F.silu(h[..., :I]) * h[..., I:]

    def forward(self, x):
        B, T, D = x.shape
        c = self.c
        t = x.reshape(B * T, D)
        logits = self.router(t)                                                       # [N,E]
        E, k = logits.shape[-1], c.experts_per_token
        probs = torch.softmax(logits, dim=-1)                                         # [N,E]
        if c.router_order == "topk_softmax":
            top_v, top_i = logits.topk(k, dim=-1)
            w = torch.softmax(top_v, dim=-1)                                          # [N,k]
        else:
            top_v, top_i = probs.topk(k, dim=-1)
            w = top_v / top_v.sum(-1, keepdim=True) if c.norm_topk_prob else top_v
        frac = F.one_hot(top_i, E).float().sum(1).mean(0) / k                         # [E]
        self.aux = E * (frac * probs.mean(0)).sum()
        gate_up, down = self.frozen if self.frozen is not None else (self.gate_up, self.down)
        out = torch.zeros_like(t)
        for e in range(E):
            tok, slot = (top_i == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            h = t[tok] @ gate_up[e].T                                                 # [n,2I]
            if self.gate_up_bias is not None:
                h = h + self.gate_up_bias[e]
            y = self.act(h) @ down[e].T                                               # [n,D]
            if self.down_bias is not None:
                y = y + self.down_bias[e]                                             # before the weight
            out = out.index_add(0, tok, y * w[tok, slot, None])
        return out.view(B, T, D)


class Block(nn.Module):
    def __init__(self, c: ModelConfig, layer: int, p: float):
        super().__init__()
        self.pre, self.p = c.block_order == "pre", p
        self.attn_norm, self.mlp_norm = Norm(c, c.hidden_size), Norm(c, c.hidden_size)
        self.attn = Attention(c, layer, p)
        self.mlp = MoE(c, c.num_layers) if c.is_moe_layer(layer) else DenseMLP(c)

    def forward(self, x, rope):
        drop = lambda y: F.dropout(y, self.p, self.training)  # noqa: E731
        if self.pre:
            x = x + drop(self.attn(self.attn_norm(x), rope))
            return x + drop(self.mlp(self.mlp_norm(x)))
        x = self.attn_norm(x + drop(self.attn(x, rope)))
        return self.mlp_norm(x + drop(self.mlp(x)))


class Net(nn.Module):
    """The forward pass of gptevo.model for the ladder's flags, in torch, with GPT-2's dropout."""

    def __init__(self, c: ModelConfig, dropout: float):
        super().__init__()
        self.c, self.p = c, dropout
        V, D, L = c.vocab_size, c.hidden_size, c.num_layers
        self.embed = nn.Embedding(V, D)
        self.pos = nn.Embedding(c.max_position_embeddings, D) if c.position == "learned" else None
        self.blocks = nn.ModuleList([Block(c, i, dropout) for i in range(L)])
        self.final_norm = Norm(c, D)
        self.head = None if c.tie_word_embeddings else nn.Linear(D, V, bias=False)
        for name, prm in self.named_parameters():
            if name.endswith(("o.weight", "proj.weight", "down.weight")):
                nn.init.normal_(prm, std=0.02 / math.sqrt(2 * L))                     # residual outputs
            elif prm.dim() == 2 and "gate_up" not in name:
                nn.init.normal_(prm, std=0.02)
            elif name.endswith("bias") or name.endswith("sinks"):
                nn.init.zeros_(prm)
        self._rope: dict[int, tuple] = {}

    def forward(self, ids):
        T = ids.shape[1]
        rope = None
        if self.c.position == "rope":
            if T not in self._rope:
                self._rope[T] = rope_tables(self.c, T)
            rope = self._rope[T]
        x = self.embed(ids)
        if self.pos is not None:
            x = x + self.pos(torch.arange(T))[None]
        x = F.dropout(x, self.p, self.training)
        for b in self.blocks:
            x = b(x, rope)
        x = self.final_norm(x)
        return x @ (self.embed.weight if self.head is None else self.head.weight).T

    def aux_loss(self):
        moe = [b.mlp for b in self.blocks if isinstance(b.mlp, MoE)]
        return sum(m.aux for m in moe) / len(moe) if moe else torch.zeros(())


# -- gptevo export and check --------------------------------------------------------------------------
def to_roles(net: Net, mxfp4: bool = False):
    """(globals, layers) as gptevo weight roles: float32 arrays; experts as Mxfp4Weight if ``mxfp4``."""
    from gptevo.ops.mxfp4 import Mxfp4Weight, mxfp4_encode

    a = lambda t: t.detach().float().numpy().copy()  # noqa: E731
    c = net.c
    g = {"embed": a(net.embed.weight), "final_norm": a(net.final_norm.weight)}
    if net.final_norm.bias is not None:
        g["final_norm_bias"] = a(net.final_norm.bias)
    if net.pos is not None:
        g["pos_embed"] = a(net.pos.weight)
    if net.head is not None:
        g["lm_head"] = a(net.head.weight)
    layers = []
    for i, b in enumerate(net.blocks):
        at = b.attn
        L = {"attn_norm": a(b.attn_norm.weight), "mlp_norm": a(b.mlp_norm.weight),
             "wq": a(at.q.weight), "wk": a(at.k.weight), "wv": a(at.v.weight), "wo": a(at.o.weight)}
        if b.attn_norm.bias is not None:
            L.update(attn_norm_bias=a(b.attn_norm.bias), mlp_norm_bias=a(b.mlp_norm.bias))
        if c.qkv_bias:
            L.update(bq=a(at.q.bias), bk=a(at.k.bias), bv=a(at.v.bias))
        if c.o_bias:
            L["bo"] = a(at.o.bias)
        if at.q_norm is not None:
            L.update(q_norm=a(at.q_norm.weight), k_norm=a(at.k_norm.weight))
        if at.sinks is not None:
            L["sinks"] = a(at.sinks)
        m = b.mlp
        if isinstance(m, MoE):
            L["router"] = a(m.router.weight)
            if m.router.bias is not None:
                L["router_bias"] = a(m.router.bias)
            for role, w in (("experts_gate_up", m.gate_up), ("experts_down", m.down)):
                L[role] = Mxfp4Weight(*mxfp4_encode(a(w)), name=f"layer{i}.{role}") if mxfp4 else a(w)
            if m.gate_up_bias is not None:
                L.update(experts_gate_up_bias=a(m.gate_up_bias), experts_down_bias=a(m.down_bias))
        elif m.gelu:
            L.update(w_fc=a(m.fc.weight), w_proj=a(m.proj.weight))
            if m.fc.bias is not None:
                L.update(b_fc=a(m.fc.bias), b_proj=a(m.proj.bias))
        else:
            L.update(w_gate=a(m.gate.weight), w_up=a(m.up.weight), w_down=a(m.down.weight))
            if m.gate.bias is not None:
                L.update(b_gate=a(m.gate.bias), b_up=a(m.up.bias), b_down=a(m.down.bias))
        layers.append(L)
    return g, layers


def freeze_mxfp4(net: Net) -> None:
    """Replace every expert matrix by its MXFP4 round trip (gptevo's encoder and decoder)."""
    from gptevo.ops.mxfp4 import mxfp4_decode, mxfp4_encode

    for b in net.blocks:
        if isinstance(b.mlp, MoE):
            m = b.mlp
            dec = [torch.from_numpy(np.asarray(mxfp4_decode(*mxfp4_encode(w.detach().float().numpy())),
                                               np.float32)) for w in (m.gate_up, m.down)]
            m.frozen = tuple(dec)


def gptevo_check(net: Net, config: ModelConfig, ids: np.ndarray, mxfp4: bool) -> float:
    """Normalized error of gptevo's reference logits against torch's on ``ids`` [T]."""
    from gptevo.evolve.random_model import build_model, weights_from_arrays

    g, layers = to_roles(net, mxfp4=mxfp4)
    model = build_model(config, "reference", weights=weights_from_arrays(config, g, layers))
    ours = model.logits(ids.tolist())                                                 # [T,V]
    net.eval()
    with torch.no_grad():
        ref = net(torch.from_numpy(ids[None])).numpy()[0]                            # [T,V]
    return float(np.abs(ours - ref).max() / max(float(np.abs(ref).max()), 1.0))


# -- training ------------------------------------------------------------------------------------------
@torch.no_grad()
def heldout_loss(net: Net, windows: np.ndarray, batch: int = 16) -> float:
    """Mean cross-entropy (nats/token) of every token after each window's first."""
    net.eval()
    total, n = 0.0, 0
    for s in range(0, len(windows), batch):
        x = torch.from_numpy(windows[s:s + batch])
        logits = net(x[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
        n += x[:, 1:].numel()
    net.train()
    return total / n


def lr_at(step: int, steps: int, peak: float, warm: float = 0.05, floor: float = 0.1) -> float:
    w = max(1, int(warm * steps))
    if step < w:
        return peak * (step + 1) / w
    f = (step - w) / max(1, steps - w)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * f)))


def train_one(config: ModelConfig, dropout: float, seed: int, train: np.ndarray, evals: dict, args,
              max_steps: int | None = None) -> tuple[Net, dict]:
    torch.manual_seed(seed)
    net = Net(config, dropout)
    decay = [p for n, p in net.named_parameters() if p.dim() >= 2 and "embed" not in n and "pos" not in n]
    other = [p for n, p in net.named_parameters() if not any(p is q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    T, B = args.seq, args.batch
    steps = max(1, args.tokens // (T * B))
    rng = np.random.default_rng(1000 + seed)
    curve_at = sorted({max(1, round(steps * f / 10)) for f in range(1, 11)})
    curve, losses = [], []
    cpu0 = time.process_time()
    for step in range(steps if max_steps is None else min(steps, max_steps)):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, steps, args.lr)
        starts = rng.integers(0, len(train) - T - 1, size=B)
        x = torch.from_numpy(np.stack([train[s:s + T + 1] for s in starts]))
        logits = net(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        (loss + AUX_COEF * net.aux_loss()).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if max_steps is None and step + 1 in curve_at:
            curve.append([(step + 1) * T * B, heldout_loss(net, evals["curve"])])
    info = {"steps": steps, "tokens": steps * T * B, "train_cpu_s": time.process_time() - cpu0,
            "final_train_loss": float(np.mean(losses[-max(1, len(losses) // 20):])), "curve": curve}
    return net, info


def evaluate(net: Net, evals: dict) -> dict:
    return {"heldout_loss": heldout_loss(net, evals["main"]), "heldout_loss_2x": heldout_loss(net, evals["long"])}


# -- driver ---------------------------------------------------------------------------------------------
def trained_steps(steps):
    """The steps that are trained (each ``trained_like`` itself), in ladder order."""
    return [s for s in steps if s.trained_like == s.id]


def run_path(args, sid: str, seed: int) -> str:
    return os.path.join(args.workdir, "evolve", "runs", f"{args.scale}-{args.tokens}", f"{sid}-seed{seed}.json")


def plan(args, steps, train, evals) -> None:
    total = 0.0
    n_steps = max(1, args.tokens // (args.seq * args.batch))
    for st in trained_steps(steps):
        _, info = train_one(st.config, st.dropout, 0, train, evals, args, max_steps=4)
        per = info["train_cpu_s"] / 4
        run = per * n_steps * 1.05 + 3.0          # + curve and final evaluation, roughly
        total += run * len(args.seed_list)
        print(f"[plan] {st.id:15s} {per:6.3f} CPU s/step -> {run:6.0f} CPU s per run", flush=True)
    print(f"[plan] {len(trained_steps(steps))} configs x {len(args.seed_list)} seeds, {n_steps} steps "
          f"({n_steps * args.seq * args.batch} tokens) each: about {total / 60:.0f} CPU minutes", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", default="small", choices=sorted(SCALES))
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--tokens", type=int, default=1_000_000, help="training tokens per run")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-windows", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default="/work/work-data")
    ap.add_argument("--out", default=os.path.join(ROOT, "gptevo", "data", "evolve", "quality.json"))
    ap.add_argument("--only", default=None, help="comma-separated step ids to train (default: all)")
    ap.add_argument("--plan", action="store_true", help="time 4 steps per config and print the estimate")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    steps = ladder(args.scale)
    train, held = load_tokens(args.workdir)
    T = args.seq
    n = args.eval_windows
    evals = {"main": eval_windows(held, T, n), "curve": eval_windows(held, T, 16),
             "long": eval_windows(held, 2 * T - 1, n // 2)}
    # the long windows span (n/2)·(2T-2)+1 = n·(T-1)+1 tokens: the same text as the main windows
    if args.plan:
        plan(args, steps, train, evals)
        return 0
    only = set(args.only.split(",")) if args.only else None
    check_ids = held[-2 * T:]                                                         # [2T] held-out tail
    for st in trained_steps(steps):
        if only and st.id not in only:
            continue
        for seed in args.seed_list:
            path = run_path(args, st.id, seed)
            if os.path.exists(path):
                continue
            net, info = train_one(st.config, st.dropout, seed, train, evals, args)
            info.update(evaluate(net, evals))
            if seed == args.seed_list[0]:
                info["gptevo_check"] = gptevo_check(net, st.config, check_ids, mxfp4=False)
            for later in steps:                      # steps evaluated from this one's models (mxfp4)
                if later.trained_like == st.id and later.extra.get("quantized_after_training"):
                    freeze_mxfp4(net)
                    info[later.id] = evaluate(net, evals)
                    if seed == args.seed_list[0]:
                        info[later.id]["gptevo_check"] = gptevo_check(net, later.config, check_ids, mxfp4=True)
            bad = [v for v in (info.get("gptevo_check"), *(d.get("gptevo_check") for d in info.values()
                                                           if isinstance(d, dict))) if v is not None and v > CHECK_TOL]
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(info, f, indent=1)
            print(f"[train] {st.id:15s} seed {seed}: held-out {info['heldout_loss']:.4f} (2x: "
                  f"{info['heldout_loss_2x']:.4f}) in {info['train_cpu_s']:.0f} CPU s"
                  + (f", gptevo check {info['gptevo_check']:.1e}" if "gptevo_check" in info else ""), flush=True)
            if bad:
                raise SystemExit(f"{st.id}: gptevo's logits differ from torch's by {max(bad):.2e} > {CHECK_TOL}")
    write_data(args, steps)
    return 0


def write_data(args, steps) -> None:
    """Collect the runs into ``--out`` (schema: gptevo/evolve/quality.py)."""
    s = SCALES[args.scale]
    out_steps = {}
    total_cpu = 0.0
    for st in steps:
        runs = []
        for seed in args.seed_list:
            path = run_path(args, st.trained_like, seed)
            if not os.path.exists(path):
                break
            with open(path) as f:
                info = json.load(f)
            total_cpu += info["train_cpu_s"] if st.trained_like == st.id else 0.0
            if st.extra.get("quantized_after_training"):
                info = dict(info[st.id], curve=[], train_cpu_s=0.0)    # evaluation only, no training
            runs.append(info)
        if len(runs) != len(args.seed_list):
            print(f"[data] {st.id}: runs missing, left out", flush=True)
            continue
        loss = np.array([r["heldout_loss"] for r in runs])
        loss2 = np.array([r["heldout_loss_2x"] for r in runs])
        entry = {"trained_like": st.trained_like,
                 "quantized_after_training": bool(st.extra.get("quantized_after_training", False)),
                 "heldout_loss": float(loss.mean()),
                 "heldout_loss_std": float(loss.std(ddof=1)) if len(loss) > 1 else 0.0,
                 "heldout_loss_per_seed": [float(v) for v in loss],
                 "heldout_loss_2x": float(loss2.mean()),
                 "heldout_loss_2x_std": float(loss2.std(ddof=1)) if len(loss2) > 1 else 0.0,
                 "curve_tokens": [c[0] for c in runs[0].get("curve", [])],
                 "curve_loss": [float(np.mean([r["curve"][i][1] for r in runs]))
                                for i in range(len(runs[0].get("curve", [])))],
                 "train_cpu_s": [float(r.get("train_cpu_s", 0.0)) for r in runs]}
        check = runs[0].get("gptevo_check")
        if check is not None:
            entry["gptevo_check"] = check
        out_steps[st.id] = entry
    data = {
        "schema": 1,
        "scale": args.scale,
        "sizes": {"vocab_size": s.vocab_size, "hidden_size": s.hidden_size, "num_layers": s.num_layers,
                  "num_heads": s.num_heads, "head_dim": s.head_dim},
        "corpus": {"train": list(TRAIN_NOVELS), "heldout": HELDOUT_NOVEL,
                   "tokenizer": "gptevo/data/austen/tokenizer.json",
                   "train_tokens": int(len(load_tokens(args.workdir)[0]))},
        "recipe": {"tokens_per_run": (args.tokens // (args.seq * args.batch)) * args.seq * args.batch,
                   "seq": args.seq, "batch": args.batch, "lr": args.lr, "optimizer": "AdamW(0.9, 0.95), wd 0.1",
                   "schedule": "5% warmup, cosine to 10%", "aux_loss_coef": AUX_COEF, "threads": args.threads},
        "seeds": args.seed_list,
        "eval": {"windows": args.eval_windows, "seq": args.seq,
                 "tokens": args.eval_windows * (args.seq - 1), "long_seq": 2 * args.seq - 1,
                 "text": f"the first {args.eval_windows * (args.seq - 1) + 1} tokens of {HELDOUT_NOVEL}"},
        "total_train_cpu_s": total_cpu,
        "steps": out_steps,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    print(f"[data] wrote {args.out}: {len(out_steps)} steps, {total_cpu / 60:.1f} CPU minutes of training",
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
