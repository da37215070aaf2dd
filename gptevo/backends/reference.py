"""The reference backend: the NumPy reference of every registered op, unchanged.

``OPS`` holds the references' bodies (``OpSpec.kernel``), which take canonical arguments: the
registry's Backend puts each op's check in front, so a call through the backend is checked once,
exactly as a direct call of the public function (``OpSpec.reference``) is.
"""
from __future__ import annotations

from gptevo.ops import REGISTRY

OPS = {name: spec.kernel for name, spec in REGISTRY.items() if spec.backend_op}


def probe() -> None:
    """The reference needs only numpy, so it is always available."""
    return None
