"""Residual blocks: where the normalisation sits relative to the residual add (spec: ``spec/ops/blocks.md``).

Not a backend op: it takes callables (the sublayer and the norm), so it is the same on every
backend. It is the specification of the block order, not the code path: ``model.py``
(``Model._block``) writes the same two orders inline, choosing by ``ModelConfig.block_order``, because
it records the normalised input and the sublayer output of each block for ``Model.trace`` between
the two steps. Every family gptevo loads is pre-norm.
"""
from __future__ import annotations

import numpy as np

from gptevo.errors import RequestError
from gptevo.ops.spec import op

SPEC = "spec/ops/blocks.md"


def _no_cases(rng: np.random.Generator):
    """No conformance cases: a Case holds arrays and scalars only, and this op takes callables.

    It is checked by tests/unit/test_ops_blocks.py against the hand-written equations instead.
    """
    return iter(())


@op("residual_block",
    signature='residual_block(x[T,D], sublayer: callable, norm: callable, order="pre"|"post") -> [T,D]',
    dtypes="x: f32|f64 (whatever sublayer and norm accept)",
    tolerance={"float32": 1e-6, "float64": 1e-12},
    cases=_no_cases,
    source="seed '2. Pre-LayerNorm Architecture' (post: x_{l+1} = LN(x_l + F(x_l)); pre: x_{l+1} = x_l + "
           "F(LN(x_l))); Xiong et al. 2020",
    spec_file=SPEC,
    backend_op=False)
def residual_block(x, sublayer, norm, order="pre"):
    """One residual sublayer with its normalisation.

    ``order="pre"`` (GPT-2 code, GPT-3 and later, every modern family): ``x + sublayer(norm(x))``.
    ``order="post"`` (original Transformer): ``norm(x + sublayer(x))``.
    x: [T, D]; ``sublayer`` and ``norm`` map [T, D] -> [T, D]. Returns [T, D].
    """
    if order not in ("pre", "post"):
        raise RequestError(f'residual_block: order must be "pre" or "post"; found {order!r}')
    for name, fn in (("sublayer", sublayer), ("norm", norm)):
        if not callable(fn):
            raise RequestError(f"residual_block: {name} must be callable; found {type(fn).__name__}")
    if order == "pre":
        return x + sublayer(norm(x))  # [T,D]
    return norm(x + sublayer(x))  # [T,D]
