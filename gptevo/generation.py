"""Text generation: validation, the KV-cache decode loop, sampling, stopping and streaming.

(This module is ``gptevo.generation``, not ``gptevo.generate``, so that it never shadows the function
``gptevo.generate``.)

Decode loop (llama2.c ``generate``): one ``model.forward(prompt_ids, cache)`` fills the KV cache with
the prompt (prefill); then each step samples one token from the last row of logits and feeds only
that token back with ``model.forward([token], cache)``. The last sampled token is never fed back, so
``len(prompt) + max_new_tokens == max_position_embeddings`` fits exactly (reliability F7).

Sampling: gptevo/sampling.py (HF ``generate`` names and order: repetition penalty, temperature,
top-k, top-p, min-p, then one draw per step from a per-sequence generator).

On a backend whose arrays sample on the device (cupy), the logits never leave the device: the same
rules run in one kernel (gptevo/backends/cupy/kernels/sampling.cu) with the same draws ``u``, and only
the token id crosses to the host per step. The kernel implements temperature, top-k and top-p only: with
``repetition_penalty`` or ``min_p`` set, each step's logits row is copied to the host and sampled there
(:attr:`Sampling.on_device` is False), never ignored. It sums in a different order than NumPy, so a draw that
falls within rounding of a boundary between two tokens may pick the neighbour; otherwise the tokens
are those of the host sampler for the same seed.

Stopping: the model's eos ids (``config.eos_token_ids``: config.json and generation_config.json),
``stop_token_ids``, ``stop`` strings (text prompts only), or ``max_new_tokens`` (None: until an eos
token or the end of the model's context). With a token-id prompt
the returned list includes the stop/eos token that ended generation (as HF ``generate`` does); text
output never contains it, and never contains a stop string (the text ends just before it).

Streaming yields str pieces whose concatenation is exactly the non-streamed text: a piece never ends
inside a multi-byte UTF-8 character (an incomplete sequence, which decodes to U+FFFD, is held back
until it completes) nor with a possible beginning of a stop string.

Context: ``len(prompt) + max_new_tokens > max_position_embeddings`` is a RequestError naming both
numbers, unless ``truncation="left"``: then only the last ``max_position_embeddings - max_new_tokens``
prompt tokens are kept (the start of the prompt is dropped). With ``max_new_tokens=None`` the budget is
what the prompt leaves of the context (a prompt that fills it is a RequestError).
"""
from __future__ import annotations

import os
import time
import weakref
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from gptevo.errors import NumericalError, RequestError
from gptevo.sampling import (  # noqa: F401  (re-exported: generation's public names before the split)
    Sampling, TokenSampler, _is_int, _is_number, apply_repetition_penalty, check_sampling, sample_token, sampling_for,
    token_distribution,
)

MAX_NEW_TOKENS = 2**24                 # beyond any context length gptevo accepts
MAX_PROMPT_BYTES = 16 * 1024 * 1024    # UTF-8 bytes of a text prompt, checked before tokenizing (F6)
MAX_STOP_STRINGS = 64
TRUNCATION = (None, "left")
_DECODE_CONTEXT = 8                    # prompt tokens decoded with the new ones (SentencePiece spaces)


# -- validation ----------------------------------------------------------------------------------
def check_max_new_tokens(n) -> int | None:
    """A positive int, or None (until an eos token or the end of the context; see fit_context)."""
    if n is None:
        return None
    if not _is_int(n) or n <= 0:
        raise RequestError(f"max_new_tokens must be a positive integer or None (no limit), got {n!r}")
    if n > MAX_NEW_TOKENS:
        raise RequestError(f"max_new_tokens={n} is absurd; at most {MAX_NEW_TOKENS} (and the model's context)")
    return int(n)


def check_prompt_ids(prompt, vocab_size: int) -> list[int]:
    """A token-id prompt as a list of ints in [0, vocab_size) (reliability F2, F5)."""
    if isinstance(prompt, np.ndarray):
        if prompt.ndim != 1:
            raise RequestError(f"prompt token ids must be 1-D, got shape {list(prompt.shape)}")
        prompt = prompt.tolist() if prompt.dtype.kind in "iu" else list(prompt)
    if not isinstance(prompt, (list, tuple)):
        raise RequestError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")
    if len(prompt) == 0:
        raise RequestError("prompt cannot be empty: give at least one token id")
    ids = []
    for i, t in enumerate(prompt):
        if not _is_int(t):
            raise RequestError(f"prompt token ids must be integers; item {i} is {t!r} ({type(t).__name__})")
        t = int(t)
        if not 0 <= t < vocab_size:
            raise RequestError(f"prompt token id {t} at index {i} is out of range [0, {vocab_size})")
        ids.append(t)
    return ids


