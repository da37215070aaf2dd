"""Load-time weight preparation: the 8-bit mode, fused projections, and mapped pages made resident.

Nothing here changes what a model computes beyond what spec/backends.md allows:

- :func:`quantize_dense` is the opt-in ``weights="int8"`` mode (spec/ops/int8.md): dense matrices
  (attention projections, dense MLPs, the output head) become blockwise int8; the embedding table,
  routers, norms, biases and MXFP4 experts keep their stored dtype.
- :func:`fuse_projections` concatenates q|k|v (and a dense MLP's gate|up) into one weight so a
  decode step makes one matrix call instead of three; each output row is the same dot product as
  before, so results change only by the summation order of the kernel that runs it. The separate
  tensors become row views of the fused one (no byte is held twice).
- :func:`populate` asks the kernel to map every page of the memory-mapped weights now
  (``MADV_POPULATE_READ``, else ``MADV_WILLNEED``), so decode steps take no page faults.
- :func:`make_private` copies the memory-mapped weights into private memory, tensor by tensor,
  dropping each mapped range once copied (peak memory: the copies plus one tensor). NumPy backs
  large allocations with transparent huge pages, and streaming weights from them measured 13 %
  faster per GPT-2 token than from the file mapping's 4 KiB pages (fewer TLB misses).

Backends opt in through their ``prepare_weights(weights, config)`` hook (the numba backend fuses and
populates; the reference keeps the checkpoint's tensors untouched).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap

import numpy as np

from gptevo.errors import RequestError
from gptevo.ops.int8 import Int8Weight, quantize_int8
from gptevo.weights import ModelWeights

WEIGHT_MODES = ("stored", "int8")
DENSE_MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "w_fc", "w_proj")


def check_weight_mode(mode) -> str:
    """``mode`` if it is a known weight mode, else RequestError listing the modes."""
    if mode not in WEIGHT_MODES:
        raise RequestError(f"weights must be one of {', '.join(map(repr, WEIGHT_MODES))}, got {mode!r}")
    return mode


def _is_float_matrix(w) -> bool:
    return isinstance(w, np.ndarray) and w.ndim == 2 and (w.dtype.kind == "f" or w.dtype.name == "bfloat16")


def quantize_dense(weights: ModelWeights, progress=None) -> ModelWeights:
    """Replace the dense float matrices of ``weights`` by Int8Weight, in place; returns ``weights``.

    ``progress(done, total)`` (optional) is called after each matrix.
    """
    jobs = [(layer, name) for layer in weights.layers for name in DENSE_MATRICES
            if _is_float_matrix(getattr(layer, name))]
    head = _is_float_matrix(weights.lm_head)
    total = len(jobs) + int(head)
    for done, (layer, name) in enumerate(jobs, 1):
        setattr(layer, name, quantize_int8(getattr(layer, name), name=name))
        if progress:
            progress(done, total)
    if head:
        weights.lm_head = quantize_int8(weights.lm_head, name="lm_head")
        if progress:
            progress(total, total)
    return weights


def _concat(parts):
    """Rows of ``parts`` (all ndarrays of one dtype, or all Int8Weight) in one new weight, plus the
    row views that stand for the parts; None when they cannot be fused."""
    if all(isinstance(p, np.ndarray) and p.ndim == 2 for p in parts):
        if len({p.dtype for p in parts}) != 1 or len({p.shape[1] for p in parts}) != 1:
            return None
        fused = np.concatenate(parts, axis=0)                                      # [sum N, K]
        views, r = [], 0
        for p in parts:
            views.append(fused[r:r + p.shape[0]])
            r += p.shape[0]
        return fused, views
    if all(isinstance(p, Int8Weight) and p.ndim == 2 for p in parts):
        if len({p.shape[1] for p in parts}) != 1:
            return None
        fused = Int8Weight(np.concatenate([p.values for p in parts]), np.concatenate([p.scales for p in parts]),
                           name="+".join(p.name for p in parts))
        views, r = [], 0
        for p in parts:
            views.append(Int8Weight(fused.values[r:r + p.shape[0]], fused.scales[r:r + p.shape[0]], p.name))
            r += p.shape[0]
        return fused, views
    return None


def _concat_bias(biases, rows):
    """(fused bias, row views standing for the parts) for fused rows: (None, parts) when no part has
    a bias; zeros (in the parts' dtype) stand in for missing parts."""
    present = [np.asarray(b) for b in biases if b is not None]
    if not present:
        return None, list(biases)
    dtypes = {b.dtype for b in present}
    if len(dtypes) == 1:
        dtype = present[0].dtype
    else:       # mixed: float32, or float64 if a part has it (not np.result_type: bf16 + f16 has no
        dtype = np.dtype(np.float64 if np.dtype(np.float64) in dtypes else np.float32)   # promotion in ml_dtypes 0.6)
    fused = np.concatenate([np.zeros(n, dtype) if b is None else np.asarray(b).astype(dtype, copy=False)
                            for b, n in zip(biases, rows)])                          # [sum N]
    views, r = [], 0
    for b, n in zip(biases, rows):
        views.append(None if b is None else fused[r:r + n])
        r += n
    return fused, views


def fuse_projections(weights: ModelWeights) -> ModelWeights:
    """Set ``wqkv``/``bqkv`` and (dense gated MLPs) ``w_gate_up``/``b_gate_up`` on each layer, in place."""
    for layer in weights.layers:
        for names, bias_names, target in ((("wq", "wk", "wv"), ("bq", "bk", "bv"), ("wqkv", "bqkv")),
                                          (("w_gate", "w_up"), ("b_gate", "b_up"), ("w_gate_up", "b_gate_up"))):
            parts = [getattr(layer, n) for n in names]
            if any(p is None for p in parts):
                continue
            made = _concat(parts)
            if made is None:
                continue
            fused, views = made
            bias, bias_views = _concat_bias([getattr(layer, b) for b in bias_names], [p.shape[0] for p in parts])
            setattr(layer, target[0], fused)
            setattr(layer, target[1], bias)
            for n, v in zip(names + bias_names, views + bias_views):
                setattr(layer, n, v)
    return weights


# -- mapped pages ----------------------------------------------------------------------------------
MADV_WILLNEED = 3
MADV_DONTNEED = 4
MADV_POPULATE_READ = 22          # Linux >= 5.14
_PAGE = mmap.PAGESIZE


def _libc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    libc.madvise.restype = ctypes.c_int
    return libc


def _is_mapped(a: np.ndarray) -> bool:
    if isinstance(a, np.memmap):
        return True
    base = a
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return isinstance(base, mmap.mmap) or (not isinstance(base, np.ndarray) and base is not None
                                           and isinstance(getattr(base, "obj", None), mmap.mmap))


def _arrays(weights: ModelWeights):
    from dataclasses import fields

    tops = [weights.embed, weights.lm_head, weights.pos_embed, weights.final_norm, weights.final_norm_bias]
    for item in tops + [getattr(layer, f.name) for layer in weights.layers for f in fields(layer)]:
        if item is None:
            continue
        if isinstance(item, np.ndarray):
            yield item
        for attr in ("blocks", "scales", "values"):          # Mxfp4Weight / Int8Weight parts
            part = getattr(item, attr, None)
            if isinstance(part, np.ndarray):
                yield part
        for part in getattr(item, "parts", ()):               # ExpertStack
            yield from (a for a in part if isinstance(a, np.ndarray))


def populate(weights: ModelWeights) -> int:
    """Map every page of the memory-mapped weight arrays now; returns the bytes advised (0 if the
    platform has no madvise). Best effort: a refused advice only means later page faults."""
    libc = _libc()
    if libc is None:
        return 0
    done, total = set(), 0
    for a in _arrays(weights):
        if a.nbytes == 0 or not _is_mapped(a):
            continue
        start = a.__array_interface__["data"][0]
        lo = start - start % _PAGE
        hi = start + a.nbytes
        if (lo, hi) in done:
            continue
        done.add((lo, hi))
        if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_POPULATE_READ) != 0:
            libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_WILLNEED)
        total += hi - lo
    return total


