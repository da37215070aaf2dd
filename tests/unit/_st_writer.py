"""A tiny safetensors byte writer for tests: builds valid files and deliberately broken ones.

Independent of gptevo: offsets are plain running sums, the header is ``json.dumps`` (or raw bytes
given by the test), and the 8-byte length can be overridden.
"""
from __future__ import annotations

import json
import struct

import numpy as np

ST_DTYPE = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64",
            np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
            np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}


def layout(arrays: dict[str, np.ndarray]) -> tuple[dict, bytes]:
    """(header dict, data bytes) for ``arrays`` in insertion order, contiguous from offset 0."""
    header, chunks, pos = {}, [], 0
    for name, a in arrays.items():
        raw = np.ascontiguousarray(a).tobytes()
        dtype = ST_DTYPE.get(a.dtype) or {"bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3",
                                           "float8_e5m2": "F8_E5M2"}[a.dtype.name]
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [pos, pos + len(raw)]}
        chunks.append(raw)
        pos += len(raw)
    return header, b"".join(chunks)


def assemble(header: dict | str | bytes, data: bytes = b"", n: int | None = None, pad: bool = True) -> bytes:
    """8-byte little-endian length + header (JSON-encoded unless bytes/str) + data."""
    if isinstance(header, dict):
        hb = json.dumps(header).encode()
    elif isinstance(header, str):
        hb = header.encode()
    else:
        hb = header
    if pad and len(hb) % 8:
        hb += b" " * (8 - len(hb) % 8)
    return struct.pack("<Q", len(hb) if n is None else n) + hb + data


def build(arrays: dict[str, np.ndarray], metadata: dict | None = None) -> bytes:
    header, data = layout(arrays)
    if metadata is not None:
        header = {"__metadata__": metadata, **header}
    return assemble(header, data)


def write(path, content: bytes):
    with open(path, "wb") as f:
        f.write(content)
    return path
