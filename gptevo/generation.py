"""Text generation: validation, the KV-cache decode loop, sampling, stopping and streaming.

(This module is ``gptevo.generation``, not ``gptevo.generate``, so that it never shadows the function
``gptevo.generate``.)

Decode loop (llama2.c ``generate``): one ``model.forward(prompt_ids, cache)`` fills the KV cache with
the prompt (prefill); then each step samples one token from the last row of logits and feeds only
that token back with ``model.forward([token], cache)``. The last sampled token is never fed back, so
``len(prompt) + max_new_tokens == max_position_embeddings`` fits exactly (reliability F7).

Sampling (names and order as in Hugging Face ``generate``), on the float64 logits ``z`` of one step:

1. ``temperature == 0``: greedy, ``argmax z`` (ties go to the lowest id). Otherwise ``z / temperature``.
2. ``top_k`` (0 or None = off): keep the ``k`` largest logits (ties broken towards lower ids).
3. ``top_p`` (None or 1 = off): nucleus; sort the kept tokens by probability (descending, ties by id)
   and keep the smallest prefix whose cumulative probability is ``>= top_p`` (at least one token).
4. Draw: ``u = rng.random()`` with ``rng = np.random.default_rng(seed)`` (one generator per call, so the
   same seed gives the same output); the token is the first kept id, in ascending id order, whose
   cumulative probability exceeds ``u``.

On a backend whose arrays sample on the device (cupy), the logits never leave the device: the same
rules run in one kernel (gptevo/backends/cupy/kernels/sampling.cu) with the same draws ``u``, and only
the token id crosses to the host per step. It sums in a different order than NumPy, so a draw that
falls within rounding of a boundary between two tokens may pick the neighbour; otherwise the tokens
are those of the host sampler for the same seed.

Stopping: the model's eos ids (``config.eos_token_ids``: config.json and generation_config.json),
``stop_token_ids``, ``stop`` strings (text prompts only), or ``max_new_tokens``. With a token-id prompt
the returned list includes the stop/eos token that ended generation (as HF ``generate`` does); text
output never contains it, and never contains a stop string (the text ends just before it).

Streaming yields str pieces whose concatenation is exactly the non-streamed text: a piece never ends
inside a multi-byte UTF-8 character (an incomplete sequence, which decodes to U+FFFD, is held back
until it completes) nor with a possible beginning of a stop string.

Context: ``len(prompt) + max_new_tokens > max_position_embeddings`` is a RequestError naming both
numbers, unless ``truncation="left"``: then only the last ``max_position_embeddings - max_new_tokens``
prompt tokens are kept (the start of the prompt is dropped).
"""
from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from gptevo.errors import NumericalError, RequestError

MAX_NEW_TOKENS = 2**24                 # beyond any context length gptevo accepts
MAX_PROMPT_BYTES = 16 * 1024 * 1024    # UTF-8 bytes of a text prompt, checked before tokenizing (F6)
MAX_STOP_STRINGS = 64
TRUNCATION = (None, "left")
_DECODE_CONTEXT = 8                    # prompt tokens decoded with the new ones (SentencePiece spaces)


