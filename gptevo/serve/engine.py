"""The engine thread: continuous batching on a :class:`gptevo.batching.BatchDecoder`.

One thread owns the decoder's ``step()``: while any request is queued or running it steps (the
decoder admits queued requests with a prefill, then decodes one token for every running sequence)
and hands each step's events to the event loop with one ``loop.call_soon_threadsafe`` per request
that got tokens. Requests join the batch and leave it between steps; the event loop never runs
model code, so it keeps answering ``/health`` and reading other clients while the model computes.

Admission is bounded: at most ``max_batch`` running plus ``max_queue`` waiting requests; one more is
refused (:func:`gptevo.serve.errors.overloaded`, HTTP 503 with ``Retry-After``), so memory never grows
with the number of clients. ``cancel`` (client gone, stop string seen) frees the request's cache in
the decoder at once; events that were already computed for it are dropped.

If ``step()`` raises, the requests it names (``exc.request_ids``, as BatchDecoder tags them; every
request in flight when it names none) fail with that error (a 500 for their clients) and are
cancelled; the others go on (their tokens of that step come with the next one).
"""
from __future__ import annotations

import asyncio
import threading
import time

from gptevo.serve.errors import ApiError, overloaded
from gptevo.serve.metrics import Metrics


class Handle:
    """One admitted request: its decoder id and the queue its events arrive in (on the event loop)."""

    def __init__(self, rid: int, loop: asyncio.AbstractEventLoop, prompt_tokens: int):
        self.rid = rid
        self.loop = loop
        self.prompt_tokens = prompt_tokens
        self.queue: asyncio.Queue = asyncio.Queue()
        self.admitted_at = time.monotonic()
        self.first_token_at: float | None = None

    def deliver(self, item) -> None:
        """From the engine thread: a list of TokenEvents, or an exception to raise in the consumer."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:          # the event loop is closed: nobody is waiting any more
            pass

    async def next_events(self) -> list:
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        return item


class Engine:
    """Runs ``decoder.step()`` in a thread while there is work (see the module doc)."""

    def __init__(self, decoder, *, max_batch: int, max_queue: int, metrics: Metrics | None = None):
        self.decoder = decoder
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self._cv = threading.Condition()
        self._handles: dict[int, Handle] = {}
        self._stopping = False
        self.draining = False          # set on SIGTERM: requests that arrive from now on get a 503
        self._thread: threading.Thread | None = None

    # -- event-loop side ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gptevo-engine", daemon=True)
        self._thread.start()

    @property
    def in_flight(self) -> int:
        with self._cv:
            return len(self._handles)

    def submit(self, prompt_ids: list[int], *, max_new_tokens: int, sampling, stop_token_ids) -> Handle:
        """Admit a request or raise ApiError (503 when full or shutting down)."""
        loop = asyncio.get_running_loop()
        with self._cv:
            if self._stopping:
                raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if len(self._handles) >= self.max_batch + self.max_queue:
                raise overloaded(1, f"the server is busy: {len(self._handles)} requests in flight (at most "
                                    f"{self.max_batch} running and {self.max_queue} waiting); retry later")
            rid = self.decoder.submit(list(prompt_ids), max_new_tokens=max_new_tokens, sampling=sampling,
                                      stop_token_ids=tuple(stop_token_ids))
            handle = Handle(rid, loop, len(prompt_ids))
            self._handles[rid] = handle
            self.metrics.set_queue_depth(max(0, len(self._handles) - self.max_batch))
            self._cv.notify()
        self.metrics.add(prompt_tokens=len(prompt_ids))
        return handle

    def cancel(self, handle: Handle) -> bool:
        """Stop a request and free its cache; False when it had already finished."""
        with self._cv:
            if self._handles.pop(handle.rid, None) is None:
                return False
            self.decoder.cancel(handle.rid)
            self._cv.notify()
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread; requests still in flight fail with a 503."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail_all(ApiError(503, "the server shut down before this request finished", type="server_error",
                                code="shutting_down"))

    # -- engine thread ------------------------------------------------------------------------------
    def _has_work(self) -> bool:
        return bool(self._handles) or self.decoder.running > 0 or self.decoder.pending > 0

    def _fail_all(self, exc: BaseException) -> None:
        self._fail(exc, None)

    def _fail(self, exc: BaseException, request_ids) -> None:
        """Fail the requests ``request_ids`` (all in flight when None) with ``exc``."""
        with self._cv:
            ids = list(self._handles) if request_ids is None else [i for i in request_ids if i in self._handles]
            handles = [self._handles.pop(i) for i in ids]
            for h in handles:
                try:
                    self.decoder.cancel(h.rid)
                except Exception:      # noqa: BLE001 - the decoder is already broken; still fail them all
                    pass
        for h in handles:
            h.deliver(exc)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._has_work():
                    self._cv.wait()
                if self._stopping:
                    return
            try:
                events = self.decoder.step()
            except Exception as exc:   # noqa: BLE001 - reported to the clients it concerns
                error = ApiError(500, f"generation failed: {type(exc).__name__}: {str(exc)[:300]}",
                                 type="server_error", code="generation_failed")
                self._fail(error, getattr(exc, "request_ids", None))
                continue
            batches: dict[int, list] = {}
            with self._cv:
                for ev in events:
                    handle = self._handles.get(ev.request_id)
                    if handle is None:             # cancelled while the step ran
                        continue
                    batches.setdefault(ev.request_id, [handle]).append(ev)
                    if ev.finished:
                        del self._handles[ev.request_id]
                waiting = max(0, len(self._handles) - self.decoder.running)
            self.metrics.step(len(events), self.decoder.running, waiting)
            for handle, *evs in batches.values():
                handle.deliver(evs)
