"""Every backend x every op x every case, compared with the NumPy reference.

A backend that is not available here is a skip with its reason, never a pass. The reference
backend itself is run too: it proves that the cases are well formed and that the comparison
accepts identical outputs (the mutation tests in tests/unit/test_conformance_compare.py prove that
it rejects wrong ones).
"""
import pytest

from gptevo import backends
from gptevo.conformance.runner import check_case, iter_cases

CASES = list(iter_cases(seed=0))
AVAILABLE = backends.available()


@pytest.mark.parametrize("backend_name", backends.known())
@pytest.mark.parametrize("spec,case", CASES, ids=[f"{s.name}({c.label})" for s, c in CASES])
def test_op_matches_reference(backend_name, spec, case):
    if backend_name not in AVAILABLE:
        pytest.skip(f"backend {backend_name!r} unavailable: {AVAILABLE.unavailable[backend_name]}")
    backend = backends.get(backend_name)
    result = check_case(backend, spec, case)
    if result.skipped:
        pytest.skip(result.skipped)
    assert result.mismatch is None, f"{result.test_id}: {result.mismatch}"
