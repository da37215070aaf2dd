"""The seed's claims about each step, beside our numbers, with a verdict.

Each claim quotes the seed (section heading, words) and is checked one of four ways:

- ``computed``: from the configs (calculators), exact; agrees when within ``tol`` (relative) of the
  claimed value or range;
- ``measured``: the ratio of two steps' measured tok/s on the chosen backend; agrees when the gain
  (ratio - 1) is within 25 % of the claimed gain; "not measured" when either step was not measured;
- ``quality``: from the shipped held-out losses (small scale, tools/evolve_train.py). A difference
  between two steps is *decisive* when every seed's difference has the same sign and the mean
  difference exceeds sqrt(std_a² + std_b²) (the two steps' seed spreads); a "better" claim agrees
  when decisively better, disagrees when decisively worse, else "inconclusive"; a bound ("< 2 %")
  agrees when the measured change is within the bound, disagrees when decisively beyond it;
- ``erratum``: a statement our fact sheets contradict (spec/errata.md), with the real value.

``scope`` says where it is evaluated: "scale" (the chosen --scale) or "20b" (the claim is about
gpt-oss-20b: always evaluated on the 20b ladder, whose last step is the real config).
The list and the rules are in spec/evolution.md, "Claims".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

MEASURED_TOL = 0.25
AGREES, DISAGREES, INCONCLUSIVE, NOT_MEASURED = "agrees", "disagrees", "inconclusive", "not measured"


@dataclass
class Context:
    """What the checks read: per step id, the computed/measured/quality fields at the chosen scale
    (``rows``), computed fields on the 20b ladder (``rows_20b``) and the raw quality data."""

    rows: dict
    rows_20b: dict
    quality: dict | None
    context: int

    def c(self, sid, key, big=False):
        return (self.rows_20b if big else self.rows)[sid]["computed"][key]

    def m(self, sid, key):
        row = self.rows.get(sid)
        return None if row is None else row["measured"].get(key)

    def q(self, sid):
        return ((self.quality or {}).get("steps") or {}).get(sid)


@dataclass(frozen=True)
class Claim:
    id: str
    step: str
    section: str
    quote: str
    kind: str                  # computed | measured | quality | erratum
    scope: str                 # scale | 20b
    claimed: str
    check: Callable[[Context], tuple]     # -> (ours value or None, ours in words, verdict, note)
    errata: tuple[str, ...] = ()


# -- helpers -------------------------------------------------------------------------------------
def _within(value: float, lo: float, hi: float, tol: float) -> bool:
    return lo - tol * abs(lo) <= value <= hi + tol * abs(hi)


def _numeric(value, lo, hi, tol):
    return AGREES if _within(value, lo, hi, tol) else DISAGREES


def _pct(x: float) -> str:
    return f"{x * 100:+.2f}%" if abs(x) < 0.01 else f"{x * 100:+.1f}%"


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _measured_ratio(ctx, a, b, key, lo, hi, what):
    r = _ratio(ctx.m(a, key), ctx.m(b, key))
    if r is None:
        return None, "not measured", NOT_MEASURED, f"needs {key} of steps {b} and {a}"
    return r, f"{r:.2f}x {what} ({a} vs {b})", _numeric(r - 1, lo - 1, hi - 1, MEASURED_TOL), ""


def decisive(qa: dict, qb: dict) -> tuple[float, bool]:
    """(mean loss difference a - b, whether it is decisive) from two steps' quality entries."""
    da, db = qa["heldout_loss_per_seed"], qb["heldout_loss_per_seed"]
    diffs = [x - y for x, y in zip(da, db)]
    mean = sum(diffs) / len(diffs)
    same_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    spread = math.hypot(qa["heldout_loss_std"], qb["heldout_loss_std"])
    return mean, same_sign and abs(mean) > spread


def _better(ctx, a, b, what="held-out loss"):
    """Claim: step a has a lower loss than step b."""
    qa, qb = ctx.q(a), ctx.q(b)
    if qa is None or qb is None:
        return None, "no quality data", NOT_MEASURED, ""
    diff, sure = decisive(qa, qb)
    words = f"{what} {qa['heldout_loss']:.3f} vs {qb['heldout_loss']:.3f} ({diff:+.3f} nats)"
    if not sure:
        return diff, words, INCONCLUSIVE, "within the seed spread"
    return diff, words, AGREES if diff < 0 else DISAGREES, ""


