"""Continuous batching: several sequences decoded together, one weight pass per step (spec/batching.md).

:class:`BatchDecoder` keeps a queue of submitted requests and a running batch of at most ``max_batch``
sequences, each with its own KV cache and its own random generator. Every :meth:`BatchDecoder.step`

1. admits queued requests while the batch has room; each admitted prompt is prefilled alone
   (``model.forward(prompt, cache, logits="last")``) and its first token is sampled: that is the
   request's first event;
2. runs ONE batched forward (``Model.forward_batch``) over the requests that were already running,
   each feeding back its last token at its own position, and samples one token per row.

A request leaves the batch when it samples an end-of-text or stop token id (``finish_reason="stop"``),
reaches ``max_new_tokens`` or fills the model's context (``"length"``), or is cancelled; new requests
join between steps. Row b of a batched step equals, within the ops' conformance tolerance, what
sequence b gives alone, and every request samples with ``np.random.default_rng(sampling.seed)`` of
its own, through :func:`gptevo.generation.sample_token`: a request's tokens do not depend on which
other requests share the batch (greedy: token for token the single-prompt ``generate``).

Threads: ``submit``, ``cancel``, ``running`` and ``pending`` may be called from any thread while one
thread calls ``step`` (a lock guards the queue and the batch; the forward runs outside it, so submit
and cancel never wait for a step). A request cancelled during a step gives no further event.

Failures: a request whose logits are non-finite is dropped and ``step`` raises NumericalError naming
it (``exc.request_ids``); the other requests' events of that step are not lost: the next ``step``
returns them first. Any other exception from a forward drops the requests whose caches it left
incomplete (``exc.request_ids`` when the exception accepts attributes) and propagates the same way.
"""
from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

import numpy as np

from gptevo.errors import NumericalError, RequestError
from gptevo.generation import (Sampling, TextStream, TokenSampler, _last_only, check_max_new_tokens,
                               check_prompt_ids, check_stop_token_ids, encode_prompt, fit_context,
                               new_token_budget, tokenizer_for)
from gptevo.model import Model

INITIAL_ROOM = 256     # new-token slots a request's KV cache starts with; doubled when full (up to its need)


@dataclass(frozen=True)
class TokenEvent:
    """One sampled token of one request.

    request_id:    the id ``submit`` returned.
    token_id:      the token sampled this step.
    finished:      True on the request's last event.
    finish_reason: "stop" (an end-of-text or stop token id: this event's token), "length"
                   (max_new_tokens reached or the context full), None while running.
    """

    request_id: int
    token_id: int
    finished: bool
    finish_reason: str | None


@dataclass(eq=False)
class _Request:
    id: int
    prompt: list[int]
    max_new: int                       # tokens it may produce (context full included)
    sampling: Sampling
    stops: frozenset
    sampler: TokenSampler              # this sequence's own sampling state (generator, seen ids)
    cache: object = None               # KVCache once admitted
    produced: int = 0
    last: int | None = None            # the token to feed back next (None before the prefill)
    cancelled: bool = False

    @property
    def need(self) -> int:
        """Positions its cache must finally hold (as generate: prompt + max_new_tokens)."""
        return len(self.prompt) + self.max_new


def context_of(config) -> int:
    return getattr(config, "context_length", config.max_position_embeddings)


