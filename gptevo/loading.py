"""``load``: a model directory on a backend, checked before any tensor is read.

Split from :mod:`gptevo.model` (which computes) so that file keeps one concern; ``gptevo.load``
adds the bundled model's default path on top of this.
"""
from __future__ import annotations

import os

from gptevo import backends as _backends
from gptevo.config import ModelConfig
from gptevo.errors import ConfigError, RequestError
from gptevo.model import Model, compute_dtype, ops_needed


def load(path, backend=None, dtype="float32", check_weights=False, mmap=True, weights="stored",
         **options) -> Model:
    """Load a model directory (HF or original gpt-oss layout) on ``backend`` (see backends.resolve).

    The backend is checked for every op the model needs before any tensor is read; every tensor's
    shape and dtype is checked against the config from the checkpoint header before data is read.
    check_weights: also scan the values before returning: NaN/inf in any used floating tensor, and
                   MXFP4 scale bytes 255 (NaN) or blocks that overflow float32 (spec/formats.md,
                   "Weight values"). Off by default: it reads every weight once (seconds for 13 GB).
    mmap:          True (default) maps the files read-only (lazy, no RAM copy); False reads every
                   tensor into private memory, so files truncated later cannot raise SIGBUS
                   (spec/formats.md, "Reading tensors").
    weights:       "stored" (default: every tensor in its stored dtype, the exact path) or "int8":
                   dense matrices (attention, dense MLPs, output head) quantized to blockwise int8
                   with one scale per 32 values (spec/ops/int8.md); about half the bytes per decoded
                   token of bf16, with the error measured in spec/ops/int8.md.
    """
    if options:
        raise RequestError(f"load() got unknown option(s) {', '.join(sorted(options))}; "
                           f"known options: backend, dtype, check_weights, mmap, weights")
    for key, value in (("check_weights", check_weights), ("mmap", mmap)):
        if not isinstance(value, bool):
            raise RequestError(f"{key} must be True or False, got {value!r}")
    compute_dtype(dtype)
    from gptevo.prepare import check_weight_mode

    check_weight_mode(weights)
    from gptevo.checkpoint import Checkpoint
    from gptevo.config_adapters import load_config

    be = _backends.resolve(backend)
    config = load_config(path)
    if not isinstance(config, ModelConfig):
        raise ConfigError(f"{path}: load_config returned {type(config).__name__}, expected ModelConfig")
    be.require(ops_needed(config), what=f"the {config.family} model at {os.fspath(path)}")
    checkpoint = Checkpoint(path, mode="mmap" if mmap else "read")
    try:
        return Model.from_checkpoint(config, checkpoint, backend=be, path=path, dtype=dtype,
                                     check_weights=check_weights, weights=weights)
    except BaseException:
        checkpoint.close()
        raise
