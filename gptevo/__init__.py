"""gptevo: the GPT family, from GPT-2 to gpt-oss, on NumPy, Numba and CUDA without PyTorch.

Public API (stable; see README.md):
    gptevo.load(path, backend="reference") -> model with .config and .logits(ids)
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


def load(path, backend=None, **kwargs):
    """Load a checkpoint directory (Hugging Face or original gpt-oss layout) on a backend."""
    from gptevo.model import load as _load

    return _load(path, backend=backend, **kwargs)


def generate(weights, prompt, **kwargs):
    """Generate from a checkpoint directory or a loaded model; see gptevo.generation.generate."""
    from gptevo.generation import generate as _generate

    return _generate(weights, prompt, **kwargs)
