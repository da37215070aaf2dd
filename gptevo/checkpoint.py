"""A model directory's tensors: one safetensors file, or shards named by an index.

``Checkpoint(path)`` accepts a model directory (HF layout, or the original gpt-oss layout with its
weights in ``original/``; see gptevo/model_files.py) or a single ``.safetensors`` file, and exposes
``names()``, ``info(name)`` (dtype, shape) and ``get(name) -> np.ndarray`` (read-only, lazily read
through gptevo.safetensors_reader). Every file is fully validated when the Checkpoint is built.

Shard index rules (spec/formats.md, "Shard index"): ``model.safetensors.index.json`` is strict JSON
``{"metadata": {...}, "weight_map": {tensor: shard}}``; each shard value is a plain basename
ending in ``.safetensors`` (no directory parts, not absolute, no ``..``), whose real path stays
inside the directory (a symlink out is refused, except into the ``blobs`` directory of a Hugging
Face hub cache snapshot, ``<repo>/snapshots/<rev>`` -> ``<repo>/blobs``); every shard exists; every tensor
the index names is in its shard; every tensor in a shard is named by the index for that shard; no tensor is in two
shards. If both ``model.safetensors`` and an index exist, the single file is used (as transformers
does). Pickle checkpoints (``pytorch_model.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``) are refused and
never opened. Which tensors a model needs, and their shapes, is the model's business
(``gptevo/model.py``), not this module's.
"""
from __future__ import annotations

import os

import numpy as np

from gptevo.errors import CheckpointError, FormatError
from gptevo.model_files import INDEX, SINGLE, locate, pickle_files
from gptevo.safetensors_reader import SafetensorsFile, TensorInfo
from gptevo.strict_json import read_json_file

MAX_INDEX_BYTES = 64_000_000
MAX_SHARDS = 100_000

__all__ = ["Checkpoint", "TensorInfo", "SafetensorsFile"]


def _check_shard_name(index_path: str, tensor: str, shard) -> None:
    where = f"{index_path}: weight_map[{tensor[:120]!r}]"
    if not isinstance(shard, str) or not shard:
        raise FormatError(f"{where} must be a shard file name, got {str(shard)[:80]!r}")
    bad = ("/" in shard or "\\" in shard or "\x00" in shard or shard in (".", "..")
           or os.path.isabs(shard) or os.path.basename(shard) != shard)
    if bad:
        raise FormatError(f"{where} = {shard[:120]!r}: shard names must be plain file names inside the "
                          f"model directory (no paths)")
    if not shard.endswith(".safetensors"):
        raise FormatError(f"{where} = {shard[:120]!r}: shard names must end in .safetensors")


def allowed_roots(weights_dir: str) -> list[str]:
    """Real directories a weight file may resolve into: the model directory itself and, for a
    Hugging Face hub cache snapshot (``<repo>/snapshots/<revision>``), that repository's ``blobs``
    directory, where the hub keeps the files its snapshot symlinks point to."""
    root = os.path.realpath(weights_dir)
    roots = [root]
    parent = os.path.dirname(os.path.abspath(weights_dir))
    if os.path.basename(parent) == "snapshots":
        roots.append(os.path.realpath(os.path.join(os.path.dirname(parent), "blobs")))
    return roots


def check_inside(weights_dir: str, name: str, what: str) -> str:
    """The path of ``name`` in ``weights_dir``; FormatError when its real path leaves the allowed roots."""
    full = os.path.join(weights_dir, name)
    real = os.path.realpath(full)
    roots = allowed_roots(weights_dir)
    if not any(os.path.commonpath([r, real]) == r for r in roots):
        raise FormatError(f"{what}: {name!r} resolves to {real}, outside the model directory {roots[0]} "
                          f"(symlink?)")
    return full


