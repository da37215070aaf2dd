"""A preallocated key/value cache for one generation (llama2.c's RunState ``key_cache``/``value_cache``).

Full-attention layers hold ``max_tokens`` slots ``[max_tokens, G, Dh]``; the key of position ``p`` lives
in slot ``p``. Sliding-window layers (window ``W``) hold only ``min(W, max_tokens)`` slots used as a ring
buffer: position ``p`` lives in slot ``p % W``. Each layer keeps a ``positions`` array with the position
stored in each slot (-1 = empty), which is what the attention op's mask reads, so keys never need to be in
slot order.

Protocol per forward chunk of ``T`` new tokens at positions ``length .. length+T-1``, for each layer::

    k_all, v_all, k_pos = cache.view(layer, k_new, v_new, positions)   # cached keys + the new ones
    out = attention(q, k_all, v_all, q_positions=positions, k_positions=k_pos, window=W)
    cache.commit(layer, k_new, v_new, positions)                        # store (ring-wrapping)

``view`` returns the new keys together with every cached key, so a chunk longer than ``W`` still sees
the keys it needs from its own chunk; ``commit`` then keeps only the last ``W`` positions on sliding
layers. ``length`` (tokens seen) advances once every layer has committed the chunk. A forward that
fails half-way marks the cache ``broken`` (its layers disagree); it refuses further use until ``reset()``.

Backend-owned arrays. With ``arrays`` (a backend's array functions, e.g. ``gptevo.backends.cupy.ARRAYS``)
the buffers are allocated by the backend (on the GPU) and ``view``/``commit`` never read a position
value on the host: the slots come from the host-side lengths, positions arrive as device arrays (the
model makes them), and every write is a slice assignment. ``view`` then also keeps positions for full
layers and returns every ring slot of a sliding layer in slot order (the attention mask reads the
positions, so order does not matter); a one-token chunk on a sliding layer is staged into its ring
slot (the key it replaces, position p - W, is outside every later query's window), so decode reads
the ring in place with no copy. Without ``arrays`` everything is plain NumPy, as before.
"""
from __future__ import annotations

import numpy as np

from gptevo.errors import RequestError


