"""Sampling defaults from a model's ``generation_config.json`` (the Hugging Face convention).

A model directory may ship ``generation_config.json`` next to its ``config.json``. gptevo reads these
keys from it as the defaults of :func:`gptevo.generate` and of the command line:

==========================  =====================================================================
``temperature``             float >= 0
``top_k``                   int >= 0 (0 = off); a value above the vocabulary is the whole vocabulary
``top_p``                   float in (0, 1]
``min_p``                   float in [0, 1]
``repetition_penalty``      float > 0
``do_sample``               ``false`` makes greedy decoding (temperature 0) the default, as in HF
==========================  =====================================================================

Precedence, per parameter: the caller's argument when it is not None, else the file's value, else
gptevo's built-in default (temperature 1, every filter off). A file without ``do_sample`` samples
(HF's ``generate`` would decode greedily and apply an implicit ``top_k=50``; gptevo applies neither,
as llama.cpp does not). Other keys (``max_length``, ``max_new_tokens``, beam search, ...) are not
defaults here; the eos ids of the file are merged into the config by gptevo/config_adapters.py.
A value of the wrong type or range is a ConfigError naming the file and the key.
"""
from __future__ import annotations

import math
import os
import weakref

from gptevo.errors import ConfigError

FILE = "generation_config.json"
MAX_BYTES = 16_000_000
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")

_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def generation_config_path(model_dir) -> str | None:
    """``generation_config.json`` beside the model's config.json (top level or ``original/``), or None."""
    from gptevo.model_files import locate

    root = os.fspath(model_dir)
    if not os.path.isdir(root):
        return None
    config_path = locate(root).config_path
    folder = os.path.dirname(config_path) if config_path else root
    path = os.path.join(folder, FILE)
    return path if os.path.isfile(path) else None


def _number(d: dict, key: str, path: str, ok, expected: str, integer: bool = False):
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise ConfigError(f"{path}: field {key!r} must be {expected}, got {v!r}")
    if not math.isfinite(v) or not ok(v):
        raise ConfigError(f"{path}: field {key!r} must be {expected}, got {v!r}")
    return v


def defaults_from_dict(d, path: str, vocab_size: int | None = None) -> dict:
    """The sampling defaults of a parsed generation config (only the keys it sets; see module doc)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: must be a JSON object, got {type(d).__name__}")
    out: dict = {}
    rules = {
        "temperature": (lambda v: v >= 0, "a number >= 0", False),
        "top_k": (lambda v: v >= 0, "an integer >= 0", True),
        "top_p": (lambda v: 0 < v <= 1, "a number in (0, 1]", False),
        "min_p": (lambda v: 0 <= v <= 1, "a number in [0, 1]", False),
        "repetition_penalty": (lambda v: v > 0, "a number > 0", False),
    }
    for key, (ok, expected, integer) in rules.items():
        if d.get(key) is not None:
            out[key] = _number(d, key, path, ok, expected, integer)
    if "top_k" in out and vocab_size is not None and out["top_k"] > vocab_size:
        out["top_k"] = 0                      # keeping more than the vocabulary keeps everything
    do_sample = d.get("do_sample")
    if do_sample is not None and not isinstance(do_sample, bool):
        raise ConfigError(f"{path}: field 'do_sample' must be true or false, got {do_sample!r}")
    if do_sample is False:
        out["temperature"] = 0.0
    return out


def read_defaults(model_dir, vocab_size: int | None = None) -> dict:
    """The sampling defaults of a model directory ({} when it has no generation_config.json)."""
    from gptevo.strict_json import read_json_file

    path = generation_config_path(model_dir)
    if path is None:
        return {}
    return defaults_from_dict(read_json_file(path, path, ConfigError, MAX_BYTES), path, vocab_size)


def model_defaults(model) -> dict:
    """The sampling defaults of a loaded model: ``model.generation_defaults`` when set, else read from
    ``model.path`` (once per model), else {}."""
    given = getattr(model, "generation_defaults", None)
    if given is not None:
        return dict(given)
    try:
        return dict(_CACHE[model])
    except (KeyError, TypeError):
        pass
    path = getattr(model, "path", None)
    config = getattr(model, "config", None)
    found = read_defaults(path, getattr(config, "vocab_size", None)) if path is not None else {}
    try:
        _CACHE[model] = found
    except TypeError:
        pass
    return dict(found)


def merge(defaults: dict, **given) -> dict:
    """Per key: the caller's value when not None, else the default's (module doc, "Precedence")."""
    return {k: (v if v is not None else defaults.get(k)) for k, v in given.items()}