class Checkpoint:
    """The tensors of one model directory (or one .safetensors file), validated and lazily read."""

    def __init__(self, path: str | os.PathLike, mode: str = "mmap"):
        self.path = os.fspath(path)
        self._files: dict[str, SafetensorsFile] = {}    # shard basename -> open file
        self._where: dict[str, str] = {}                # tensor name -> shard basename
        self.metadata: dict = {}
        try:
            if os.path.isfile(self.path):
                if not self.path.endswith(".safetensors"):
                    raise FormatError(f"{self.path}: not a .safetensors file")
                self.weights_dir = os.path.dirname(self.path) or "."
                self._open_single(os.path.basename(self.path), mode, check=False)
                return
            if not os.path.isdir(self.path):
                raise FormatError(f"{self.path}: no such model directory or .safetensors file")
            files = locate(self.path)
            if files.weights_dir is None:
                found = pickle_files(self.path) + [
                    f"original/{n}" for n in pickle_files(os.path.join(self.path, "original"))]
                if found:
                    raise FormatError(f"{self.path}: only pickle checkpoints found ({', '.join(found[:5])}); "
                                      f"pickle checkpoints are refused; convert to safetensors")
                raise FormatError(f"{self.path}: no {SINGLE} or {INDEX} (looked in the directory and "
                                  f"in original/)")
            self.weights_dir = files.weights_dir
            if os.path.isfile(os.path.join(self.weights_dir, SINGLE)):
                self._open_single(SINGLE, mode)
            else:
                self._open_index(mode)
        except BaseException:
            self.close()
            raise

    # -- construction -----------------------------------------------------------------------------
    def _open_single(self, name: str, mode: str, check: bool = True) -> None:
        path = os.path.join(self.weights_dir, name)
        if check:
            path = check_inside(self.weights_dir, name, self.weights_dir)
        f = SafetensorsFile(path, mode=mode)
        self._files[name] = f
        self.metadata = dict(f.metadata)
        self._where = {t: name for t in f.names()}

    def _open_index(self, mode: str) -> None:
        index_path = os.path.join(self.weights_dir, INDEX)
        index = read_json_file(index_path, index_path, FormatError, MAX_INDEX_BYTES)
        if not isinstance(index, dict):
            raise FormatError(f"{index_path}: must be a JSON object, got {type(index).__name__}")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise FormatError(f"{index_path}: 'weight_map' must be a non-empty object of "
                              f"tensor name -> shard file")
        meta = index.get("metadata", {})
        if meta is not None and not isinstance(meta, dict):
            raise FormatError(f"{index_path}: 'metadata' must be an object, got {type(meta).__name__}")
        self.metadata = dict(meta or {})
        for tensor, shard in weight_map.items():
            _check_shard_name(index_path, tensor, shard)
        shards = sorted(set(weight_map.values()))
        if len(shards) > MAX_SHARDS:
            raise FormatError(f"{index_path}: {len(shards)} shards, more than the {MAX_SHARDS} limit")
        for shard in shards:
            full = check_inside(self.weights_dir, shard, f"{index_path}: shard")
            if not os.path.isfile(full):
                raise FormatError(f"{index_path}: shard {shard!r} named by the index does not exist in "
                                  f"{self.weights_dir}")
            self._files[shard] = SafetensorsFile(full, mode=mode)
        seen: dict[str, str] = {}
        for shard in shards:
            for tensor in self._files[shard].names():
                if tensor in seen:
                    raise FormatError(f"{index_path}: tensor {tensor!r} is in two shards, {seen[tensor]!r} "
                                      f"and {shard!r}")
                seen[tensor] = shard
        for tensor, shard in weight_map.items():
            if seen.get(tensor) != shard:
                raise FormatError(f"{index_path}: the index puts tensor {tensor[:120]!r} in {shard!r}, but "
                                  f"that shard does not contain it"
                                  + (f" (it is in {seen[tensor]!r})" if tensor in seen else ""))
        for tensor, shard in seen.items():
            if weight_map.get(tensor) != shard:
                raise FormatError(f"{index_path}: shard {shard!r} holds tensor {tensor!r}, which the index "
                                  f"does not list")
        self._where = seen

    # -- access -----------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self._where)

    @property
    def files(self) -> list[str]:
        """Paths of the safetensors files in use."""
        return [f.path for f in self._files.values()]

    def _file_of(self, name: str) -> SafetensorsFile:
        try:
            return self._files[self._where[name]]
        except (KeyError, TypeError):
            raise CheckpointError(f"{self.path}: checkpoint has no tensor named {str(name)[:120]!r}") from None

    def info(self, name: str) -> TensorInfo:
        return self._file_of(name).info(name)

    def source(self, name: str) -> str:
        """Path of the safetensors file holding ``name`` (for error messages)."""
        return self._file_of(name).path

    def get(self, name: str) -> np.ndarray:
        return self._file_of(name).get(name)

    def check_unchanged(self) -> None:
        """FormatError if a memory-mapped file changed size since it was opened (see SafetensorsFile).

        Closed files are skipped: their mapped views stay valid, but there is nothing left to check."""
        for f in self._files.values():
            if f.mode == "mmap" and not f.closed:
                f.check_unchanged()

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
