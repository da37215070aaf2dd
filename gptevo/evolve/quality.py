"""The held-out losses shipped as package data (``gptevo/data/evolve/quality.json``).

Written by ``tools/evolve_train.py`` (torch, run once; see that file and spec/evolution.md,
"Quality"). Schema 1:

    {"schema": 1, "scale": "small", "sizes": {...}, "corpus": {...}, "recipe": {...},
     "seeds": [0, 1], "eval": {...}, "total_train_cpu_s": float,
     "steps": {step id: {"trained_like": id, "quantized_after_training": bool,
                         "heldout_loss": float, "heldout_loss_std": float,
                         "heldout_loss_per_seed": [float, ...],
                         "heldout_loss_2x": float, "heldout_loss_2x_std": float,
                         "curve_tokens": [int, ...], "curve_loss": [float, ...],
                         "train_cpu_s": [float, ...], "gptevo_check": float (optional)}}}

Losses are mean cross-entropy in nats per token; ``*_std`` is the sample standard deviation over the
seeds; ``*_2x`` is the same text scored in windows twice the training length.
"""
from __future__ import annotations

import json
import math
from importlib.resources import files

from gptevo.errors import FormatError

DATA = ("data", "evolve", "quality.json")
_STEP_KEYS = {"heldout_loss": float, "heldout_loss_std": float, "heldout_loss_per_seed": list,
              "heldout_loss_2x": float, "heldout_loss_2x_std": float, "curve_tokens": list, "curve_loss": list}


def data_path():
    return files("gptevo").joinpath(*DATA)


def load_quality(path=None) -> dict | None:
    """The quality data, or None when the file is absent; FormatError naming the file and the field
    when it is present but malformed."""
    p = data_path() if path is None else path
    try:
        text = p.read_text(encoding="utf-8") if hasattr(p, "read_text") else open(p, encoding="utf-8").read()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FormatError(f"{p}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != 1 or not isinstance(data.get("steps"), dict):
        raise FormatError(f"{p}: expected an object with schema 1 and a 'steps' object")
    for sid, entry in data["steps"].items():
        for key, kind in _STEP_KEYS.items():
            v = entry.get(key) if isinstance(entry, dict) else None
            if kind is float:
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            else:
                ok = isinstance(v, kind)
            if not ok:
                raise FormatError(f"{p}: steps.{sid}.{key} must be a {kind.__name__}, got {v!r}")
    return data


def step_quality(data: dict | None, step_id: str) -> dict:
    """The quality fields of one step for the report (nulls when absent)."""
    entry = (data or {}).get("steps", {}).get(step_id)
    if entry is None:
        return {"status": "missing", "heldout_loss": None, "heldout_loss_std": None, "heldout_ppl": None,
                "heldout_loss_2x": None, "seeds": 0, "per_seed": [], "trained_like": None}
    return {"status": "ok", "heldout_loss": entry["heldout_loss"], "heldout_loss_std": entry["heldout_loss_std"],
            "heldout_ppl": math.exp(entry["heldout_loss"]), "heldout_loss_2x": entry["heldout_loss_2x"],
            "seeds": len(entry["heldout_loss_per_seed"]), "per_seed": list(entry["heldout_loss_per_seed"]),
            "trained_like": entry.get("trained_like", step_id)}