def check_stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, (list, tuple)) or len(items) > MAX_STOP_STRINGS:
        raise RequestError(f"stop must be a str or a list of at most {MAX_STOP_STRINGS} strings, got {stop!r}")
    for s in items:
        if not isinstance(s, str) or not s:
            raise RequestError(f"stop strings must be non-empty str, got {s!r}")
    return tuple(items)


def check_stop_token_ids(ids, vocab_size: int) -> tuple[int, ...]:
    if ids is None:
        return ()
    items = [ids] if _is_int(ids) else ids
    if not isinstance(items, (list, tuple, set, frozenset)):
        raise RequestError(f"stop_token_ids must be an int or a list of ints, got {ids!r}")
    out = []
    for t in items:
        if not _is_int(t) or not 0 <= t < vocab_size:
            raise RequestError(f"stop_token_ids entry {t!r} is not a token id in [0, {vocab_size})")
        out.append(int(t))
    return tuple(out)


def new_token_budget(n_prompt: int, max_new_tokens: int | None, context: int) -> int:
    """``max_new_tokens``, or for None what a prompt of ``n_prompt`` tokens leaves of ``context``."""
    if max_new_tokens is not None:
        return max_new_tokens
    if n_prompt >= context:
        raise RequestError(f"prompt of {n_prompt} tokens fills the model's context of {context} positions, "
                           f"leaving no room for max_new_tokens=None (no limit); shorten the prompt, or give "
                           f"max_new_tokens with truncation='left'")
    return context - n_prompt


def fit_context(prompt_ids: list[int], max_new_tokens: int | None, context: int, truncation) -> list[int]:
    """The prompt, left-truncated when asked, so that prompt + new tokens fit ``context`` (F1, F7).
    ``max_new_tokens=None`` takes what the prompt leaves (:func:`new_token_budget`)."""
    if truncation not in TRUNCATION:
        raise RequestError(f"truncation must be None or 'left', got {truncation!r}")
    n = len(prompt_ids)
    if max_new_tokens is None:
        new_token_budget(n, None, context)
        return prompt_ids
    if n + max_new_tokens <= context:
        return prompt_ids
    if truncation == "left" and max_new_tokens < context:
        return prompt_ids[n - (context - max_new_tokens):]
    raise RequestError(f"prompt of {n} tokens + max_new_tokens={max_new_tokens} = {n + max_new_tokens} "
                       f"exceeds the model's context of {context} positions; "
                       f"shorten the prompt, lower max_new_tokens, or pass truncation='left'")


