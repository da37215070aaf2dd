"""gptevo: the GPT family, from GPT-2 to gpt-oss, on NumPy, Numba and CUDA without PyTorch.

Public API (stable; see README.md):
    gptevo.load(path, backend="reference") -> model with .config and .logits(ids)  (no path: the bundled model)
    gptevo.generate(path_or_model, prompt, backend=..., max_new_tokens=..., ...)
    gptevo.backends.available()
    gptevo.GptevoError and its subclasses

Importing gptevo loads only numpy and the standard library: backends, safetensors, tokenizers and
friends load on first use.
"""
from __future__ import annotations

from gptevo.errors import (
    BackendError,
    CheckpointError,
    ConfigError,
    FormatError,
    GptevoError,
    NumericalError,
    RequestError,
)
from gptevo import backends

__version__ = "0.1.0"

__all__ = [
    "load",
    "generate",
    "backends",
    "GptevoError",
    "FormatError",
    "CheckpointError",
    "ConfigError",
    "RequestError",
    "BackendError",
    "NumericalError",
    "__version__",
]


def load(path=None, backend=None, *, dtype="float32", check_weights=False, mmap=True, weights="stored"):
    """Load a checkpoint directory (Hugging Face or original gpt-oss layout) on a backend.

    path:          the model directory; None loads the bundled model (gptevo/data/austen, a small
                   gpt-oss-architecture model trained on Jane Austen).
    backend:       "reference", "numba", "cupy" or a plug-in's name; None: $GPTEVO_BACKEND, else numba
                   when installed, else reference.
    dtype:         activation and KV-cache dtype, "float32" (default) or "float64".
    check_weights: scan every used tensor for NaN/inf (and MXFP4 scales that decode to them) first.
    mmap:          map the files read-only (default) instead of reading them into private memory.
    weights:       "stored" (every tensor as stored) or "int8" (dense matrices as blockwise int8).
    See gptevo.loading.load for the details.
    """
    from gptevo.loading import load as _load

    if path is None:
        from gptevo.bundled import bundled_model_dir

        path = bundled_model_dir()
    return _load(path, backend=backend, dtype=dtype, check_weights=check_weights, mmap=mmap, weights=weights)


def generate(weights, prompt, *, backend=None, max_new_tokens=64, temperature=None, top_k=None, top_p=None,
             min_p=None, repetition_penalty=None, seed=None, stop=None, stop_token_ids=None, stream=False,
             truncation=None, timings=None):
    """Continue ``prompt`` (a str, or a list of token ids) with a model directory or a loaded model.

    Returns the new text (str), or the new token ids for a token-id prompt; with ``stream=True`` an
    iterator of text pieces (or ids). ``max_new_tokens=None`` generates until an eos token or the end
    of the model's context. ``temperature``, ``top_k``, ``top_p``, ``min_p`` and ``repetition_penalty``
    left as None take the model's ``generation_config.json`` values, else temperature 1 with every
    filter off; ``temperature=0`` is greedy. ``stop`` strings and ``stop_token_ids`` end generation
    early; ``truncation="left"`` drops the start of a prompt too long for the context; ``timings`` (a
    gptevo.generation.Timings) receives the prompt and decode times. See gptevo.generation.generate.
    """
    from gptevo.generation import generate as _generate

    return _generate(weights, prompt, backend=backend, max_new_tokens=max_new_tokens, temperature=temperature,
                     top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                     stop=stop, stop_token_ids=stop_token_ids, stream=stream, truncation=truncation,
                     timings=timings)