def _private_copy(a: np.ndarray, libc) -> np.ndarray:
    """A private copy of the mapped array ``a``; the mapped range is then dropped from this
    process's resident memory (the file's page cache keeps it for the kernel to reuse)."""
    copy = np.array(a, copy=True, order="C")
    if libc is not None and a.nbytes >= _PAGE:
        start = a.__array_interface__["data"][0]
        lo = start - start % _PAGE
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(start + a.nbytes - lo), MADV_DONTNEED)
    return copy


def _privatize(item, libc):
    """``item`` (ndarray, Mxfp4Weight-like, ExpertStack or other) with its mapped arrays copied."""
    from gptevo.ops.mxfp4 import Mxfp4Weight

    if isinstance(item, np.ndarray):
        return _private_copy(item, libc) if item.nbytes and _is_mapped(item) else item
    if isinstance(item, Mxfp4Weight):
        if _is_mapped(item.blocks) or _is_mapped(item.scales):
            return Mxfp4Weight(_privatize(item.blocks, libc), _privatize(item.scales, libc), item.name)
        return item
    if hasattr(item, "blocks") and hasattr(item, "scales"):         # a backend's prepared MXFP4 weight
        item.blocks, item.scales = _privatize(item.blocks, libc), _privatize(item.scales, libc)
        return item
    if hasattr(item, "parts"):                                        # ExpertStack
        item.parts = [[_privatize(a, libc) for a in part] for part in item.parts]
    return item


def make_private(weights: ModelWeights, progress=None) -> int:
    """Copy every memory-mapped weight array into private memory, in place; returns the bytes copied.

    Tensors are copied one at a time and each mapped range is dropped once copied, so resident
    memory peaks at the copies plus one tensor. ``progress(done, total)`` is called per tensor.
    Row views made by :func:`fuse_projections` are not mapped and stay as they are.
    """
    from dataclasses import fields

    libc = _libc()
    slots = [(weights, name) for name in ("embed", "lm_head", "pos_embed", "final_norm", "final_norm_bias")]
    slots += [(layer, f.name) for layer in weights.layers for f in fields(layer)]
    slots = [(owner, name) for owner, name in slots if getattr(owner, name) is not None]
    before = sum(a.nbytes for a in _arrays(weights) if _is_mapped(a))
    done: dict[int, object] = {}
    for i, (owner, name) in enumerate(slots, 1):
        item = getattr(owner, name)
        if id(item) not in done:                 # a tied head is the embedding: copy it once
            done[id(item)] = _privatize(item, libc)
        setattr(owner, name, done[id(item)])
        if progress:
            progress(i, len(slots))
    return before
