"""The public error hierarchy.

Every error gptevo raises for bad input derives from :class:`GptevoError`, so callers can catch one
class. Messages name the file, tensor or field, what was found and what was expected.
"""
from __future__ import annotations


class GptevoError(Exception):
    """Base class of every error gptevo raises on purpose."""


class FormatError(GptevoError):
    """A file is missing, unreadable, or not in the format it claims (safetensors, shard index, ...)."""


class CheckpointError(FormatError):
    """The tensors of a checkpoint disagree with its config (missing, extra, wrong shape or dtype)."""


class ConfigError(GptevoError):
    """A model config is inconsistent, unsupported, or has a field of the wrong type or range."""


class RequestError(GptevoError, ValueError):
    """A call's arguments are invalid: bad token ids, empty prompt, bad sampling parameters, ..."""


class BackendError(GptevoError):
    """A backend is unknown, unavailable here, or lacks an op the model needs."""


class NumericalError(GptevoError):
    """A computation produced non-finite values (NaN or inf logits during generation)."""
