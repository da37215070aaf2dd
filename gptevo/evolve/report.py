"""The result of ``gptevo evolve``: one dict with a stable schema (``--json``) and its text table.

Schema ``gptevo.evolve/1`` (every key always present; ``null`` where a value does not exist):

    schema        "gptevo.evolve/1"
    scale         {name, about, vocab_size, hidden_size, num_layers, num_heads, head_dim, kv_heads,
                   context, window, num_experts, experts_per_token, expert_width}
    backend       str | null (null when nothing was measured)
    context       int   (tokens in the KV cache for the KV, FLOPs and prefill figures)
    decode_tokens int
    threads       int | null (the measuring processes' thread count; null: the environment's defaults)
    steps         [ {id, title, parent, branch, section, change, diff {field: value}, diff_text, errata [str],
                     note, config {ModelConfig field: value},
                     computed {params_total, params_active, params_mlp, params_mlp_active, params_norms,
                               kv_bytes_per_token, kv_bytes_at_context, flops_per_token,
                               weight_bytes_per_token, weight_bytes, weight_bytes_bf16}   (ints)
                     measured {status "ok"|"skipped"|"error", note, backend, prefill_tok_s, decode_tok_s,
                               peak_rss_bytes, model_peak_bytes, build_s, warmup_s}
                     quality {status "ok"|"missing", heldout_loss, heldout_loss_std, heldout_ppl,
                              heldout_loss_2x, seeds, per_seed [float], trained_like}
                     claims [claim id] } ]
    claims        [ {id, step, section, quote, kind, scope, claimed, ours, ours_value, verdict, note,
                     errata [str]} ]
    quality       {available, scale, sizes, seeds, tokens_per_run, eval_tokens, total_train_cpu_s, note}
"""
from __future__ import annotations

import math
from dataclasses import fields
from typing import Callable

from gptevo.config import ModelConfig
from gptevo.errors import RequestError
from gptevo.evolve import claims as claims_mod
from gptevo.evolve.ladder import SCALES, describe_diff, get_scale, ladder
from gptevo.evolve.metrics import step_metrics
from gptevo.evolve.quality import load_quality, step_quality

SCHEMA = "gptevo.evolve/1"
DEFAULT_DECODE_TOKENS = 64
MEASURED_KEYS = ("prefill_tok_s", "decode_tok_s", "peak_rss_bytes", "model_peak_bytes", "build_s", "warmup_s")


# -- configs as JSON ----------------------------------------------------------------------------------
def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def config_to_dict(c: ModelConfig) -> dict:
    """Every ModelConfig field; tuples as lists, ``rope_scaling`` and ``extra`` as objects."""
    out = {}
    for f in fields(ModelConfig):
        v = getattr(c, f.name)
        out[f.name] = {k: _jsonable(x) for k, x in v} if f.name in ("rope_scaling", "extra") else _jsonable(v)
    return out


def config_from_dict(d: dict) -> ModelConfig:
    """The inverse of :func:`config_to_dict`."""
    kw = {}
    for f in fields(ModelConfig):
        if f.name not in d:
            continue
        v = d[f.name]
        if f.name in ("rope_scaling", "extra"):
            v = ModelConfig.freeze(v)
        elif isinstance(v, list):
            v = tuple(v)
        kw[f.name] = v
    return ModelConfig(**kw)


def default_context(scale: str) -> int:
    """Half of the scale's GPT-2 context, so every step can hold it plus the decoded tokens."""
    return get_scale(scale).context // 2


def _scale_dict(name: str) -> dict:
    s = SCALES[name]
    keys = ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "kv_heads", "context",
            "window", "num_experts", "experts_per_token", "expert_width")
    return {"name": s.name, "about": s.about, **{k: getattr(s, k) for k in keys}}


def _measured(status: str, note: str = "", **values) -> dict:
    out = {"status": status, "note": note, "backend": values.pop("backend", None)}
    out.update({k: values.get(k) for k in MEASURED_KEYS})
    return out


