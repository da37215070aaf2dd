"""One decode step of a whole model in a single numba parallel region: the scheme, and the part
every fused step shares (which models, the KV cache bookkeeping, the fallback).

Decode (one new token) through the op registry calls ~8 kernels per layer, each its own parallel
region, and each call costs ~40 us beyond its work on the project's 2-core machine (Python, argument
unboxing, the region's fork and join): 4-5 ms of a 10-14 ms GPT-2 token. A fused step enters one
``prange(n)`` region per token (one iteration per thread) and the threads meet at spin barriers
(``_atomics.barrier``) only where a step needs every thread's output. Between barriers each thread
works on its own share: rows ``[t N / n, (t + 1) N / n)`` of a weight, heads (or KV groups) of
attention; norms, routing and input quantization are small and every thread computes them itself
(identical results, no barrier).

Steps: ``_fused_gpt2`` (GPT-2 and relatives) and ``_fused_gptoss`` (gpt-oss: RMSNorm, RoPE, sinks,
sliding windows, MXFP4 experts, exact or int8 mode). :func:`plan` picks one or returns None.

Each step computes what the ops compute with the same kernels' arithmetic (``_fused_rows``); only
the summation order of some products differs from the op path (spec/backends.md, "Fused decode").
If the iterations of the region do not run at once (``_atomics.rendezvous``), nothing is computed,
the step disables itself and the model runs the ops from then on.
"""
from __future__ import annotations

import threading

import numpy as np

from gptevo.backends.numba._atomics import SYNC_SIZE, VERDICT
from gptevo.backends.numba._simd import has_avx512


def weight_kind(w, k_multiple: int = 32):
    """"f32" / "bf16" for a C-contiguous 2-D weight the row kernels stream, else None."""
    if not isinstance(w, np.ndarray) or w.ndim != 2 or not w.flags.c_contiguous or w.shape[1] % k_multiple:
        return None
    if w.dtype == np.float32:
        return "f32"
    return "bf16" if w.dtype.name == "bfloat16" else None


def f32_vector(a, n):
    """A bias (or None: zeros) as float32 [n]."""
    return np.zeros(n, np.float32) if a is None else np.asarray(a, np.float32).reshape(n)


class _AddressMemo:
    """The arrays an address table was made from, and the table. Copies and pickles of a cache
    drop it (``None``): their arrays live elsewhere, and an identity check alone would pass after a
    deepcopy or an unpickle (the copied memo points at the copied arrays)."""

    __slots__ = ("arrays", "table")

    def __init__(self, arrays, table):
        self.arrays, self.table = arrays, table

    def __copy__(self):
        return None

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return (type(None), ())


def kv_addresses(cache) -> np.ndarray:
    """[L, 3] int64: the data addresses of each layer's keys, values and slot positions. Kept on the
    cache with the arrays it was made from and made again when any of them is another object (a
    cache that reallocates), so a decode step does not walk 3L ``ctypes`` objects (0.1 ms a token)."""
    arrays = (*cache.keys, *cache.values, *cache.positions)
    memo = getattr(cache, "_fused_kv_addresses", None)
    if memo is not None and len(memo.arrays) == len(arrays) and all(a is b for a, b in zip(memo.arrays, arrays)):
        return memo.table
    table = np.array([[k.ctypes.data, v.ctypes.data, p.ctypes.data]
                      for k, v, p in zip(cache.keys, cache.values, cache.positions)], np.int64)   # [L,3]
    cache._fused_kv_addresses = _AddressMemo(arrays, table)
    return table


def plan(config, weights, dtype=np.float32):
    """A fused step for this model (a :class:`FusedDecode`), or None when no step takes this kind
    of model or the host has no AVX-512 (the row kernels use it)."""
    if np.dtype(dtype) != np.float32 or not has_avx512() or not weights.layers or weights.lm_head is None:
        return None
    from gptevo.backends.numba import _fused_gpt2, _fused_gptoss

    return _fused_gpt2.plan(config, weights) or _fused_gptoss.plan(config, weights)


