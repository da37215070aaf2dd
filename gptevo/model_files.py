"""Where a model directory keeps its config and weights (shared by config_adapters and checkpoint).

Rules (spec/formats.md, "Model directories"):
1. If the directory itself holds ``model.safetensors`` or ``model.safetensors.index.json``, the
   weights and ``config.json`` are taken from the directory. (The Hugging Face gpt-oss repositories
   hold the HF checkpoint here *and* the original one in ``original/``: the HF one wins.)
2. Otherwise, if ``original/`` holds them, weights come from ``original/`` and the config from
   ``original/config.json`` (else the top-level ``config.json``).
3. Otherwise there are no safetensors weights; the config is ``config.json`` or
   ``original/config.json``, and a Checkpoint refuses the directory (pickle files are named).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
ORIGINAL = "original"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass(frozen=True)
class ModelFiles:
    root: str                  # the directory the user named
    weights_dir: str | None    # where model.safetensors / the index live (None: no safetensors)
    config_path: str | None    # the config.json to use (None: none found)


def _isfile(path: str) -> bool:
    try:
        return os.path.isfile(path)
    except (OSError, ValueError):
        return False


def has_safetensors(directory: str) -> bool:
    return _isfile(os.path.join(directory, SINGLE)) or _isfile(os.path.join(directory, INDEX))


def pickle_files(directory: str) -> list[str]:
    """Names of pickle-format checkpoint files in ``directory`` (never opened)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES)
                  or n.startswith("pytorch_model") and n.endswith(".index.json"))


def locate(model_dir: str | os.PathLike) -> ModelFiles:
    root = os.fspath(model_dir)
    original = os.path.join(root, ORIGINAL)
    top_cfg = os.path.join(root, "config.json")
    orig_cfg = os.path.join(original, "config.json")
    if has_safetensors(root):
        return ModelFiles(root, root, top_cfg if _isfile(top_cfg) else None)
    if os.path.isdir(original) and has_safetensors(original):
        cfg = orig_cfg if _isfile(orig_cfg) else (top_cfg if _isfile(top_cfg) else None)
        return ModelFiles(root, original, cfg)
    cfg = top_cfg if _isfile(top_cfg) else (orig_cfg if _isfile(orig_cfg) else None)
    return ModelFiles(root, None, cfg)