def _quality_summary(data: dict | None) -> dict:
    if data is None:
        return {"available": False, "scale": None, "sizes": None, "seeds": [], "tokens_per_run": None,
                "eval_tokens": None, "total_train_cpu_s": None,
                "note": "no quality data shipped (run tools/evolve_train.py)"}
    return {"available": True, "scale": data["scale"], "sizes": data.get("sizes"), "seeds": data.get("seeds", []),
            "tokens_per_run": data.get("recipe", {}).get("tokens_per_run"),
            "eval_tokens": data.get("eval", {}).get("tokens"), "total_train_cpu_s": data.get("total_train_cpu_s"),
            "note": f"held-out loss (nats/token) on Persuasion, models trained at the {data['scale']} scale "
                    f"(whatever --scale is), mean and sample std over {len(data.get('seeds', []))} seeds"}


# -- the run -------------------------------------------------------------------------------------------
def build(scale: str = "small", backend: str | None = None, context: int | None = None,
          decode_tokens: int = DEFAULT_DECODE_TOKENS, measure: bool = True, threads: int | None = None,
          progress: Callable[[str], None] | None = None, measure_fn=None, quality_path=None) -> dict:
    """The whole report (see the module doc for the schema). ``measure=False`` skips the measured
    columns; ``threads`` is passed to each measuring process (None: the environment's defaults);
    ``measure_fn(scale, step_id, backend, context, decode_tokens) -> dict`` replaces the per-step
    process (default :func:`gptevo.evolve.measure.measure_step`)."""
    from functools import partial

    from gptevo.evolve.measure import fits, measure_step

    get_scale(scale)
    context = default_context(scale) if context is None else context
    for name, v in (("--context", context), ("--decode-tokens", decode_tokens), ("--threads", threads)):
        if v is None and name == "--threads":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise RequestError(f"{name} must be a positive integer, got {v!r}")
    say = progress or (lambda msg: None)
    backend_name = None
    if measure:
        from gptevo import backends

        backend_name = backends.resolve(backend).name        # BackendError now if unusable
    measure_fn = measure_fn or partial(measure_step, threads=threads)
    steps = ladder(scale)
    qdata = load_quality(quality_path)
    rows = []
    for i, st in enumerate(steps):
        row = {"id": st.id, "title": st.title, "parent": st.parent, "branch": st.branch, "section": st.section,
               "change": st.change, "diff": {k: _jsonable(v) for k, v in st.diff.items()},
               "diff_text": describe_diff(st.diff), "errata": list(st.errata), "note": st.note,
               "config": config_to_dict(st.config), "computed": step_metrics(st.config, context),
               "quality": step_quality(qdata, st.id), "claims": []}
        if not measure:
            row["measured"] = _measured("skipped", "measurement off (--no-measure)")
        elif context + decode_tokens > st.config.context_length:
            row["measured"] = _measured("skipped", f"not measured: {context} + {decode_tokens} tokens exceed this "
                                        f"step's {st.config.context_length} positions")
        else:
            ok, why = fits(st.config, context, decode_tokens)
            if not ok:
                row["measured"] = _measured("skipped", why)
            else:
                say(f"[evolve] {i + 1}/{len(steps)} {st.id}: measuring on {backend_name} ...")
                r = measure_fn(scale, st.id, backend_name, context, decode_tokens)
                if "error" in r:
                    row["measured"] = _measured("error", r["error"])
                else:
                    row["measured"] = _measured("ok", "", **r)
                    say(f"[evolve]   prefill {r['prefill_tok_s']:.1f} tok/s, decode {r['decode_tok_s']:.1f} tok/s")
        rows.append(row)
    by_id = {r["id"]: r for r in rows}
    rows_20b = by_id if scale == "20b" else {
        st.id: {"computed": step_metrics(st.config, context), "config": config_to_dict(st.config)}
        for st in ladder("20b")}
    verdicts = claims_mod.evaluate(claims_mod.Context(by_id, rows_20b, qdata, context))
    for cl in verdicts:
        by_id[cl["step"]]["claims"].append(cl["id"])
    measured_any = any(r["measured"]["status"] == "ok" for r in rows)
    return {"schema": SCHEMA, "scale": _scale_dict(scale), "backend": backend_name if measured_any else None,
            "context": context, "decode_tokens": decode_tokens, "threads": threads, "steps": rows, "claims": verdicts,
            "quality": _quality_summary(qdata)}