class KVCache:
    """Keys and values of every layer for up to ``max_tokens`` positions.

    config:     the model's ModelConfig (num_layers, num_kv_heads, head_dim, window_for_layer).
    max_tokens: the most positions this generation may hold (prompt + new tokens).
    dtype:      storage dtype of keys and values (the compute dtype; float32 by default).
    arrays:     the backend's array functions (None: NumPy buffers); see the module doc.
    """

    def __init__(self, config, max_tokens: int, dtype=np.float32, arrays=None):
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens <= 0:
            raise RequestError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        self.max_tokens = int(max_tokens)
        self.dtype = np.dtype(dtype)
        G, Dh = config.num_kv_heads, config.head_dim
        self.windows: list[int | None] = [config.window_for_layer(i) for i in range(config.num_layers)]
        self.arrays = arrays
        zeros = np.zeros if arrays is None else arrays.zeros
        full = np.full if arrays is None else arrays.full
        self.keys, self.values, self.positions = [], [], []
        for w in self.windows:
            slots = self.max_tokens if w is None else min(w, self.max_tokens)
            self.keys.append(zeros((slots, G, Dh), self.dtype))         # [slots, G, Dh]
            self.values.append(zeros((slots, G, Dh), self.dtype))       # [slots, G, Dh]
            self.positions.append(full(slots, -1, np.int64))            # [slots]
        self._lengths = [0] * config.num_layers
        self._staged: dict[int, tuple[int, int]] = {}   # layer -> (start, T) written by view (device path)
        self.broken: str | None = None   # set when a forward failed half-way (layers disagree)

    # -- state -----------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.windows)

    @property
    def length(self) -> int:
        """Tokens seen: positions committed by every layer."""
        return min(self._lengths) if self._lengths else 0

    def remaining(self) -> int:
        return self.max_tokens - self.length

    def reset(self) -> None:
        """Forget every token (the buffers stay allocated)."""
        for pos in self.positions:
            pos[:] = -1
        self._lengths = [0] * self.num_layers
        self._staged = {}
        self.broken = None

    def grow(self, max_tokens: int) -> None:
        """Make room for ``max_tokens`` positions (at least the current ``max_tokens``), keeping every
        cached key, value and position: the buffers are reallocated and the used slots copied (a slot
        index never changes: full layers and not-yet-wrapped rings store position p in slot p)."""
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) \
                or max_tokens < self.max_tokens:
            raise RequestError(f"grow: max_tokens must be an integer >= the current {self.max_tokens}, "
                               f"got {max_tokens!r}")
        zeros = np.zeros if self.arrays is None else self.arrays.zeros
        full = np.full if self.arrays is None else self.arrays.full
        for layer, w in enumerate(self.windows):
            K, V, P = self.keys[layer], self.values[layer], self.positions[layer]
            old, slots = K.shape[0], int(max_tokens) if w is None else min(w, int(max_tokens))
            if slots == old:
                continue
            K2, V2 = zeros((slots, *K.shape[1:]), self.dtype), zeros((slots, *V.shape[1:]), self.dtype)
            P2 = full(slots, -1, np.int64)                                            # [slots]
            K2[:old], V2[:old], P2[:old] = K, V, P
            self.keys[layer], self.values[layer], self.positions[layer] = K2, V2, P2
        self.max_tokens = int(max_tokens)

    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))

    # -- checks ----------------------------------------------------------------------------------
    def _check(self, layer: int, new_k, new_v, new_positions) -> np.ndarray:
        if self.broken is not None:
            raise RequestError(f"this KV cache was left incomplete by a failed forward ({self.broken}); "
                               f"call cache.reset() or make a new cache")
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.num_layers:
            raise RequestError(f"layer must be an integer in [0, {self.num_layers}), got {layer!r}")
        on_device = self.arrays is not None and self.arrays.is_device(new_positions)
        pos = new_positions if on_device else np.asarray(new_positions)
        if pos.ndim != 1 or pos.size == 0 or pos.dtype.kind not in "iu":
            raise RequestError(f"new_positions must be a non-empty 1-D integer array, got shape {pos.shape} "
                               f"dtype {pos.dtype}")
        T = pos.shape[0]
        expected = self.keys[layer].shape[1:]
        for what, a in (("new_k", new_k), ("new_v", new_v)):
            if tuple(a.shape) != (T, *expected):
                raise RequestError(f"{what} has shape {list(a.shape)}, expected {[T, *expected]}")
        start = self._lengths[layer]
        if on_device:       # values are never read on the host: the model made them start, start+1, ...
            if start + T > self.max_tokens:
                raise RequestError(f"KV cache overflow: {start} cached + {T} new tokens = {start + T} positions, "
                                   f"but the cache holds max_tokens={self.max_tokens}")
            return pos
        if pos[0] != start or (T > 1 and np.any(np.diff(pos) != 1)):
            raise RequestError(f"layer {layer}: new positions must continue the cache at {start} "
                               f"one by one, got {pos[0]}..{pos[-1]}")
        if start + T > self.max_tokens:
            raise RequestError(f"KV cache overflow: {start} cached + {T} new tokens = {start + T} positions, "
                               f"but the cache holds max_tokens={self.max_tokens}")
        pos = pos.astype(np.int64, copy=False)
        if self.arrays is not None:          # host positions for a backend-owned cache: checked, then uploaded
            dev = self.arrays.asarray(pos)
            if self.arrays.is_device(dev):
                return dev
        return pos

    # -- the protocol ----------------------------------------------------------------------------
    def view(self, layer: int, new_k, new_v, new_positions):
        """The keys, values and positions a chunk attends to: the cached ones plus the new ones.

        Returns ``(k_all [S, G, Dh], v_all [S, G, Dh], k_positions [S] int64)``. On full layers the new
        keys are staged into their slots and the result is a view of the buffer (no copy); they count as
        cached only after :meth:`commit`. On sliding layers the result is a fresh array: the valid ring
        slots followed by the new keys.
        """
        pos = self._check(layer, new_k, new_v, new_positions)
        K, V, P = self.keys[layer], self.values[layer], self.positions[layer]
        if not isinstance(pos, np.ndarray):
            return self._view_device(layer, new_k, new_v, pos)
        if self.windows[layer] is None:
            a, b = int(pos[0]), int(pos[-1]) + 1
            K[a:b], V[a:b] = new_k, new_v
            return K[:b], V[:b], np.arange(b, dtype=np.int64)
        valid = np.flatnonzero(P >= 0)
        order = valid[np.argsort(P[valid])]                              # oldest first
        k_all = np.concatenate([K[order], np.asarray(new_k, self.dtype)], axis=0)   # [S, G, Dh]
        v_all = np.concatenate([V[order], np.asarray(new_v, self.dtype)], axis=0)   # [S, G, Dh]
        return k_all, v_all, np.concatenate([P[order], pos])

    def commit(self, layer: int, new_k, new_v, new_positions) -> None:
        """Store the chunk's keys and values; sliding layers keep only the last W positions."""
        pos = self._check(layer, new_k, new_v, new_positions)
        K, V, P = self.keys[layer], self.values[layer], self.positions[layer]
        if not isinstance(pos, np.ndarray):
            if self._staged.get(layer) != (self._lengths[layer], pos.shape[0]):   # view() staged it already
                self._store_device(layer, new_k, new_v, pos)
            self._staged.pop(layer, None)
            self._lengths[layer] += pos.shape[0]
            return
        slots = K.shape[0]
        keep = slice(max(0, pos.shape[0] - slots), pos.shape[0])        # only the last `slots` survive
        idx = pos[keep] % slots                                          # ring slots (== pos on full layers)
        K[idx], V[idx], P[idx] = new_k[keep], new_v[keep], pos[keep]
        self._lengths[layer] = int(pos[-1]) + 1

    def append_one(self, layer: int, new_k, new_v):
        """``view`` and ``commit`` of one new token (host buffers; a batched decode step calls this per
        sequence and layer): stores ``new_k``/``new_v`` ``[1, G, Dh]`` at position ``length`` and returns
        the same ``(k_all, v_all, k_positions)`` as ``view`` would have, in the same order."""
        if self.arrays is not None or self.broken is not None:     # device buffers, or refuse as view does
            pos = np.array([self._lengths[layer]], dtype=np.int64)                  # [1]
            out = self.view(layer, new_k, new_v, pos)
            self.commit(layer, new_k, new_v, pos)
            return out
        K, V, P = self.keys[layer], self.values[layer], self.positions[layer]
        p = self._lengths[layer]
        if new_k.shape != (1, *K.shape[1:]) or new_v.shape != (1, *V.shape[1:]):
            raise RequestError(f"new_k/new_v have shapes {list(new_k.shape)}, {list(new_v.shape)}, expected "
                               f"{[1, *K.shape[1:]]}")
        if p + 1 > self.max_tokens:
            raise RequestError(f"KV cache overflow: {p} cached + 1 new token = {p + 1} positions, "
                               f"but the cache holds max_tokens={self.max_tokens}")
        slots = K.shape[0]
        if self.windows[layer] is None:
            K[p], V[p], P[p] = new_k[0], new_v[0], p
            self._lengths[layer] = p + 1
            return K[:p + 1], V[:p + 1], np.arange(p + 1, dtype=np.int64)
        valid = np.flatnonzero(P >= 0)
        order = valid[np.argsort(P[valid])]                              # oldest first, as view
        k_all = np.concatenate([K[order], np.asarray(new_k, self.dtype)], axis=0)   # [S, G, Dh]
        v_all = np.concatenate([V[order], np.asarray(new_v, self.dtype)], axis=0)   # [S, G, Dh]
        k_pos = np.append(P[order], p)                                              # [S]
        K[p % slots], V[p % slots], P[p % slots] = new_k[0], new_v[0], p
        self._lengths[layer] = p + 1
        return k_all, v_all, k_pos

    # -- backend-owned arrays: slices from host-side lengths, no position value read on the host --
    def _view_device(self, layer: int, new_k, new_v, pos):
        K, V, P = self.keys[layer], self.values[layer], self.positions[layer]
        start, T = self._lengths[layer], pos.shape[0]
        store = getattr(self.arrays, "kv_store", None)
        if T == 1 and store is not None:
            # one token: stored at slot pos % slots by a kernel that reads pos on the device, and every
            # slot is attended (empty ones hold position -1, masked): the step's launches do not depend
            # on the position, so a decode step can be captured once and replayed (CUDA graph)
            store(K, V, P, new_k, new_v, pos)
            self._staged[layer] = (start, T)
            return K, V, P
        if self.windows[layer] is None:
            K[start:start + T], V[start:start + T], P[start:start + T] = new_k, new_v, pos
            self._staged[layer] = (start, T)
            return K[:start + T], V[:start + T], P[:start + T]
        if T == 1:                     # stage into the ring slot: replaces position start - W (invisible)
            self._store_device(layer, new_k, new_v, pos)
            self._staged[layer] = (start, T)
            return K, V, P
        xp = self.arrays.xp
        return (xp.concatenate([K, new_k.astype(self.dtype)], axis=0),
                xp.concatenate([V, new_v.astype(self.dtype)], axis=0), xp.concatenate([P, pos]))

    def _store_device(self, layer: int, new_k, new_v, pos) -> None:
        """Write the last ``slots`` positions of the chunk into their (ring) slots: at most two slices."""
        K, V, P = self.keys[layer], self.values[layer], self.positions[layer]
        start, T, slots = self._lengths[layer], pos.shape[0], K.shape[0]
        keep = min(T, slots)
        first = T - keep                                  # chunk rows that survive: first .. T-1
        s0 = (start + first) % slots
        n1 = min(keep, slots - s0)
        K[s0:s0 + n1], V[s0:s0 + n1], P[s0:s0 + n1] = new_k[first:first + n1], new_v[first:first + n1], \
            pos[first:first + n1]
        if keep > n1:
            n2 = keep - n1
            K[:n2], V[:n2], P[:n2] = new_k[first + n1:], new_v[first + n1:], pos[first + n1:]
