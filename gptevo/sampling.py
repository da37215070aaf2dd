"""Sampling one token from a row of logits: the parameters, their checks, and per-sequence state.

Sampling (names and order as in Hugging Face ``generate``), on the float64 logits ``z`` of one step:

0. ``repetition_penalty`` (1 = off; HF ``RepetitionPenaltyLogitsProcessor``): for every token id seen
   so far in this sequence (prompt and generated, each id once), ``z /= p`` where ``z > 0`` and
   ``z *= p`` where ``z < 0``. It applies to greedy decoding too.
1. ``temperature == 0``: greedy, ``argmax z`` (ties go to the lowest id). Otherwise ``z / temperature``.
2. ``top_k`` (0 = off): keep the ``k`` largest logits (ties broken towards lower ids).
3. ``top_p`` (1 = off): nucleus; sort the kept tokens by probability (descending, ties by id)
   and keep the smallest prefix whose cumulative probability is ``>= top_p`` (at least one token).
4. ``min_p`` (0 = off; HF ``MinPLogitsWarper``): keep the tokens whose probability (after 1-3) is at
   least ``min_p`` times the largest one's (the most likely token always stays).
5. Draw: ``u = rng.random()`` with ``rng = np.random.default_rng(seed)`` (one generator per sequence,
   so the same seed gives the same output); the token is the first kept id, in ascending id order,
   whose cumulative probability exceeds ``u``.

The state a sequence carries between steps (its generator and the ids it has seen) lives in one
:class:`TokenSampler` per sequence, so that several sequences decoded together keep theirs apart.
Defaults: an argument left as None takes the model's ``generation_config.json`` value
(gptevo/generation_config.py), else the "off" value above (temperature 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from gptevo.errors import RequestError


@dataclass(frozen=True)
class Sampling:
    """Checked sampling parameters (see the module doc for their meaning)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def on_device(self) -> bool:
        """True when a device sampling kernel (temperature, top-k, top-p) implements every rule set."""
        return self.min_p == 0.0 and self.repetition_penalty == 1.0


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def check_sampling(temperature=1.0, top_k=None, top_p=None, seed=None, vocab_size: int | None = None, *,
                   min_p=None, repetition_penalty=None) -> Sampling:
    """RequestError naming the parameter for: temperature < 0, NaN or inf; top_k < 0, > vocab_size or
    not an int; top_p outside (0, 1]; min_p outside [0, 1]; repetition_penalty <= 0, NaN or inf; a
    negative or non-integer seed (reliability F4). None means off (temperature: 1)."""
    if temperature is None:
        temperature = 1.0
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
    if min_p is None:
        min_p = 0.0
    if not _is_number(min_p) or not math.isfinite(float(min_p)) or not 0.0 <= min_p <= 1.0:
        raise RequestError(f"min_p must be a number in [0, 1] (0 or None = off), got {min_p!r}")
    if repetition_penalty is None:
        repetition_penalty = 1.0
    if not _is_number(repetition_penalty) or not math.isfinite(float(repetition_penalty)) \
            or repetition_penalty <= 0:
        raise RequestError(f"repetition_penalty must be a finite number > 0 (1 or None = off), "
                           f"got {repetition_penalty!r}")
    return Sampling(float(temperature), int(top_k), float(top_p), None if seed is None else int(seed),
                    float(min_p), float(repetition_penalty))


def apply_repetition_penalty(logits: np.ndarray, seen, penalty: float) -> np.ndarray:
    """A float64 copy of ``logits [V]`` with the seen ids' logits divided by ``penalty`` where positive,
    multiplied by it where negative (HF RepetitionPenaltyLogitsProcessor; each id once)."""
    z = np.array(logits, dtype=np.float64)                           # [V] copy
    ids = np.unique(np.asarray(list(seen) if isinstance(seen, (set, frozenset)) else seen,
                               dtype=np.int64))                      # [S] distinct seen ids
    if ids.size:
        v = z[ids]                                                   # [S]
        z[ids] = np.where(v > 0, v / penalty, v * penalty)           # [S]
    return z


