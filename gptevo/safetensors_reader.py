"""Our own safetensors reader: strict header validation, lazy tensor reads.

Format (spec/formats.md, "safetensors"): 8-byte little-endian header length N, N bytes of UTF-8
JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the data section. Offsets are relative to the data section, which must be covered exactly:
entries sorted by offset are contiguous from 0 to the end of the file, no overlap, no hole, no
trailing bytes. Every rule is checked at open time, before any tensor is read; all size arithmetic
is Python ``int`` (``math.prod``), never NumPy (which wraps silently).

Reads (``SafetensorsFile.get``):
- ``mode="mmap"`` (default): a read-only ``np.memmap`` view through the file descriptor opened at
  construction, so a 13 GB file is never read into RAM and a file *replaced* by rename keeps
  serving the old bytes. Before each read the size is checked again with ``fstat``; a shrunk file
  raises FormatError (``check_unchanged``, which the model also calls before each forward pass).
  Residual risk (documented in spec/formats.md): if another process truncates the file *while*
  a mapped view is being read, that read raises SIGBUS, which Python cannot catch. Use
  ``mode="read"`` for files others may modify.
- ``mode="read"``: ``os.pread`` into a fresh array; a short read raises FormatError. No SIGBUS.
Arrays are always returned read-only. A tensor whose absolute offset is not a multiple of its
itemsize is returned as an aligned copy. Zero-size tensors are fresh empty arrays.
"""
from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass
from typing import Any

import numpy as np

from gptevo.errors import CheckpointError, FormatError
from gptevo.strict_json import loads_strict

MAX_HEADER_BYTES = 100_000_000   # same cap as the reference library (decimal 100 MB)
MAX_TENSORS = 1_000_000          # far above any real checkpoint (gpt-oss-120b: ~700 per file)
MAX_RANK = 8                     # real tensors have rank <= 4 (MXFP4 blocks [E, N, G, 16])
MAX_NAME_CHARS = 1024
MAX_METADATA_CHARS = 16_000_000  # all __metadata__ keys and values together (real files: < 1 kB)
JSON_WHITESPACE = b" \t\r\n"


def _ml_dtypes():
    import ml_dtypes  # a small pure dependency; loaded on first use

    return ml_dtypes


def _dtype_table() -> dict[str, np.dtype]:
    ml = _ml_dtypes()
    return {
        "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
        "BF16": np.dtype(ml.bfloat16),
        "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
        "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
        "F8_E4M3": np.dtype(ml.float8_e4m3fn), "F8_E5M2": np.dtype(ml.float8_e5m2),
    }


SUPPORTED_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL",
                    "F8_E4M3", "F8_E5M2")
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
            "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


