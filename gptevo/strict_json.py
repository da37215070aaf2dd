"""Strict JSON for untrusted model files (safetensors headers, config.json, shard indexes).

Python's ``json`` accepts things a model file must not contain, so every loader parses through
:func:`loads_strict`, which rejects (spec/formats.md, "JSON rules"):

- duplicate keys in any object (``{"a": 1, "a": 2}``; the last one would win silently);
- the non-standard constants ``NaN``, ``Infinity`` and ``-Infinity``;
- numbers that overflow a float (``1e999`` would become ``inf``);
- integers longer than Python's digit limit (ValueError) and nesting deep enough to exhaust the
  recursion limit (RecursionError);
- invalid UTF-8 and anything that is not JSON.

All of these become the error class the caller passes (FormatError or ConfigError), with a message
naming the file and, where ``json`` reports one, the position.
"""
from __future__ import annotations

import json
import math
from typing import Any

from gptevo.errors import GptevoError


class _Reject(Exception):
    """Raised inside the json hooks; converted to the caller's error class."""


def _pairs_no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Reject(f"duplicate key {key[:80]!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise _Reject(f"non-standard JSON constant {name} (only finite numbers are allowed)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Reject(f"number {text[:40]} overflows a float")
    return value


def loads_strict(data: bytes | str, source: str, error: type[GptevoError]) -> Any:
    """Parse ``data`` as strict JSON; raise ``error`` naming ``source`` on any problem."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{source}: invalid UTF-8 at byte {exc.start}: {exc.reason}") from None
    else:
        text = data
    try:
        return json.loads(text, object_pairs_hook=_pairs_no_duplicates,
                          parse_constant=_reject_constant, parse_float=_finite_float)
    except _Reject as exc:
        raise error(f"{source}: invalid JSON: {exc}") from None
    except json.JSONDecodeError as exc:
        raise error(f"{source}: invalid JSON at line {exc.lineno} column {exc.colno} "
                    f"(char {exc.pos}): {exc.msg}") from None
    except RecursionError:
        raise error(f"{source}: invalid JSON: nesting too deep") from None
    except (ValueError, OverflowError, MemoryError) as exc:  # e.g. int digit limit
        raise error(f"{source}: invalid JSON: {str(exc)[:200]}") from None


def read_json_file(path: str, source: str, error: type[GptevoError], max_bytes: int) -> Any:
    """Read at most ``max_bytes`` of a regular file and parse it with :func:`loads_strict`."""
    import os
    import stat

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # never open a FIFO or device (it may block)
            raise error(f"{source}: not a regular file")
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise error(f"{source}: not a regular file")
            if st.st_size > max_bytes:
                raise error(f"{source}: file is {st.st_size} bytes, more than the {max_bytes}-byte limit")
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"{source}: cannot read: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise error(f"{source}: file grew past the {max_bytes}-byte limit while reading")
    return loads_strict(data, source, error)