def _ppl_bound(ctx, a, b, bound):
    """Claim: perplexity of a exceeds b's by at most ``bound`` (a fraction)."""
    qa, qb = ctx.q(a), ctx.q(b)
    if qa is None or qb is None:
        return None, "no quality data", NOT_MEASURED, ""
    diff, sure = decisive(qa, qb)
    change = math.exp(diff) - 1
    words = f"perplexity {_pct(change)} ({a} vs {b})"
    if change <= bound:
        return change, words, AGREES, ""
    return change, words, DISAGREES if sure else INCONCLUSIVE, "" if sure else "within the seed spread"


# -- the checks ----------------------------------------------------------------------------------
def _dropout_memory(ctx):
    a = ctx.c("no_dropout", "weight_bytes") + ctx.c("no_dropout", "kv_bytes_at_context")
    b = ctx.c("gpt2", "weight_bytes") + ctx.c("gpt2", "kv_bytes_at_context")
    red = 1 - a / b
    return red, f"{_pct(red)} weights + KV (the inference graph is unchanged)", _numeric(red, 0.10, 0.15, 0.25), ""


def _convergence(ctx):
    """Tokens pre-norm needs to reach post-norm's final curve loss, relative to the whole budget."""
    pre, post = ctx.q("pre_norm"), ctx.q("post_norm")
    if pre is None or post is None or not pre["curve_loss"] or not post["curve_loss"]:
        return None, "no quality data", NOT_MEASURED, ""
    tokens = pre["curve_tokens"]

    def reach(curve, target):
        """Tokens at which ``curve`` first reaches ``target`` (linear between points), or None."""
        for i, loss in enumerate(curve):
            if loss <= target:
                if i == 0:
                    return float(tokens[0])
                t0, t1, l0, l1 = tokens[i - 1], tokens[i], curve[i - 1], loss
                return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
        return None

    budget = float(tokens[-1])
    t = reach(pre["curve_loss"], post["curve_loss"][-1])
    if t is not None:
        speed = budget / t
    else:                                   # post-norm ahead: how early post reached pre's final loss
        t = reach(post["curve_loss"], pre["curve_loss"][-1])
        speed = t / budget if t else 0.0
    bound = "at least " if t == float(tokens[0]) else ""   # passed already at the first curve point
    note = "learning curves at 10 points, mean over seeds, first 16 held-out windows"
    if speed > 3.0:
        note += f"; faster than claimed: post-norm reached only {post['curve_loss'][-1]:.2f} with the shared recipe"
    return speed, f"{bound}{speed:.2f}x (tokens to the same held-out loss)", \
        AGREES if speed >= 2.0 else DISAGREES, note


def _rope_params(ctx):
    d = ctx.c("rope", "params_total") - ctx.c("pre_norm", "params_total")
    rel = d / ctx.c("pre_norm", "params_total")
    return float(d), f"{d:+,} parameters ({_pct(rel)}): RoPE adds none, the position table goes", \
        AGREES if d <= 0 else DISAGREES, ""


def _extrapolation(ctx):
    q, learned = ctx.q("rope"), ctx.q("pre_norm")
    if q is None:
        return None, "no quality data", NOT_MEASURED, ""
    change = q["heldout_loss_2x"] / q["heldout_loss"] - 1
    words = f"loss {_pct(change)} at 2x the training length"
    if learned is not None:
        words += f" (learned positions: {_pct(learned['heldout_loss_2x'] / learned['heldout_loss'] - 1)})"
    return change, words, AGREES if change <= 0.02 else DISAGREES, "'minimal' read as at most +2% loss"


def _mlp_ratio(ctx, lo, hi, tol):
    r = ctx.c("swiglu", "params_mlp") / ctx.c("rope", "params_mlp")
    return r, f"{r:.3f}x MLP parameters", _numeric(r, lo, hi, tol), ""


def _norm_ratio(ctx):
    r = ctx.c("rmsnorm", "params_norms") / ctx.c("swiglu", "params_norms")
    return r, f"{r:.2f}x norm parameters ({_pct(r - 1)})", _numeric(r, 0.5, 0.5, 0.005), ""


