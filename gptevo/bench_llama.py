"""llama.cpp side of ``gptevo bench``: run ``llama-bench``, parse its JSON, count a GGUF's bytes per token.

llama.cpp is never a dependency: the user passes the path of a ``llama-bench`` binary and a GGUF file.

* :func:`run_llama_bench` runs ``PATH -m FILE -p P -n N -t T -r R -o json`` once and returns the
  parsed result rows (``llama-bench -o json`` prints one JSON array of test objects with ``n_prompt``,
  ``n_gen``, ``avg_ts``, ``stddev_ts``, ``model_size``, ``model_type``, ``build_commit``, ...).
* :func:`gguf_bytes_per_token` reads the GGUF header (no tensor data) and sums the bytes one decoded
  token reads: every tensor once, except the token (and position) table, one row, and the
  ``*_exps`` expert tensors, ``expert_used_count / expert_count`` of them. A tied head (no
  ``output.weight``) reads the whole token table. Tensor sizes come from the data offsets, so no
  table of ggml quantization types is needed.
"""
from __future__ import annotations

import json
import mmap
import os
import signal
import struct
import subprocess

from gptevo.errors import FormatError, RequestError

# GGUF metadata value types -> struct format (scalars), 8 = string, 9 = array
_GGUF_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def check_paths(binary: str, gguf: str) -> None:
    """RequestError unless ``binary`` is an executable file and ``gguf`` a readable file."""
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        raise RequestError(f"--llama-bench {binary}: not an executable file")
    if not os.path.isfile(gguf):
        raise RequestError(f"--gguf {gguf}: no such file")


def parse_llama_bench_json(text: str, source: str = "llama-bench") -> list[dict]:
    """The list of test objects in ``llama-bench -o json`` output (text before the array is ignored)."""
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end < start:
        raise FormatError(f"{source}: output holds no JSON array: {text[:200]!r}")
    try:
        rows = json.loads(text[start:end + 1])
    except json.JSONDecodeError as exc:
        raise FormatError(f"{source}: output is not valid JSON ({exc})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "avg_ts" in r for r in rows):
        raise FormatError(f"{source}: expected a list of test objects with 'avg_ts', got {str(rows)[:200]}")
    return rows


def run_llama_bench(binary: str, gguf: str, *, n_prompt: int, n_gen: int, threads: int, repeats: int = 3,
                    extra: tuple[str, ...] = (), timeout: float = 3600.0) -> dict:
    """One ``llama-bench`` run (``extra`` arguments appended); returns ``{"command", "rows"}`` or
    ``{"command", "error"}`` (never raises for a failing run, so gptevo's own figures are still printed)."""
    cmd = [binary, "-m", gguf, "-p", str(n_prompt), "-n", str(n_gen), "-t", str(threads), "-r", str(repeats),
           "-o", "json", *extra]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"command": cmd, "error": f"{type(exc).__name__}: {exc}"}
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout or "").strip().splitlines()[-3:])
        how = f"exit status {proc.returncode}"
        if proc.returncode < 0:
            try:
                how = f"killed by {signal.Signals(-proc.returncode).name}"
            except ValueError:
                how = f"killed by signal {-proc.returncode}"
        return {"command": cmd, "error": how + (f": {tail}" if tail else "")}
    try:
        return {"command": cmd, "rows": parse_llama_bench_json(proc.stdout, binary)}
    except FormatError as exc:
        return {"command": cmd, "error": str(exc)}


def summarize(run: dict) -> dict:
    """``{"tok_s", "stddev", "model_size", "build_commit", "model_type"}`` of a one-test run, or the error."""
    if "error" in run:
        return {"error": run["error"]}
    r = run["rows"][0]
    return {"tok_s": float(r["avg_ts"]), "stddev": float(r.get("stddev_ts") or 0.0),
            "model_size": r.get("model_size"), "build_commit": r.get("build_commit"),
            "model_type": r.get("model_type"), "n_prompt": r.get("n_prompt"), "n_gen": r.get("n_gen")}


# -- GGUF header -----------------------------------------------------------------------------------
class _Cursor:
    def __init__(self, buf, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise FormatError(f"{self.path}: GGUF header truncated at byte {self.pos}")
        v = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return v[0] if len(v) == 1 else v

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise FormatError(f"{self.path}: GGUF string runs past the end of the file")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", "replace")
        self.pos += n
        return s

    def value(self, t: int):
        if t in _GGUF_SCALAR:
            return self.take(_GGUF_SCALAR[t])
        if t == 8:
            return self.string()
        if t == 9:
            et, n = self.take("I"), self.take("Q")
            if et in _GGUF_SCALAR:                      # skip numeric arrays in one step
                size = struct.calcsize("<" + _GGUF_SCALAR[et]) * n
                self.pos += size
                return None
            for _ in range(n):
                self.value(et)
            return None
        raise FormatError(f"{self.path}: unknown GGUF value type {t} at byte {self.pos}")


def read_gguf_header(path: str) -> tuple[dict, list[tuple[str, tuple[int, ...], int]], int]:
    """(scalar metadata, [(tensor name, dims, size in bytes)], data start offset) of a GGUF file."""
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            c = _Cursor(buf, path)
            if bytes(buf[:4]) != b"GGUF":
                raise FormatError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r})")
            c.pos = 4
            version, n_tensors, n_kv = c.take("I"), c.take("Q"), c.take("Q")
            if version < 2:
                raise FormatError(f"{path}: GGUF version {version} is not supported (2 or later)")
            meta = {}
            for _ in range(n_kv):
                key, t = c.string(), c.take("I")
                meta[key] = c.value(t)
            infos = []
            for _ in range(n_tensors):
                name, nd = c.string(), c.take("I")
                dims = tuple(c.take("Q") for _ in range(nd))
                _type, offset = c.take("I"), c.take("Q")
                infos.append((name, dims, offset))
            align = int(meta.get("general.alignment") or 32)
            start = -(-c.pos // align) * align
            data_size = len(buf) - start
        finally:
            buf.close()
    ends = sorted({off for _, _, off in infos} | {data_size})
    nxt = {a: b for a, b in zip(ends, ends[1:])}
    return meta, [(n, d, nxt[off] - off) for n, d, off in infos], start


def gguf_bytes_per_token(path: str) -> dict:
    """``{"bytes_per_token", "file_bytes", "experts_used", "experts"}`` for decoding one token (see module doc)."""
    meta, tensors, _ = read_gguf_header(path)
    arch = meta.get("general.architecture")
    E = meta.get(f"{arch}.expert_count") or 0
    k = meta.get(f"{arch}.expert_used_count") or 0
    names = {n for n, _, _ in tensors}
    tied = "output.weight" not in names
    total = 0
    for name, dims, size in tensors:
        if name in ("token_embd.weight", "position_embd.weight"):
            rows = dims[-1] if dims else 1
            total += size // max(rows, 1)
            if name == "token_embd.weight" and tied:
                total += size
        elif "_exps" in name and E:
            total += size * k // E
        else:
            total += size
    return {"bytes_per_token": total, "file_bytes": os.path.getsize(path), "experts_used": k, "experts": E}