# -- text ----------------------------------------------------------------------------------------------
def human(n: float | None, unit: str = "B") -> str:
    if n is None:
        return "-"
    sep = " " if unit else ""
    for prefix, k in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= k:
            return f"{n / k:.3g}{sep}{prefix}{unit}"
    return f"{n:.3g}{sep}{unit}"


def _loss(q: dict) -> str:
    if q["status"] != "ok":
        return "-"
    return f"{q['heldout_loss']:.3f}±{q['heldout_loss_std']:.3f}"


def _rate(m: dict, key: str) -> str:
    return "-" if m.get(key) is None else f"{m[key]:.1f}"


def format_table(r: dict) -> str:
    """The ladder table and the claims, as plain text."""
    head = ("step", "params", "active", "KV/tok", f"KV@{r['context']}", "FLOP/tok", "W read/tok",
            "prefill t/s", "decode t/s", "peak mem", "loss (small)")
    lines_ = []
    for row in r["steps"]:
        c, m, q = row["computed"], row["measured"], row["quality"]
        name = ("  " if row["branch"] else "") + row["id"] + (f" <{row['parent']}" if row["branch"] else "")
        lines_.append((name, human(c["params_total"], ""), human(c["params_active"], ""),
                       human(c["kv_bytes_per_token"]), human(c["kv_bytes_at_context"]),
                       human(c["flops_per_token"], ""), human(c["weight_bytes_per_token"]),
                       _rate(m, "prefill_tok_s"), _rate(m, "decode_tok_s"), human(m.get("model_peak_bytes")),
                       _loss(q)))
    widths = [max(len(str(x[i])) for x in [head] + lines_) for i in range(len(head))]
    fmt = lambda cells: "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w)  # noqa: E731
                                  for i, (v, w) in enumerate(zip(cells, widths)))
    s = r["scale"]
    out = [f"gptevo evolve: scale {s['name']} (D={s['hidden_size']}, L={s['num_layers']}, V={s['vocab_size']}), "
           f"context {r['context']}, backend {r['backend'] or 'none (not measured)'}", fmt(head)]
    out += [fmt(x) for x in lines_]
    out.append("")
    out.append("changes:")
    for row in r["steps"]:
        out.append(f"  {row['id']:15s} {row['change']}" + (f"  [{', '.join(row['errata'])}]" if row["errata"] else ""))
    notes = [(row["id"], row["measured"]["note"]) for row in r["steps"] if row["measured"]["note"]]
    if notes and len({n for _, n in notes}) == 1:
        out.append(f"measurement: {notes[0][1]} (every step)")
    else:
        out += [f"measurement, {sid}: {n}" for sid, n in notes]
    out.append(f"quality: {r['quality']['note']}")
    out.append("")
    out.append("the seed's claims:")
    for cl in r["claims"]:
        where = " [gpt-oss-20b]" if cl["scope"] == "20b" else ""
        out.append(f"  {cl['step']:15s} {cl['verdict'].upper():12s} seed: {cl['claimed']}{where}; ours: {cl['ours']}"
                   + (f" ({cl['note']})" if cl["note"] else "")
                   + (f" [{', '.join(cl['errata'])}]" if cl["errata"] else ""))
    return "\n".join(out) + "\n"