class FusedDecode:
    """Callable ``(token, cache) -> logits [1, V] float32``, or None when the step did not run (then
    nothing was written; after a failed rendezvous the step is disabled for good and the caller runs
    the ops); :meth:`rows` is the batched form. A subclass gives :meth:`_first_row`, :meth:`_launch`
    and :meth:`_launch_rows`; the cache must be host
    buffers of float32 with one length for every layer and room for one more position. Calls are
    serialized by a lock: the step's scratch buffers are shared (two threads decoding two caches on
    one model take turns)."""

    allow_windows = False

    def __init__(self, config, weights):
        self.config = config
        self.embed = weights.embed
        self.n_vocab = weights.lm_head.shape[0]
        self.disabled = False
        self._lock = threading.Lock()

    def _cache_ok(self, cache) -> bool:
        if cache.arrays is not None or cache.broken is not None or cache.dtype != np.float32:
            return False
        p = cache.length
        return ((self.allow_windows or all(w is None for w in cache.windows))
                and all(n == p for n in cache._lengths) and p < cache.max_tokens
                and all(a.flags.c_contiguous for a in (*cache.keys, *cache.values, *cache.positions)))

    def _first_row(self, token: int, pos: int) -> np.ndarray:
        """The float32 input row [D] of the first block."""
        raise NotImplementedError

    def _launch(self, x, pos: int, cache, logits, sync) -> None:
        """Run the kernel: fills logits [V] when every thread met (sync[VERDICT] == 1)."""
        raise NotImplementedError

    def _rows_ok(self) -> bool:
        """Whether this step's batched form takes its weights (a subclass may say no)."""
        return True

    def _launch_rows(self, xb, pos, caches, logits, sync) -> None:
        """Run the batched kernel: xb [B,D] first rows, pos [B]; fills logits [B,V] when every thread
        met (sync[VERDICT] == 1)."""
        raise NotImplementedError

    def rows(self, tokens, caches):
        """Logits [B, V] of one step of B >= 2 sequences (token b at ``caches[b].length``, each
        sequence its own cache) in one region, or None (nothing written): weights the batched form
        does not take, a cache the step does not take, a cache given twice, or threads that did not
        meet (the step then disables itself, as the one-token form)."""
        if self.disabled or not self._rows_ok() or len({id(c) for c in caches}) != len(caches):
            return None
        with self._lock:
            if not all(self._cache_ok(c) for c in caches):
                return None
            pos = np.array([cache.length for cache in caches], np.int64)                      # [B]
            xb = np.ascontiguousarray(np.stack([self._first_row(int(t), int(p)) for t, p in zip(tokens, pos)]),
                                      np.float32)                                             # [B,D]
            logits = np.empty((len(caches), self.n_vocab), np.float32)                        # [B,V]
            sync = np.zeros(SYNC_SIZE, np.int64)
            self._launch_rows(xb, pos, caches, logits, sync)
            if sync[VERDICT] != 1:
                self.disabled = True
                return None
            for cache, p in zip(caches, pos.tolist()):
                self._commit(cache, p)
            return logits

    def __call__(self, token: int, cache):
        with self._lock:
            return self._step(token, cache)

    def _step(self, token: int, cache):
        if self.disabled or not self._cache_ok(cache):
            return None
        p = cache.length
        x = np.ascontiguousarray(self._first_row(token, p), np.float32)                    # [D]
        logits = np.empty(self.n_vocab, np.float32)                                        # [V]
        sync = np.zeros(SYNC_SIZE, np.int64)
        self._launch(x, p, cache, logits, sync)
        if sync[VERDICT] != 1:
            self.disabled = True
            return None
        self._commit(cache, p)
        return logits.reshape(1, -1)

    @staticmethod
    def _commit(cache, p: int) -> None:
        """Record position p in every layer (its keys and values are in its slot): as ``commit``."""
        for i, positions in enumerate(cache.positions):
            positions[p % positions.shape[0]] = p
            cache._lengths[i] = p + 1
