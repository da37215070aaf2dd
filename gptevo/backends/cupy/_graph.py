"""One decode step captured as a CUDA graph and replayed per token (CuPy only).

A batch-1 decode step launches a few hundred small kernels; launched one by one from Python, the
host, not the GPU, sets the pace. :class:`DecodeGraph` runs the model's own decode step
(``Model._run`` for one token) three ways:

1. warm-up: an ordinary run, with the token id and position read from two fixed device buffers
   (``DeviceArrays`` hands them out for the step's ``asarray(ids)`` and ``arange(start, start+1)``)
   and every allocation taken from a private memory pool;
2. capture: the same run under ``cudaStreamBeginCapture`` on a private stream; the pool now serves
   every allocation from the blocks the warm-up freed (no cudaMalloc while capturing), and it is
   never used by anything else, so the graph's buffers are never handed out elsewhere;
3. replay: write the token id (the step's one upload) and the position (a fill kernel), launch the
   graph, advance the cache's lengths on the host.

This is valid because nothing in a one-token step depends on a host value that changes per token:
the KV slot is computed on the device (``kv_store``), attention reads every slot of the cache with
their positions as the mask, the RoPE tables come from the position buffer, and the expert ids never
leave the device. The RoPE frequencies are checked per step (dynamic scaling changes them): if they
differ from the captured ones, the step runs without the graph. Any failure to capture (an old
driver, an op that synchronizes) makes the runner fall back to ordinary steps for good, with the
reason in ``failed``.
"""
from __future__ import annotations

import numpy as np

from gptevo.errors import RequestError


class DecodeGraph:
    """``runner(token) -> logits [1, V]`` (a device array) for one decode step of ``model`` on ``cache``."""

    def __init__(self, arrays, model, cache):
        import cupy

        self.cp = cupy
        self.arrays = arrays
        self.model = model
        self.cache = cache
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.pool = cupy.cuda.MemoryPool()
        self.ids = cupy.zeros(1, np.int64)
        self.pos = cupy.zeros(1, np.int64)
        self.graph = None
        self.logits = None
        self.rope = None
        self.failed: str | None = None
        self.steps = 0
        self.replays = 0

    def _rope_key(self, length: int):
        if self.model.config.position != "rope":
            return None
        inv, factor = self.model._rope_frequencies(length)
        return np.asarray(inv).tobytes(), float(factor)

    def _eager(self, token: int):
        return self.model.forward_on_backend([token], self.cache)

    def __call__(self, token: int):
        cache, model = self.cache, self.model
        start = cache.length
        if not 0 <= int(token) < model.config.vocab_size:
            raise RequestError(f"token id {token} is out of range [0, {model.config.vocab_size})")
        if start + 1 > cache.max_tokens or start + 1 > model.config.context_length:
            raise RequestError(f"KV cache overflow: {start} cached + 1 new token exceeds max_tokens="
                               f"{cache.max_tokens}")
        if self.failed is not None or cache.broken is not None:
            return self._eager(token)
        rope = self._rope_key(start + 1)
        if self.graph is not None and rope != self.rope:
            return self._eager(token)
        cp = self.cp
        ready = cp.cuda.Event()
        ready.record(cp.cuda.get_current_stream())
        self.stream.wait_event(ready)                              # after the caller's work (the prefill)
        with self.stream:
            self.ids.set(np.array([token], np.int64), stream=self.stream)
            self.pos.fill(start)
        if self.graph is not None:
            self.graph.launch(stream=self.stream)
            cache._lengths = [start + 1] * cache.num_layers
            self.replays += 1
            logits = self.logits
        else:
            capture = self.steps >= 1
            try:
                with cp.cuda.using_allocator(self.pool.malloc), self.stream:
                    self.arrays._graph_inputs = (self.ids, self.pos)
                    try:
                        if capture:
                            self.stream.begin_capture()
                        try:
                            logits = model._run(np.array([token], np.int64), cache, None).astype(np.float32,
                                                                                                  copy=False)
                        finally:
                            graph = self.stream.end_capture() if capture else None
                    finally:
                        self.arrays._graph_inputs = None
            except Exception as exc:  # noqa: BLE001 - fall back to ordinary steps, keep the reason
                self.failed = f"{type(exc).__name__}: {exc}"
                cache._lengths = [start] * cache.num_layers
                cache._staged = {}
                self.stream.synchronize()
                return self._eager(token)
            self.steps += 1
            if not capture:            # the warm-up's result leaves the private pool, whose blocks capture reuses
                with self.stream:
                    logits = logits.copy()
            if capture:
                self.graph, self.logits, self.rope = graph, logits, rope
                self.graph.launch(stream=self.stream)              # capturing did not run the step
                self.replays += 1
        done = cp.cuda.Event()
        done.record(self.stream)
        cp.cuda.get_current_stream().wait_event(done)              # later work on the caller's stream waits
        return logits