def _kv_ratio(ctx, big):
    r = ctx.c("rmsnorm", "kv_bytes_per_token", big) / ctx.c("gqa", "kv_bytes_per_token", big)
    where = "gpt-oss-20b: 64 query / 8 KV heads" if big else "this scale"
    return r, f"{r:.1f}x smaller KV cache ({where})", _numeric(r, 6.0, 6.0, 0.005), ""


def _moe_capacity(ctx):
    r = ctx.c("moe", "params_mlp") / ctx.c("gqa", "params_mlp")
    return r, f"{r:.2f}x MLP parameters (experts {ctx.rows['moe']['config']['moe_intermediate_size']} wide)", \
        _numeric(r, 8.0, 8.0, 0.05), ""


def _moe_compute(ctx):
    r = ctx.c("moe", "params_mlp_active") / ctx.c("gqa", "params_mlp_active")
    k = ctx.rows["moe"]["config"]["experts_per_token"]
    return r, f"{r:.2f}x MLP FLOPs per token ({k} experts and the router)", _numeric(r, 2.0, 2.0, 0.05), ""


def _quality_per_flop(ctx):
    value, words, verdict, note = _better(ctx, "moe", "gqa")
    fr = ctx.c("moe", "flops_per_token") / ctx.c("gqa", "flops_per_token")
    words += f" at {fr:.2f}x FLOPs per token"
    if verdict == AGREES and fr > 1:
        verdict, note = INCONCLUSIVE, "better loss but more FLOPs per token"
    if verdict == DISAGREES and fr < 1:
        verdict, note = INCONCLUSIVE, "worse loss but fewer FLOPs per token"
    return value, words, verdict, note


def _sliding_memory(ctx):
    from gptevo.calculators import kv_cache_bytes
    from gptevo.evolve.report import config_from_dict

    cfg = config_from_dict(ctx.rows["sliding_window"]["config"])
    n = ctx.context
    r = kv_cache_bytes(cfg, 2 * n) / kv_cache_bytes(cfg, n)
    return r, f"KV cache grows {r:.2f}x from {n} to {2 * n} tokens (full layers still grow)", \
        _numeric(r, 1.0, 1.0, 0.01), ""


def _noted(result, note):
    value, ours, verdict, old = result
    return value, ours, verdict, "; ".join(n for n in (old, note) if n)


def _fixed(ours_words, verdict=DISAGREES, value=None, note=""):
    return lambda ctx: (value, ours_words, verdict, note)


def _twentyb(key, scale=1e9, unit="B", lo=None, hi=None, tol=0.005, step="mxfp4", fmt="{:.2f}"):
    def check(ctx):
        v = ctx.c(step, key, big=True) / scale
        return v, (fmt.format(v) + unit), _numeric(v, lo, hi, tol), ""
    return check


def _bytes_per_param(ctx):
    v = ctx.c("mxfp4", "weight_bytes") / ctx.c("mxfp4", "params_total")
    return v, f"{v:.3f} bytes per parameter over the whole model (4.25 bits per expert value)", \
        _numeric(v, 0.5, 0.5, 0.01), ""


def _mxfp4_memory(ctx, big):
    r = ctx.c("mxfp4", "weight_bytes_bf16", big) / ctx.c("mxfp4", "weight_bytes", big)
    return r, f"{r:.2f}x smaller than all-bf16" + (" (gpt-oss-20b)" if big else ""), _numeric(r, 4.0, 4.0, 0.05), ""


def _fits_16gb(ctx):
    v = ctx.c("mxfp4", "weight_bytes", big=True) / 1e9
    return v, f"{v:.2f} GB of weights", AGREES if v <= 16 else DISAGREES, "weights only; runtime memory adds to it"