@dataclass(frozen=True)
class TensorInfo:
    """One header entry. ``begin``/``end`` are relative to the data section; ``nbytes = end - begin``."""

    name: str
    dtype: str                 # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def np_dtype(self) -> np.dtype:
        return _dtype_table()[self.dtype]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_entry(src: str, name: Any, entry: Any) -> TensorInfo:
    """Validate one ``name: {dtype, shape, data_offsets}`` entry (types and self-consistency)."""
    if not isinstance(name, str) or not name:
        raise FormatError(f"{src}: tensor name must be a non-empty string, got {name!r}")
    if len(name) > MAX_NAME_CHARS or "\x00" in name:
        raise FormatError(f"{src}: tensor name {name[:60]!r}... is too long or contains NUL")
    where = f"{src}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise FormatError(f"{where}: entry must be an object, got {type(entry).__name__}")
    keys = set(entry)
    if keys != _ENTRY_KEYS:
        missing, extra = sorted(_ENTRY_KEYS - keys), sorted(keys - _ENTRY_KEYS)
        raise FormatError(f"{where}: entry keys must be exactly dtype, shape, data_offsets "
                          f"(missing {missing}, unexpected {[k[:40] for k in extra[:5]]})")
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        shown = dtype[:40] if isinstance(dtype, str) else dtype
        raise FormatError(f"{where}: unsupported dtype {shown!r}; supported: {', '.join(SUPPORTED_DTYPES)}")
    shape = entry["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        raise FormatError(f"{where}: shape must be a list of at most {MAX_RANK} integers, got "
                          f"{str(shape)[:80]}")
    for d in shape:
        if not _is_int(d) or d < 0:
            raise FormatError(f"{where}: shape {str(shape)[:80]} has {d!r}; dimensions must be "
                              f"non-negative integers")
    offsets = entry["data_offsets"]
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_int(o) and o >= 0 for o in offsets)):
        raise FormatError(f"{where}: data_offsets must be [begin, end] with non-negative integers, "
                          f"got {str(offsets)[:80]}")
    begin, end = offsets
    if end < begin:
        raise FormatError(f"{where}: data_offsets [{begin}, {end}] end before they begin")
    expected = math.prod(shape) * ITEMSIZE[dtype]   # Python int: cannot overflow
    if end - begin != expected:
        raise FormatError(f"{where}: shape {shape} {dtype} needs {expected} bytes, but data_offsets "
                          f"[{begin}, {end}] hold {end - begin}")
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def parse_header(header: bytes, data_size: int, src: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a header (the N JSON bytes) against a data section of ``data_size`` bytes.

    Returns (tensors by name, metadata). Raises FormatError naming ``src`` on any violation.
    """
    if not header.startswith(b"{"):
        raise FormatError(f"{src}: header must begin with '{{', got {header[:8]!r}")
    body = header.rstrip(JSON_WHITESPACE)  # trailing padding: JSON whitespace only (no NUL)
    obj = loads_strict(body, f"{src} header", FormatError)
    if not isinstance(obj, dict):
        raise FormatError(f"{src}: header must be a JSON object, got {type(obj).__name__}")
    if len(obj) > MAX_TENSORS + 1:
        raise FormatError(f"{src}: header lists {len(obj)} entries, more than the {MAX_TENSORS} limit")
    metadata: dict[str, str] = {}
    tensors: dict[str, TensorInfo] = {}
    for name, entry in obj.items():
        if name == "__metadata__":
            if entry is None:
                continue
            if not isinstance(entry, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in entry.items()):
                raise FormatError(f"{src}: __metadata__ must map strings to strings, got "
                                  f"{str(entry)[:80]}")
            if sum(len(k) + len(v) for k, v in entry.items()) > MAX_METADATA_CHARS:
                raise FormatError(f"{src}: __metadata__ holds more than {MAX_METADATA_CHARS} characters")
            metadata = dict(entry)
            continue
        tensors[name] = _check_entry(src, name, entry)
    # Coverage: sorted by (begin, end), each tensor starts where the previous ended, from 0 to the end.
    pos, prev = 0, None
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end, t.name)):
        if info.begin != pos:
            if info.begin > pos:
                after = f"after tensor {prev!r}" if prev else "at the start of the data section"
                raise FormatError(f"{src}: {info.begin - pos} unindexed bytes {after} (tensor "
                                  f"{info.name!r} begins at {info.begin}, expected {pos}); "
                                  f"the data section must be fully covered without holes")
            raise FormatError(f"{src}: tensor {info.name!r} [{info.begin}, {info.end}] overlaps tensor "
                              f"{prev!r} which ends at {pos}")
        pos, prev = info.end, info.name
    if pos > data_size:
        raise FormatError(f"{src}: tensor {prev!r} ends at data byte {pos}, but the data section has only "
                          f"{data_size} bytes (file truncated?)")
    if pos < data_size:
        raise FormatError(f"{src}: file not fully covered: tensors cover {pos} bytes of a {data_size}-byte "
                          f"data section ({data_size - pos} trailing bytes)")
    return tensors, metadata


class SafetensorsFile:
    """A validated, lazily read safetensors file.

    ``names()`` (sorted), ``info(name) -> TensorInfo``, ``get(name) -> np.ndarray`` (read-only),
    ``metadata`` (dict str->str). Use as a context manager or call ``close()``.
    """

    def __init__(self, path: str | os.PathLike, mode: str = "mmap"):
        if mode not in ("mmap", "read"):
            raise FormatError(f"SafetensorsFile mode must be 'mmap' or 'read', got {mode!r}")
        self.path = os.fspath(path)
        self.mode = mode
        self._file = None
        src = self.path
        try:
            if not stat.S_ISREG(os.stat(src).st_mode):   # never open a FIFO/device (may block)
                raise FormatError(f"{src}: not a regular file")
            self._file = open(src, "rb")
            st = os.fstat(self._file.fileno())
        except OSError as exc:
            raise FormatError(f"{src}: cannot open: {exc.strerror or exc}") from None
        try:
            self._size = st.st_size
            if self._size < 8:
                raise FormatError(f"{src}: header too small: file has {self._size} bytes, needs at least 8")
            n = int.from_bytes(self._pread(0, 8), "little")
            if n > MAX_HEADER_BYTES:
                raise FormatError(f"{src}: header too large: {n} bytes declared, limit {MAX_HEADER_BYTES}")
            if 8 + n > self._size:
                raise FormatError(f"{src}: invalid header length: {n} bytes declared but the file has only "
                                  f"{self._size - 8} bytes after the length field")
            self._data_start = 8 + n
            self._tensors, self.metadata = parse_header(self._pread(8, n), self._size - 8 - n, src)
        except BaseException:
            self.close()
            raise

    # -- file access ----------------------------------------------------------------------------
    def _pread(self, offset: int, size: int) -> bytes:
        if self._file is None:
            raise FormatError(f"{self.path}: file is closed")
        chunks, done = [], 0
        try:
            while done < size:
                chunk = os.pread(self._file.fileno(), min(size - done, 1 << 30), offset + done)
                if not chunk:
                    break
                chunks.append(chunk)
                done += len(chunk)
        except OSError as exc:
            raise FormatError(f"{self.path}: read failed at byte {offset + done}: {exc.strerror or exc}") from None
        if done != size:
            raise FormatError(f"{self.path}: file shrank while reading: wanted {size} bytes at {offset}, "
                              f"got {done}")
        return b"".join(chunks)

    def _read_array(self, offset: int, size: int) -> np.ndarray:
        """``size`` bytes at ``offset`` read into a fresh uint8 array (no mapping, no SIGBUS)."""
        buf = np.empty(size, dtype=np.uint8)
        view, done = memoryview(buf), 0
        try:
            while done < size:
                got = os.preadv(self._file.fileno(), [view[done:done + (1 << 30)]], offset + done)
                if got <= 0:
                    break
                done += got
        except OSError as exc:
            raise FormatError(f"{self.path}: read failed at byte {offset + done}: {exc.strerror or exc}") from None
        if done != size:
            raise FormatError(f"{self.path}: file shrank while reading: wanted {size} bytes at {offset}, "
                              f"got {done}")
        return buf

    @property
    def closed(self) -> bool:
        return self._file is None

    def check_unchanged(self) -> None:
        """FormatError if the file is closed or its size changed since it was opened (one ``fstat``).

        Callers holding mapped views (the model, before each forward pass) call it so that a file
        truncated after loading is reported instead of touched (touching it would raise SIGBUS).
        """
        if self._file is None:
            raise FormatError(f"{self.path}: file is closed")
        try:
            size_now = os.fstat(self._file.fileno()).st_size
        except OSError as exc:
            raise FormatError(f"{self.path}: cannot stat: {exc.strerror or exc}") from None
        if size_now != self._size:
            raise FormatError(f"{self.path}: file changed size since it was opened ({self._size} -> "
                              f"{size_now} bytes); reopen it")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- tensors --------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except (KeyError, TypeError):
            raise CheckpointError(f"{self.path}: no tensor named {str(name)[:120]!r}") from None

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only array of its stored dtype and shape (see module docstring)."""
        info = self.info(name)
        dtype = info.np_dtype
        if info.nbytes == 0:
            out = np.empty(info.shape, dtype=dtype)
        else:
            self.check_unchanged()
            offset = self._data_start + info.begin
            if self.mode == "read":
                out = self._read_array(offset, info.nbytes).view(dtype).reshape(info.shape)
            else:
                try:
                    mm = np.memmap(self._file, dtype=dtype, mode="r", offset=offset, shape=info.shape)
                except (OSError, ValueError) as exc:
                    raise FormatError(f"{self.path}: cannot map tensor {name!r}: {exc}") from None
                out = mm.view(np.ndarray)
                if offset % dtype.itemsize:
                    out = np.array(out)          # misaligned for its dtype: aligned private copy
        if info.dtype == "BOOL" and out.size and out.view(np.uint8).max() > 1:
            raise FormatError(f"{self.path}: BOOL tensor {name!r} holds bytes other than 0 and 1")
        out.flags.writeable = False
        return out