@dataclass
class Timings:
    """What :func:`token_stream` measured, filled in as it runs (for ``--stats``-style summaries).

    prompt_tokens / prompt_s: the prompt's forward pass (prefill), cache allocation and the first
    token's sampling. new_tokens: tokens yielded. decode_steps / decode_s: the one-token forward
    passes and their sampling (``new_tokens - 1`` of them), excluding the time the consumer holds the
    generator between tokens.
    """

    prompt_tokens: int = 0
    prompt_s: float = 0.0
    new_tokens: int = 0
    decode_steps: int = 0
    decode_s: float = 0.0

    def add(self, other: "Timings") -> None:
        """Accumulate another generation's figures (a chat session's replies)."""
        for name in ("prompt_tokens", "prompt_s", "new_tokens", "decode_steps", "decode_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def _timed(tokens: Iterator[int], timings: Timings | None, n_prompt: int) -> Iterator[int]:
    """``tokens`` unchanged, with the time spent producing each one recorded in ``timings``."""
    if timings is None:
        yield from tokens
        return
    timings.prompt_tokens += n_prompt
    first = True
    while True:
        start = time.perf_counter()
        try:
            token = next(tokens)
        except StopIteration:
            return
        spent = time.perf_counter() - start
        if first:
            timings.prompt_s += spent
            first = False
        else:
            timings.decode_s += spent
            timings.decode_steps += 1
        timings.new_tokens += 1
        yield token


# -- the decode loop -----------------------------------------------------------------------------
def token_stream(model, prompt_ids: list[int], *, max_new_tokens: int | None, sampling: Sampling,
                 stop_token_ids: Iterable[int] = (), timings: Timings | None = None) -> Iterator[int]:
    """Yield new token ids; the last one is the stop token when a stop/eos id ended generation.
    ``timings``, when given, receives what the generation measured (:class:`Timings`).

    ``prompt_ids`` must already be checked and fit the context (see :func:`fit_context`);
    ``max_new_tokens=None`` runs to the end of the context.
    """
    tokens = _token_stream(model, prompt_ids, max_new_tokens, sampling, stop_token_ids)
    return _timed(tokens, timings, len(prompt_ids)) if timings is not None else tokens


def _token_stream(model, prompt_ids, max_new_tokens, sampling, stop_token_ids) -> Iterator[int]:
    stops = set(stop_token_ids)
    sampler = TokenSampler(sampling, prompt_ids)
    context = getattr(model.config, "context_length", model.config.max_position_embeddings)
    max_new_tokens = new_token_budget(len(prompt_ids), max_new_tokens, context)
    cache = model.new_cache(len(prompt_ids) + max_new_tokens)
    arrays = device_sampler(model)
    if arrays is not None:
        yield from _device_stream(model, arrays, cache, prompt_ids, max_new_tokens, sampler, stops)
        return
    logits = model.forward(prompt_ids, cache, **_last_only(model))    # [1,V] prefill (last row)
    for step in range(max_new_tokens):
        row = np.asarray(logits)[-1]                                  # [V]
        if not np.isfinite(row).all():
            bad = int(np.flatnonzero(~np.isfinite(row))[0])
            raise NumericalError(f"non-finite logits at generation step {step} (position "
                                 f"{len(prompt_ids) + step - 1}): logit[{bad}] = {row[bad]}; "
                                 f"the model's weights or activations overflowed")
        token = sampler(row)
        yield token
        if token in stops or step == max_new_tokens - 1:
            return
        logits = model.forward([token], cache)                        # [1,V] decode step


def _last_only(model) -> dict:
    """``{"logits": "last"}`` for gptevo models (the prompt's output head runs on its last row only);
    nothing for other objects with a ``forward(ids, cache)`` (test doubles, wrappers)."""
    from gptevo.model import Model

    return {"logits": "last"} if isinstance(model, Model) else {}


def device_sampler(model):
    """The backend's array functions when they sample on the device (cupy), else None."""
    backend = getattr(model, "backend", None)
    if backend is None or not hasattr(model, "forward_on_backend"):
        return None
    from gptevo.model import backend_arrays

    arrays = backend_arrays(backend)
    return arrays if arrays is not None and hasattr(arrays, "sample_token") else None


def _device_stream(model, arrays, cache, prompt_ids, max_new_tokens, sampler, stops) -> Iterator[int]:
    """token_stream on a device backend: logits stay on the device, the token is sampled there with
    the same rules and the same draws ``u = rng.random()``; only the token id (and a non-finite flag)
    crosses to the host per step. Rules the kernel lacks (``sampling.on_device`` False: min_p,
    repetition_penalty) sample on the host from the downloaded logits row instead."""
    sampling = sampler.sampling
    logits = model.forward_on_backend(prompt_ids, cache, **_last_only(model))   # [1,V] prefill, on the device
    make_runner = getattr(arrays, "decode_runner", None)
    runner = make_runner(model, cache) if make_runner is not None else None
    step_fn = runner if runner is not None else (lambda token: model.forward_on_backend([token], cache))
    for step in range(max_new_tokens):
        if not sampling.on_device:
            row = np.asarray(arrays.to_host(logits[-1]))               # [V] on the host
            bad = -1 if np.isfinite(row).all() else int(np.flatnonzero(~np.isfinite(row))[0])
            token = sampler(row) if bad < 0 else -1
        else:
            token, bad = arrays.sample_token(logits[-1], sampling.temperature, sampling.top_k, sampling.top_p,
                                             sampler.draw())
            sampler.record(token)
        if bad >= 0:
            row = arrays.to_host(logits[-1])
            raise NumericalError(f"non-finite logits at generation step {step} (position "
                                 f"{len(prompt_ids) + step - 1}): logit[{bad}] = {row[bad]}; "
                                 f"the model's weights or activations overflowed")
        yield token
        if token in stops or step == max_new_tokens - 1:
            return
        logits = step_fn(token)                                       # [1,V] decode step (CUDA graph on cupy)


class TextStream:
    """New token ids -> text pieces, holding back incomplete UTF-8 and partial stop strings.

    The text of the new ids is ``decode(context + new)[len(decode(context)):]`` with ``context`` the
    last few prompt ids, so that SentencePiece-style decoders keep the space of the first new token.
    ``push(id)`` returns the next safe piece (maybe ""), ``finish()`` the rest; ``stopped`` turns true
    when a stop string appeared (the text then ends just before it).
    """

    def __init__(self, tokenizer, context_ids: Iterable[int] = (), stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.context = list(context_ids)[-_DECODE_CONTEXT:]
        self.context_text = tokenizer.decode(self.context) if self.context else ""
        self.ids: list[int] = []
        self.stop = stop
        self.emitted = ""
        self.stopped = False

    def _text(self) -> str:
        full = self.tokenizer.decode(self.context + self.ids)
        if full.startswith(self.context_text):
            return full[len(self.context_text):]
        return self.tokenizer.decode(self.ids)

    def _hold(self, text: str) -> int:
        """Characters at the end of ``text`` that may still change or start a stop string."""
        hold = len(text) - len(text.rstrip("\ufffd"))
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return hold

    def _emit(self, upto: str) -> str:
        piece = upto[len(self.emitted):]   # == the new suffix whenever decoding is prefix-stable
        self.emitted += piece
        return piece

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self._text()
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._emit(text[:cut])
        return self._emit(text[:len(text) - self._hold(text)])

    def finish(self) -> str:
        if self.stopped or not self.ids:
            return ""
        text = self._text()
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        return self._emit(text if cut < 0 else text[:cut])


def text_pieces(tokenizer, model, prompt_ids: list[int], *, max_new_tokens: int | None, sampling: Sampling,
                stop: tuple[str, ...] = (), stop_token_ids: Iterable[int] = (),
                timings: Timings | None = None) -> Iterator[str]:
    """Generated text pieces (non-empty); the stop/eos token itself is never decoded."""
    stops = set(stop_token_ids)
    stream = TextStream(tokenizer, prompt_ids, stop)
    tokens = token_stream(model, prompt_ids, max_new_tokens=max_new_tokens, sampling=sampling,
                          stop_token_ids=stops, timings=timings)
    try:
        for token in tokens:
            if token in stops:
                break
            piece = stream.push(token)
            if piece:
                yield piece
            if stream.stopped:
                return
        piece = stream.finish()
        if piece:
            yield piece
    finally:
        tokens.close()


# -- models and tokenizers -----------------------------------------------------------------------
_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def resolve_model(weights, backend=None):
    """A loaded model: ``weights`` itself, or ``gptevo.load(weights, backend)`` for a directory path."""
    if isinstance(weights, (str, os.PathLike)):
        from gptevo.loading import load

        return load(weights, backend=backend)
    if not all(hasattr(weights, a) for a in ("config", "forward", "new_cache")):
        raise RequestError(f"weights must be a model directory or a loaded model (gptevo.load), "
                           f"got {type(weights).__name__}")
    if backend is not None and hasattr(weights, "backend"):
        name = getattr(weights.backend, "name", None)
        if name is not None and name != backend:
            raise RequestError(f"backend={backend!r} was given but the model is loaded on {name!r}; "
                               f"load it with gptevo.load(path, backend={backend!r})")
    return weights


def tokenizer_for(model):
    """The model's tokenizer: ``model.tokenizer`` if set, else loaded from ``model.path`` (cached)."""
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        return tok
    try:
        return _TOKENIZERS[model]
    except (KeyError, TypeError):
        pass
    path = getattr(model, "path", None)
    if path is None:
        raise RequestError("a text prompt needs a tokenizer, and this model was not loaded from a "
                           "directory; pass a list of token ids instead")
    from gptevo.tokenizer import load_tokenizer

    tok = load_tokenizer(path, vocab_size=model.config.vocab_size)
    try:
        _TOKENIZERS[model] = tok
    except TypeError:
        pass
    return tok


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a text prompt (F5 empty, F6 size cap and invalid Unicode)."""
    if prompt == "":
        raise RequestError("prompt cannot be empty")
    if len(prompt) > MAX_PROMPT_BYTES:
        raise RequestError(f"prompt of {len(prompt)} characters exceeds the {MAX_PROMPT_BYTES}-byte limit")
    try:
        size = len(prompt.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise RequestError(f"prompt is not valid Unicode text: {exc.reason} at index {exc.start}") from None
    if size > MAX_PROMPT_BYTES:
        raise RequestError(f"prompt of {size} UTF-8 bytes exceeds the {MAX_PROMPT_BYTES}-byte limit")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise RequestError("prompt encodes to no tokens")
    return ids


# -- the public function -------------------------------------------------------------------------
def generate(weights, prompt, *, backend=None, max_new_tokens=64, temperature=None, top_k=None, top_p=None,
             min_p=None, repetition_penalty=None, seed=None, stop=None, stop_token_ids=None, stream=False,
             truncation=None, timings=None):
    """Continue ``prompt`` with up to ``max_new_tokens`` tokens (None: until an eos token or the end
    of the model's context).

    weights:  a model directory (loaded with ``gptevo.load(weights, backend)``) or a loaded model.
    prompt:   a str (returns the new text as str, or an iterator of str pieces with ``stream=True``)
              or a list of token ids (returns the list of new ids, ending with the stop/eos id when one
              ended generation; an iterator of ids with ``stream=True``; no tokenizer needed), or a
              list of such prompts: a list with each one's result, decoded together (gptevo.batching).
    temperature, top_k, top_p, min_p, repetition_penalty: None takes the model's
              ``generation_config.json`` value, else the built-in default (temperature 1, filters off).
    timings:  a :class:`Timings` to fill with the prompt and decode times (optional).
    Sampling, stopping, streaming and context rules: see the module doc. Every invalid argument is a
    RequestError naming it; non-finite logits raise NumericalError. Validation happens at the call,
    also with ``stream=True`` (before the first piece is asked for).
    """
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be True or False, got {stream!r}")
    if isinstance(prompt, str) and prompt == "":
        raise RequestError("prompt cannot be empty")
    model = resolve_model(weights, backend)
    config = model.config
    V, context = config.vocab_size, getattr(config, "context_length", config.max_position_embeddings)
    n_new = check_max_new_tokens(max_new_tokens)
    sampling = sampling_for(model, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=repetition_penalty, seed=seed)
    if timings is not None and not isinstance(timings, Timings):
        raise RequestError(f"timings must be a gptevo.generation.Timings or None, got {type(timings).__name__}")
    stops = check_stop(stop)
    stop_ids = tuple(dict.fromkeys((*config.eos_token_ids, *check_stop_token_ids(stop_token_ids, V))))
    if truncation not in TRUNCATION:
        raise RequestError(f"truncation must be None or 'left', got {truncation!r}")

    from gptevo.batching import generate_batch, is_prompt_batch

    if is_prompt_batch(prompt):      # a list of prompts: one result each, decoded together
        if stream or timings is not None:
            raise RequestError("stream=True and timings take one prompt; got a list of prompts "
                               "(use gptevo.batching.BatchDecoder to stream several)")
        return generate_batch(model, prompt, max_new_tokens=n_new, sampling=sampling, stop=stops,
                              stop_token_ids=stop_ids, truncation=truncation)

    if isinstance(prompt, str):
        tokenizer = tokenizer_for(model)
        ids = fit_context(check_prompt_ids(encode_prompt(tokenizer, prompt), V), n_new, context, truncation)
        pieces = text_pieces(tokenizer, model, ids, max_new_tokens=n_new, sampling=sampling, stop=stops,
                             stop_token_ids=stop_ids, timings=timings)
        return pieces if stream else "".join(pieces)

    if stops:
        raise RequestError("stop strings need a text prompt; with a token-id prompt use stop_token_ids")
    ids = fit_context(check_prompt_ids(prompt, V), n_new, context, truncation)
    tokens = token_stream(model, ids, max_new_tokens=n_new, sampling=sampling, stop_token_ids=stop_ids,
                          timings=timings)
    if stream:
        return tokens
    return list(tokens)


__all__ = ["generate", "Sampling", "check_sampling", "sampling_for", "sample_token", "token_distribution",
           "apply_repetition_penalty", "TokenSampler", "Timings", "token_stream", "text_pieces", "TextStream",
           "fit_context", "new_token_budget", "tokenizer_for", "resolve_model"]
