"""Count the argument checks that run: the tool behind the tests of the one validation layer.

``with CheckCalls() as calls: ...`` counts, per op, how many times that op's check
(``OpSpec.check``) ran inside the block, however it was reached (a backend's checked op, a public
reference function, a composite's body), by watching for calls of the checks' code objects with
``sys.setprofile``. A call through a backend should run exactly one check, its op's own.
"""
from __future__ import annotations

import sys

from gptevo.ops import REGISTRY


class CheckCalls:
    """Context manager; ``counts`` maps op name -> runs of its check in this thread while active."""

    def __enter__(self) -> "CheckCalls":
        self.counts: dict[str, int] = {}
        op_of_code = {spec.check.__code__: name for name, spec in REGISTRY.items() if spec.check is not None}

        def profile(frame, event, arg):
            if event == "call" and frame.f_code in op_of_code:
                op = op_of_code[frame.f_code]
                self.counts[op] = self.counts.get(op, 0) + 1

        self._previous = sys.getprofile()
        sys.setprofile(profile)
        return self

    def __exit__(self, *exc) -> None:
        sys.setprofile(self._previous)