# -- the list ------------------------------------------------------------------------------------
ARCH = "GPT-oss Architecture Analysis"
CLAIMS: tuple[Claim, ...] = (
    Claim("gpt2_post_norm", "gpt2", "Foundations: GPT-2 Baseline Architecture", "LayerNorm with post-norm placement",
          "erratum", "scale", "post-norm", _fixed("pre-norm: x + attn(ln_1(x)), then ln_f"), ("E1",)),
    Claim("dropout_speed", "no_dropout", "1. Dropout Elimination", "Dropout | Present | Removed | +15% inference speed",
          "measured", "scale", "+15% decode speed",
          lambda ctx: _noted(_measured_ratio(ctx, "no_dropout", "gpt2", "decode_tok_s", 1.15, 1.15, "decode tok/s"),
                             "dropout is the identity at inference: both steps run the same graph, so the "
                             "ratio is run-to-run noise")),
    Claim("dropout_memory", "no_dropout", "1. Dropout Elimination", "Memory Usage | Higher | Lower | 10-15% reduction",
          "computed", "scale", "10-15% less memory", _dropout_memory),
    Claim("dropout_quality", "no_dropout", "1. Dropout Elimination",
          "< 1B params | 0.1-0.2 | +2-3% improvement (dropout helps small models)", "quality", "scale",
          "dropout lowers the loss below 1B parameters", lambda ctx: _better(ctx, "gpt2", "no_dropout")),
    Claim("prenorm_convergence", "pre_norm", "2. Pre-LayerNorm Architecture",
          "Pre-LayerNorm | 100+ layers | Stable from start | 2-3x faster (convergence)", "quality", "scale",
          "2-3x faster convergence than post-norm", _convergence),
    Claim("prenorm_quality", "pre_norm", "2. Pre-LayerNorm Architecture",
          "Pre-LayerNorm provides cleaner gradient paths", "quality", "scale",
          "pre-norm trains better than post-norm", lambda ctx: _better(ctx, "pre_norm", "post_norm")),
    Claim("rope_params", "rope", "3. Rotary Position Embeddings (RoPE)", "Parameter Overhead | High (absolute) | None",
          "computed", "scale", "no parameters", _rope_params),
    Claim("rope_quality", "rope", "3. Rotary Position Embeddings (RoPE)",
          "Quality Score: Absolute (GPT-2) 85.2, RoPE (LLaMA) 89.3", "quality", "scale",
          "RoPE improves quality", lambda ctx: _better(ctx, "rope", "pre_norm")),
    Claim("rope_extrapolation", "rope", "3. Rotary Position Embeddings (RoPE)",
          "Modern LLMs can run at 2x-8x their trained context length with minimal quality drop", "quality",
          "scale", "minimal loss change at 2x the trained length", _extrapolation),
    Claim("swiglu_quality", "swiglu", "Research Insights: Performance vs Efficiency Trade-offs",
          "SwiGLU consistently outperforms GELU", "quality", "scale", "lower loss than GELU",
          lambda ctx: _better(ctx, "swiglu", "rope")),
    Claim("swiglu_params_1_5x", "swiglu", "4. SwiGLU Activation Function",
          "Parameter Increase: 1.5x more parameters in FFN", "computed", "scale", "1.5x MLP parameters",
          lambda ctx: _mlp_ratio(ctx, 1.5, 1.5, 0.02), ("E20",)),
    Claim("swiglu_params_table", "swiglu", "4. SwiGLU Activation Function",
          "SwiGLU (r=2.66) 7.98h^2 vs GELU (r=4) 8h^2", "computed", "scale", "0.9975x MLP parameters",
          lambda ctx: _mlp_ratio(ctx, 7.98 / 8, 7.98 / 8, 0.02)),
    Claim("rmsnorm_params", "rmsnorm", "5. RMSNorm vs LayerNorm",
          "Parameters | gamma, beta | gamma only | 50% reduction",
          "computed", "scale", "0.5x norm parameters", _norm_ratio),
    Claim("rmsnorm_quality", "rmsnorm", "Conclusion: From Complex to Simple Components",
          "RMSNorm over LayerNorm: Simpler normalization with better performance", "quality", "scale",
          "lower loss than LayerNorm", lambda ctx: _better(ctx, "rmsnorm", "swiglu")),
    Claim("gqa_kv_20b", "gqa", "6. Grouped-Query Attention (GQA)", "48 Query Heads -> 8 KV Groups (6:1 ratio), "
          "Memory Reduction: 6x smaller KV cache", "computed", "20b", "6x smaller KV cache",
          lambda ctx: _kv_ratio(ctx, True), ("E7", "E16")),
    Claim("gqa_speed", "gqa", "6. Grouped-Query Attention (GQA)", "GQA (48:8) | 98.5% | Inference Speed 2.1x",
          "measured", "scale", "2.1x decode speed",
          lambda ctx: _measured_ratio(ctx, "gqa", "rmsnorm", "decode_tok_s", 2.1, 2.1, "decode tok/s")),
    Claim("gqa_quality", "gqa", "6. Grouped-Query Attention (GQA)", "GQA (48:8) | Quality Score 98.5%",
          "quality", "scale", "at most 1.5% worse", lambda ctx: _ppl_bound(ctx, "gqa", "rmsnorm", 0.015)),
    Claim("moe_capacity", "moe", "7. Mixture of Experts (MoE)", "Increased Capacity: 8x parameters, 2x computation",
          "computed", "scale", "8x MLP parameters", _moe_capacity, ("E8",)),
    Claim("moe_compute", "moe", "7. Mixture of Experts (MoE)", "Increased Capacity: 8x parameters, 2x computation",
          "computed", "scale", "2x MLP computation", _moe_compute, ("E8",)),
    Claim("moe_quality_per_flop", "moe", "Research Insights: Performance vs Efficiency Trade-offs",
          "MoE Architectures: Achieve better quality-per-FLOP ratios", "quality", "scale",
          "lower loss per FLOP than dense", _quality_per_flop),
    Claim("window_262144", "sliding_window", "GPT-oss Architecture Analysis: Model Specifications",
          "Sliding Window | 262,144 | 262,144", "erratum", "20b", "W = 262,144",
          _fixed("W = 128 keys (itself included), on even layers only", value=128.0), ("E7", "E9")),
    Claim("window_constant_memory", "sliding_window", "Advanced Features: Sliding Window Attention",
          "Memory Efficiency: Constant memory usage regardless of sequence length", "computed", "scale",
          "KV cache constant in the sequence length", _sliding_memory, ("E9",)),
    Claim("gptoss_params", "mxfp4", ARCH + ": Model Specifications", "Parameters | 20.7B", "computed", "20b",
          "20.7B", _twentyb("params_total", lo=20.7, hi=20.7), ("E7",)),
    Claim("gptoss_active", "mxfp4", ARCH + ": MXFP4 Quantization Innovation",
          "\"total_active\": \"8.2B (40%)\"", "computed", "20b", "8.2B active",
          _twentyb("params_active", lo=8.2, hi=8.2), ("E15",)),
    Claim("mxfp4_memory", "mxfp4", "Research Insights: Performance vs Efficiency Trade-offs",
          "MXFP4 provides 4x memory reduction", "computed", "scale", "4x smaller weights",
          lambda ctx: _mxfp4_memory(ctx, False), ("E14",)),
    Claim("mxfp4_memory_20b", "mxfp4", "Research Insights: Performance vs Efficiency Trade-offs",
          "MXFP4 provides 4x memory reduction", "computed", "20b", "4x smaller weights",
          lambda ctx: _mxfp4_memory(ctx, True), ("E14",)),
    Claim("mxfp4_bytes", "mxfp4", ARCH + ": MXFP4 Quantization Innovation", "\"mxfp4\": 0.5 (bytes per parameter)",
          "computed", "scale", "0.5 bytes per parameter", _bytes_per_param, ("E14",)),
    Claim("mxfp4_16gb", "mxfp4", ARCH + ": MXFP4 Quantization Innovation", "gpt-oss-20b | MXFP4 | 16GB",
          "computed", "20b", "fits 16 GB", _fits_16gb),
    Claim("mxfp4_quality", "mxfp4", "Research Insights: Performance vs Efficiency Trade-offs",
          "MXFP4 provides 4x memory reduction with <2% quality loss", "quality", "scale", "< 2% worse",
          lambda ctx: _ppl_bound(ctx, "mxfp4", "gpt_oss", 0.02)),
)


def evaluate(ctx: Context) -> list[dict]:
    """Every claim with our number and the verdict (JSON-ready dicts, in ladder order)."""
    out = []
    for cl in CLAIMS:
        try:
            value, ours, verdict, note = cl.check(ctx)
        except KeyError as exc:          # a step absent from this report (should not happen)
            value, ours, verdict, note = None, "n/a", NOT_MEASURED, f"missing {exc}"
        out.append({"id": cl.id, "step": cl.step, "section": cl.section, "quote": cl.quote, "kind": cl.kind,
                    "scope": cl.scope, "claimed": cl.claimed, "ours": ours,
                    "ours_value": None if value is None else float(value), "verdict": verdict, "note": note,
                    "errata": list(cl.errata)})
    return out