class BatchDecoder:
    """Continuous batching over one gptevo Model: every step runs ONE forward over all running
    sequences (one weight pass), each sequence with its own KV cache (module doc)."""

    def __init__(self, model, *, max_batch: int = 8):
        if not all(hasattr(model, a) for a in ("config", "forward", "new_cache")):
            raise RequestError(f"BatchDecoder needs a loaded model (gptevo.load), got {type(model).__name__}")
        # a gptevo Model runs one stacked step; any other object with forward(ids, cache) and
        # new_cache(n) (a wrapper, a test double) runs its sequences one at a time
        self._batched = isinstance(model, Model)
        if isinstance(max_batch, bool) or not isinstance(max_batch, (int, np.integer)) or max_batch < 1:
            raise RequestError(f"max_batch must be a positive integer, got {max_batch!r}")
        self.model = model
        self.max_batch = int(max_batch)
        self._lock = threading.Lock()            # guards _queue, _running, _undelivered, _in_step
        self._step_lock = threading.Lock()       # one step at a time
        self._ids = itertools.count(1)
        self._queue: dict[int, _Request] = {}    # submitted, not admitted (in submission order)
        self._running: dict[int, _Request] = {}  # admitted, unfinished
        self._undelivered: list[TokenEvent] = []
        self._in_step = False

    # -- requests --------------------------------------------------------------------------------
    def submit(self, prompt_ids, *, max_new_tokens: int | None, sampling: Sampling,
               stop_token_ids=(), ignore_eos: bool = False) -> int:
        """Queue a request; returns its id. RequestError (naming the argument) for: a bad prompt
        (empty, non-integer or out-of-range ids), max_new_tokens not a positive integer or None,
        prompt + max_new_tokens beyond the model's context, sampling not a ``Sampling`` (make one with
        ``gptevo.generation.check_sampling``), bad stop_token_ids. ``max_new_tokens=None``: until an
        end-of-text/stop token or the context is full. The model's eos ids stop too unless
        ``ignore_eos=True`` (benchmarks: a fixed number of tokens)."""
        config = self.model.config
        V, context = config.vocab_size, context_of(config)
        ids = check_prompt_ids(prompt_ids, V)
        if not isinstance(sampling, Sampling):
            raise RequestError(f"sampling must be a gptevo.generation.Sampling (see check_sampling), "
                               f"got {type(sampling).__name__}")
        if max_new_tokens is None:
            max_new = new_token_budget(len(ids), None, context)
        else:
            max_new = check_max_new_tokens(max_new_tokens)
            if len(ids) + max_new > context:
                raise RequestError(f"prompt of {len(ids)} tokens + max_new_tokens={max_new} = "
                                   f"{len(ids) + max_new} exceeds the model's context of {context} positions")
        if not isinstance(ignore_eos, bool):
            raise RequestError(f"ignore_eos must be True or False, got {ignore_eos!r}")
        eos = () if ignore_eos else tuple(config.eos_token_ids)
        stops = frozenset((*eos, *check_stop_token_ids(stop_token_ids, V)))
        sampler = TokenSampler(sampling, ids)
        with self._lock:
            rid = next(self._ids)
            self._queue[rid] = _Request(rid, ids, max_new, sampling, stops, sampler)
        return rid

    def cancel(self, request_id: int) -> None:
        """Drop a queued or running request and free its cache; unknown (or finished) ids are ignored."""
        with self._lock:
            if self._queue.pop(request_id, None) is not None:
                return
            req = self._running.get(request_id)
            if req is None:
                return
            req.cancelled = True
            if not self._in_step:            # otherwise the step drops it when its forward returns
                del self._running[request_id]
                req.cache = None

    @property
    def running(self) -> int:
        """Requests in the batch (admitted, not finished)."""
        with self._lock:
            return len(self._running)

    @property
    def pending(self) -> int:
        """Requests waiting for a free slot."""
        with self._lock:
            return len(self._queue)

    # -- the step --------------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """Admit and prefill queued requests while there is room, then one batched decode step over
        the requests that were already running. Returns one event per request that produced a token
        (the events a failed step kept back come first)."""
        with self._step_lock:
            with self._lock:
                events, self._undelivered = self._undelivered, []
                while self._queue and len(self._running) < self.max_batch:
                    req = self._queue.pop(next(iter(self._queue)))
                    self._running[req.id] = req
                live = [r for r in self._running.values() if not r.cancelled]
                admitted = [r for r in live if r.last is None]        # prefilled this step
                decoding = [r for r in live if r.last is not None]    # one batched decode step
                self._in_step = True
            sampled: list[tuple[_Request, int]] = []
            failed: list[tuple[_Request, BaseException]] = []
            try:
                for req in admitted:
                    self._prefill(req, sampled, failed)
                if decoding:
                    self._decode(decoding, sampled, failed)
            except BaseException as exc:
                with self._lock:
                    events += self._finish(sampled)
                    for req, _ in failed:                 # non-finite logits earlier in this step
                        req.cancelled = True
                    dropped = self._drop_broken(admitted + decoding) + tuple(req.id for req, _ in failed)
                    self._undelivered = events
                    self._in_step = False
                _tag(exc, dropped)
                raise
            with self._lock:
                events += self._finish(sampled)
                for req, _ in failed:
                    self._running.pop(req.id, None)
                    req.cache = None
                for rid in [rid for rid, r in self._running.items() if r.cancelled]:
                    self._running.pop(rid).cache = None
                self._in_step = False
                if failed:
                    self._undelivered = events
            if failed:
                first = failed[0][1]
                ids = tuple(req.id for req, _ in failed)
                exc = NumericalError(f"request {failed[0][0].id}: {first}" + (
                    f" (also requests {', '.join(map(str, ids[1:]))})" if len(ids) > 1 else ""))
                _tag(exc, ids)
                raise exc
            return events

    def _prefill(self, req: _Request, sampled, failed) -> None:
        if req.cancelled:
            return
        model = self.model
        if self._batched:
            req.cache = model.new_cache(min(req.need, len(req.prompt) + INITIAL_ROOM))   # grown as needed
        else:
            req.cache = model.new_cache(req.need)
        try:
            logits = model.forward(req.prompt, req.cache, **_last_only(model))         # [1,V]
        except NumericalError as exc:
            failed.append((req, exc))
            return
        self._sample(req, np.asarray(logits)[-1], sampled, failed)

    def _decode(self, reqs: list[_Request], sampled, failed) -> None:
        live = [r for r in reqs if not r.cancelled]
        if not live:
            return
        if not self._batched:
            logits = [np.asarray(self.model.forward([r.last], r.cache))[-1] for r in live]   # B x [V]
        else:
            for req in live:
                if req.cache.length + 1 > req.cache.max_tokens:
                    req.cache.grow(min(req.need, 2 * req.cache.max_tokens))
            ids = np.array([r.last for r in live], dtype=np.int64)                      # [B]
            logits = self.model._forward_rows(ids, [r.cache for r in live])          # [B,V]
        for req, row in zip(live, logits):
            self._sample(req, row, sampled, failed)

    def _sample(self, req: _Request, row: np.ndarray, sampled, failed) -> None:
        if not np.isfinite(row).all():
            bad = int(np.flatnonzero(~np.isfinite(row))[0])
            failed.append((req, NumericalError(
                f"non-finite logits at generation step {req.produced} (position "
                f"{len(req.prompt) + req.produced - 1}): logit[{bad}] = {row[bad]}; "
                f"the model's weights or activations overflowed")))
            return
        sampled.append((req, req.sampler(row)))

    def _finish(self, sampled) -> list[TokenEvent]:
        """Events of the sampled tokens (under the lock); finished and cancelled requests leave."""
        events = []
        for req, token in sampled:
            if req.cancelled:
                self._running.pop(req.id, None)
                req.cache = None
                continue
            req.produced += 1
            req.last = token
            reason = "stop" if token in req.stops else "length" if req.produced >= req.max_new else None
            events.append(TokenEvent(req.id, int(token), reason is not None, reason))
            if reason is not None:
                self._running.pop(req.id, None)
                req.cache = None
        return events

    def _drop_broken(self, reqs) -> tuple[int, ...]:
        """After a failed forward: drop the requests whose caches it left incomplete (under the lock)."""
        dropped = []
        for req in reqs:
            if req.id not in self._running:
                continue
            if req.cancelled or getattr(req.cache, "broken", None) is not None:
                self._running.pop(req.id)
                req.cache = None
                if not req.cancelled:
                    dropped.append(req.id)
        return tuple(dropped)


def _tag(exc: BaseException, request_ids) -> None:
    try:
        exc.request_ids = tuple(request_ids)
    except (AttributeError, TypeError):
        pass


# -- generate() with a list of prompts -----------------------------------------------------------
MAX_GENERATE_BATCH = 16      # sequences decoded together by generate(model, [prompts...])


def is_prompt_batch(prompt) -> bool:
    """True for a list/tuple of prompts (str or token-id lists), as opposed to one token-id prompt."""
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and any(
        isinstance(p, (str, list, tuple, np.ndarray)) for p in prompt)


def generate_batch(model, prompts, *, max_new_tokens: int | None, sampling: Sampling, stop=(),
                   stop_token_ids=(), truncation=None) -> list:
    """One result per prompt, each what ``generate(model, prompt, ...)`` returns for it alone (a str for
    a str prompt, the list of new ids for an id prompt), decoded together by a BatchDecoder.

    Arguments are already checked by ``generate`` (``stop_token_ids`` includes the eos ids); errors in
    one prompt are RequestErrors naming its index. A text prompt's stop strings cancel its request.
    """
    config = model.config
    V, context = config.vocab_size, context_of(config)
    items = []                                   # (token ids, TextStream or None)
    for i, prompt in enumerate(prompts):
        try:
            text = isinstance(prompt, str)
            if text:
                tokenizer = tokenizer_for(model)
                ids = check_prompt_ids(encode_prompt(tokenizer, prompt), V)
            elif stop:
                raise RequestError("stop strings need a text prompt; with a token-id prompt use stop_token_ids")
            else:
                ids = check_prompt_ids(prompt, V)
            ids = fit_context(ids, max_new_tokens, context, truncation)
            stream = TextStream(tokenizer, ids, tuple(stop)) if text else None
        except RequestError as exc:
            raise type(exc)(f"prompt {i}: {exc}") from None
        items.append((ids, stream))

    decoder = BatchDecoder(model, max_batch=min(len(items), MAX_GENERATE_BATCH))
    rids = [decoder.submit(ids, max_new_tokens=max_new_tokens, sampling=sampling,
                           stop_token_ids=stop_token_ids) for ids, _ in items]
    index = {rid: i for i, rid in enumerate(rids)}
    tokens: list[list[int]] = [[] for _ in items]
    texts: list[list[str]] = [[] for _ in items]
    while decoder.running or decoder.pending:
        for ev in decoder.step():
            i = index[ev.request_id]
            tokens[i].append(ev.token_id)
            stream = items[i][1]
            if stream is None:
                continue
            if ev.finish_reason != "stop":           # the stop/eos token itself is never decoded
                texts[i].append(stream.push(ev.token_id))
                if stream.stopped:                   # a stop string: the text ends before it
                    decoder.cancel(ev.request_id)
                    continue
            if ev.finished:
                texts[i].append(stream.finish())
    return [tokens[i] if stream is None else "".join(texts[i]) for i, (_, stream) in enumerate(items)]