def token_distribution(logits: np.ndarray, sampling: Sampling, seen=None) -> tuple[np.ndarray, np.ndarray]:
    """The tokens a sampling step can pick and their probabilities: ``(ids [k] ascending, p [k])`` after
    the repetition penalty, temperature, top-k, top-p and min-p (module doc, steps 0-4; not greedy).
    ``seen``: the ids this sequence has seen (prompt + generated; duplicates are fine), used only when
    ``sampling.repetition_penalty != 1``."""
    z = np.asarray(logits, dtype=np.float64)                         # [V]
    if sampling.repetition_penalty != 1.0 and seen is not None:
        z = apply_repetition_penalty(z, seen, sampling.repetition_penalty)   # [V]
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
    if sampling.min_p > 0.0:
        keep = int(np.count_nonzero(p >= sampling.min_p * p[0]))     # p is descending: a prefix; p[0] max
        order, p = order[:keep], p[:keep]
        p /= p.sum()
    by_id = np.argsort(order, kind="stable")                         # draw in ascending id order
    return order[by_id], p[by_id]                                    # [k], [k]


def sample_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator | None, seen=None) -> int:
    """One token id from a row of logits ``[V]`` (module doc: repetition penalty, temperature, top-k,
    top-p, min-p, draw). ``seen``: as in :func:`token_distribution`."""
    if sampling.greedy:
        z = np.asarray(logits, dtype=np.float64)                     # [V]
        if sampling.repetition_penalty != 1.0 and seen is not None:
            z = apply_repetition_penalty(z, seen, sampling.repetition_penalty)   # [V]
        return int(np.argmax(z))                                     # first maximum = lowest id
    ids, p = token_distribution(logits, sampling, seen)              # [k], [k]
    u = rng.random()
    cum = np.cumsum(p)                                               # [k]
    return int(ids[min(int(np.searchsorted(cum, u * cum[-1], side="right")), ids.size - 1)])


class TokenSampler:
    """One sequence's sampling state: its random generator (``default_rng(seed)``, made once) and, for
    ``repetition_penalty``, the ids it has seen (the prompt, then each token it samples).

    ``sampler(row)`` samples from a logits row ``[V]`` and records the token; on a device that samples
    itself, ``draw()`` gives the step's ``u`` and ``record(token)`` notes the token it picked. Batched
    decoding keeps one TokenSampler per sequence.
    """

    def __init__(self, sampling: Sampling, prompt_ids: Iterable[int] = ()):
        self.sampling = sampling
        self.rng = None if sampling.greedy else np.random.default_rng(sampling.seed)
        self.seen: set[int] | None = set(map(int, prompt_ids)) if sampling.repetition_penalty != 1.0 else None

    def __call__(self, logits_row) -> int:
        token = sample_token(logits_row, self.sampling, self.rng, seen=self.seen)
        self.record(token)
        return token

    def draw(self) -> float:
        """The uniform number of one device sampling step (0.0 when greedy, which draws nothing)."""
        return 0.0 if self.rng is None else float(self.rng.random())

    def record(self, token: int) -> None:
        if self.seen is not None:
            self.seen.add(int(token))


def sampling_for(model, *, temperature=None, top_k=None, top_p=None, min_p=None, repetition_penalty=None,
                 seed=None) -> Sampling:
    """Checked Sampling for ``model``: an argument left None takes the model's ``generation_config.json``
    value (gptevo/generation_config.py), else the built-in default (temperature 1, filters off)."""
    from gptevo.generation_config import merge, model_defaults

    a = merge(model_defaults(model), temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
              repetition_penalty=repetition_penalty)
    return check_sampling(a["temperature"], a["top_k"], a["top_p"], seed, vocab_size=model.config.vocab_size,
                          min_p=a["min_p"], repetition_penalty=a["repetition_penalty"])
