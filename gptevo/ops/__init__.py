"""Every operator of the GPT lineage, defined once: spec entry + NumPy reference.

Importing this package imports each op module, which registers its ops in :data:`REGISTRY`.
The written spec of each op is in ``spec/ops/<module>.md``; the index is ``spec/README.md``.
"""
from __future__ import annotations

from gptevo.ops.spec import REGISTRY, Case, OpSpec, compute_dtype, register, widen

# Order matters only for readability of listings.
from gptevo.ops import (  # noqa: F401  (imported for their registrations)
    embedding,
    norms,
    activations,
    linear,
    dropout,
    blocks,
    softmax,
    masks,
    rope,
    attention,
    mxfp4,
    moe,
)

__all__ = ["REGISTRY", "Case", "OpSpec", "compute_dtype", "register", "widen"]
