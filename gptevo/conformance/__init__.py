"""The conformance suite: every case of every op on a backend, compared with the reference.

Run it as ``python -m gptevo.conformance -b NAME`` or through pytest (``tests/conformance``).
"""
from gptevo.conformance.compare import Mismatch, compare, normalized_error
from gptevo.conformance.runner import run_backend

__all__ = ["Mismatch", "compare", "normalized_error", "run_backend"]
