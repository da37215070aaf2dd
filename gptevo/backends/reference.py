"""The reference backend: the NumPy reference of every registered op, unchanged."""
from __future__ import annotations

from gptevo.ops import REGISTRY

OPS = {name: spec.reference for name, spec in REGISTRY.items() if spec.backend_op}


def probe() -> None:
    """The reference needs only numpy, so it is always available."""
    return None
