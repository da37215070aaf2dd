"""The numba backend (not written yet: its issue comes after the reference and the models).

It is listed so that `gptevo.backends.available()` names it with the reason it cannot be used.
"""
from __future__ import annotations

OPS: dict = {}


def probe() -> str | None:
    return "the numba backend is not implemented yet in this version of gptevo"
