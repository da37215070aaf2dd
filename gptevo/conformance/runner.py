"""Run every case of every op on one backend and report the mismatches."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from gptevo.conformance.compare import Mismatch, compare
from gptevo.ops import REGISTRY, Case, OpSpec


@dataclass(frozen=True)
class Result:
    op: str
    backend: str
    case: str
    mismatch: Mismatch | None   # None = pass
    skipped: str | None = None  # reason when the backend lacks the op

    @property
    def test_id(self) -> str:
        return f"{self.op}[{self.backend}]({self.case})"


def tolerance_for(spec: OpSpec, case: Case) -> float:
    """The tolerance of ``spec`` for the compute dtype of ``case`` (float64 when any input is f64)."""
    uses_f64 = any(getattr(v, "dtype", None) == np.float64 for v in case.kwargs.values())
    return spec.tolerance["float64" if uses_f64 else "float32"]


def iter_cases(seed: int = 0) -> Iterator[tuple[OpSpec, Case]]:
    """Every (op spec, case) pair of the backend ops, deterministic for a given seed."""
    for name in sorted(REGISTRY):
        spec = REGISTRY[name]
        if not spec.backend_op:
            continue
        rng = np.random.default_rng(seed)
        for case in spec.cases(rng):
            yield spec, case


def check_case(backend, spec: OpSpec, case: Case) -> Result:
    """Run one case on ``backend`` and on the reference and compare them."""
    if spec.name not in backend.ops:
        return Result(spec.name, backend.name, case.label, None, skipped=f"backend lacks op {spec.name}")
    ref = spec.reference(**case.kwargs)
    out = backend.ops[spec.name](**case.kwargs)
    return Result(spec.name, backend.name, case.label, compare(out, ref, tolerance_for(spec, case), spec.exact))


def run_backend(name: str, seed: int = 0) -> list[Result]:
    """All results for backend ``name`` (BackendError if it is not available here)."""
    from gptevo import backends

    backend = backends.get(name)
    return [check_case(backend, spec, case) for spec, case in iter_cases(seed)]