@dataclass(frozen=True)
class Sampling:
    """Checked sampling parameters (see the module doc for their meaning)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# -- validation ----------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def check_sampling(temperature=1.0, top_k=None, top_p=None, seed=None, vocab_size: int | None = None) -> Sampling:
    """RequestError naming the parameter for: temperature < 0, NaN or inf; top_k < 0, > vocab_size or
    not an int; top_p outside (0, 1]; a negative or non-integer seed (reliability F4)."""
    if not _is_number(temperature) or not math.isfinite(float(temperature)) or temperature < 0:
        raise RequestError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is None:
        top_k = 0
    if not _is_int(top_k) or top_k < 0:
        raise RequestError(f"top_k must be an integer >= 0 (0 or None = off), got {top_k!r}")
    if vocab_size is not None and top_k > vocab_size:
        raise RequestError(f"top_k={top_k} is larger than the vocabulary (vocab_size={vocab_size})")
    if top_p is None:
        top_p = 1.0
    if not _is_number(top_p) or not math.isfinite(float(top_p)) or not 0.0 < top_p <= 1.0:
        raise RequestError(f"top_p must be a number in (0, 1] (1 or None = off), got {top_p!r}")
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise RequestError(f"seed must be a non-negative integer or None, got {seed!r}")
    return Sampling(float(temperature), int(top_k), float(top_p), None if seed is None else int(seed))


def check_max_new_tokens(n) -> int:
    if not _is_int(n) or n <= 0:
        raise RequestError(f"max_new_tokens must be a positive integer, got {n!r}")
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


def fit_context(prompt_ids: list[int], max_new_tokens: int, context: int, truncation) -> list[int]:
    """The prompt, left-truncated when asked, so that prompt + new tokens fit ``context`` (F1, F7)."""
    if truncation not in TRUNCATION:
        raise RequestError(f"truncation must be None or 'left', got {truncation!r}")
    n = len(prompt_ids)
    if n + max_new_tokens <= context:
        return prompt_ids
    if truncation == "left" and max_new_tokens < context:
        return prompt_ids[n - (context - max_new_tokens):]
    raise RequestError(f"prompt of {n} tokens + max_new_tokens={max_new_tokens} = {n + max_new_tokens} "
                       f"exceeds the model's context of {context} positions; "
                       f"shorten the prompt, lower max_new_tokens, or pass truncation='left'")


# -- sampling ------------------------------------------------------------------------------------
def sample_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator | None) -> int:
    """One token id from a row of logits ``[V]`` (module doc: temperature, top-k, top-p, draw)."""
    z = np.asarray(logits, dtype=np.float64)                         # [V]
    if sampling.greedy:
        return int(np.argmax(z))                                     # first maximum = lowest id
    z = z / sampling.temperature                                     # [V]
    order = np.lexsort((np.arange(z.size), -z))                      # [V] by logit desc, then id asc
    if sampling.top_k:
        order = order[:sampling.top_k]                               # [k]
    p = np.exp(z[order] - z[order[0]])                               # [k] unnormalized, max = 1
    p /= p.sum()
    if sampling.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), sampling.top_p)) + 1   # smallest prefix with cum >= top_p
        order, p = order[:keep], p[:keep]
        p /= p.sum()
    by_id = np.argsort(order, kind="stable")                         # draw in ascending id order
    ids, p = order[by_id], p[by_id]
    u = rng.random()
    cum = np.cumsum(p)                                               # [k]
    return int(ids[min(int(np.searchsorted(cum, u * cum[-1], side="right")), ids.size - 1)])


# -- the decode loop -----------------------------------------------------------------------------
def token_stream(model, prompt_ids: list[int], *, max_new_tokens: int, sampling: Sampling,
                 stop_token_ids: Iterable[int] = ()) -> Iterator[int]:
    """Yield new token ids; the last one is the stop token when a stop/eos id ended generation.

    ``prompt_ids`` must already be checked and fit the context (see :func:`fit_context`).
    """
    stops = set(stop_token_ids)
    rng = None if sampling.greedy else np.random.default_rng(sampling.seed)
    cache = model.new_cache(len(prompt_ids) + max_new_tokens)
    arrays = device_sampler(model)
    if arrays is not None:
        yield from _device_stream(model, arrays, cache, prompt_ids, max_new_tokens, sampling, rng, stops)
        return
    logits = model.forward(prompt_ids, cache, **_last_only(model))    # [1,V] prefill (last row)
    for step in range(max_new_tokens):
        row = np.asarray(logits)[-1]                                  # [V]
        if not np.isfinite(row).all():
            bad = int(np.flatnonzero(~np.isfinite(row))[0])
            raise NumericalError(f"non-finite logits at generation step {step} (position "
                                 f"{len(prompt_ids) + step - 1}): logit[{bad}] = {row[bad]}; "
                                 f"the model's weights or activations overflowed")
        token = sample_token(row, sampling, rng)
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


def _device_stream(model, arrays, cache, prompt_ids, max_new_tokens, sampling, rng, stops) -> Iterator[int]:
    """token_stream on a device backend: logits stay on the device, the token is sampled there with
    the same rules and the same draws ``u = rng.random()``; only the token id (and a non-finite flag)
    crosses to the host per step."""
    logits = model.forward_on_backend(prompt_ids, cache, **_last_only(model))   # [1,V] prefill, on the device
    make_runner = getattr(arrays, "decode_runner", None)
    runner = make_runner(model, cache) if make_runner is not None else None
    step_fn = runner if runner is not None else (lambda token: model.forward_on_backend([token], cache))
    for step in range(max_new_tokens):
        u = 0.0 if sampling.greedy else float(rng.random())
        token, bad = arrays.sample_token(logits[-1], sampling.temperature, sampling.top_k, sampling.top_p, u)
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


def text_pieces(tokenizer, model, prompt_ids: list[int], *, max_new_tokens: int, sampling: Sampling,
                stop: tuple[str, ...] = (), stop_token_ids: Iterable[int] = ()) -> Iterator[str]:
    """Generated text pieces (non-empty); the stop/eos token itself is never decoded."""
    stops = set(stop_token_ids)
    stream = TextStream(tokenizer, prompt_ids, stop)
    tokens = token_stream(model, prompt_ids, max_new_tokens=max_new_tokens, sampling=sampling,
                          stop_token_ids=stops)
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
        from gptevo.model import load

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
def generate(weights, prompt, *, backend=None, max_new_tokens=64, temperature=1.0, top_k=None, top_p=None,
             seed=None, stop=None, stop_token_ids=None, stream=False, truncation=None):
    """Continue ``prompt`` with up to ``max_new_tokens`` tokens.

    weights:  a model directory (loaded with ``gptevo.load(weights, backend)``) or a loaded model.
    prompt:   a str (returns the new text as str, or an iterator of str pieces with ``stream=True``)
              or a list of token ids (returns the list of new ids, ending with the stop/eos id when one
              ended generation; an iterator of ids with ``stream=True``; no tokenizer needed).
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
    sampling = check_sampling(temperature, top_k, top_p, seed, vocab_size=V)
    stops = check_stop(stop)
    stop_ids = tuple(dict.fromkeys((*config.eos_token_ids, *check_stop_token_ids(stop_token_ids, V))))
    if truncation not in TRUNCATION:
        raise RequestError(f"truncation must be None or 'left', got {truncation!r}")

    if isinstance(prompt, str):
        tokenizer = tokenizer_for(model)
        ids = fit_context(check_prompt_ids(encode_prompt(tokenizer, prompt), V), n_new, context, truncation)
        pieces = text_pieces(tokenizer, model, ids, max_new_tokens=n_new, sampling=sampling, stop=stops,
                             stop_token_ids=stop_ids)
        return pieces if stream else "".join(pieces)

    if stops:
        raise RequestError("stop strings need a text prompt; with a token-id prompt use stop_token_ids")
    ids = fit_context(check_prompt_ids(prompt, V), n_new, context, truncation)
    tokens = token_stream(model, ids, max_new_tokens=n_new, sampling=sampling, stop_token_ids=stop_ids)
    if stream:
        return tokens
    return list(tokens)


__all__ = ["generate", "Sampling", "check_sampling", "sample_token", "token_stream", "text_pieces",
           "TextStream", "fit_context", "tokenizer_for", "resolve_model"]
