"""The attention mask: causal, optionally limited to a sliding window of W keys.

Written spec: ``spec/ops/attention.md`` §Masks. Sources: the seed's "Sliding Window Attention"
(whose code is wrong, see the spec and errata), Mistral 7B / Longformer for the idea, and the
checkpoints' own code for the exact count: HF ``masking_utils`` (``kv_idx > q_idx - W``) and the
official gpt-oss torch/triton code agree that query i sees W keys, itself included.
"""
from __future__ import annotations

import numpy as np

from gptevo.errors import RequestError
from gptevo.ops.checks import integer_positions
from gptevo.ops.spec import Case, op


def check_window(window) -> int | None:
    """``window`` as an int >= 1, or None; RequestError otherwise (shared with attention)."""
    if window is None:
        return None
    if isinstance(window, (bool, np.bool_)) or not isinstance(window, (int, np.integer)) or window < 1:
        raise RequestError(f"sliding window must be None or an integer >= 1 (keys seen, self included), "
                           f"got {window!r}")
    return int(window)


def check_attention_mask_args(q_positions, k_positions, window=None) -> dict:
    """Positions 1-D integer arrays [T] and [S]; window None or an int >= 1."""
    return {"q_positions": integer_positions(q_positions, "attention_mask: q_positions"),
            "k_positions": integer_positions(k_positions, "attention_mask: k_positions"),
            "window": check_window(window)}


def _cases(rng):
    """Prefill (T = S), decode (T=1 at an offset), windows shorter and longer than T, ring buffers."""
    ar = lambda a, b: np.arange(a, b, dtype=np.int64)  # noqa: E731
    yield Case("T=8,S=8", {"q_positions": ar(0, 8), "k_positions": ar(0, 8)})
    yield Case("T=8,S=8,W=3", {"q_positions": ar(0, 8), "k_positions": ar(0, 8), "window": 3})
    yield Case("T=5,S=5,W=9", {"q_positions": ar(0, 5), "k_positions": ar(0, 5), "window": 9})
    yield Case("T=1,S=9,W=4", {"q_positions": ar(8, 9), "k_positions": ar(0, 9), "window": 4})
    yield Case("T=3,S=12,offset=9", {"q_positions": ar(9, 12), "k_positions": ar(0, 12)})
    ring = np.array([8, 9, 10, 3, 4, 5, 6, 7], dtype=np.int64)       # ring buffer of 8 slots, W=8
    yield Case("T=1,S=8,W=8,ring", {"q_positions": ar(10, 11), "k_positions": ring, "window": 8})
    empty = np.array([0, 1, 2, -1, -1], dtype=np.int64)             # two empty slots
    yield Case("T=3,S=5,empty_slots", {"q_positions": ar(0, 3), "k_positions": empty})
    yield Case("T=7,S=7,W=1", {"q_positions": ar(0, 7), "k_positions": ar(0, 7), "window": 1})


@op("attention_mask",
    signature="attention_mask(q_positions[T], k_positions[S], window=None) -> bool[T,S] (True = visible)",
    dtypes="positions: int; out: bool",
    tolerance={"float32": 0.0, "float64": 0.0}, cases=_cases,
    source="HF masking_utils (causal, sliding_window: kv_idx > q_idx - W); official gpt-oss sdpa mask; "
           "seed 'Sliding Window Attention' (corrected)",
    spec_file="spec/ops/attention.md", exact=True, check=check_attention_mask_args)
def attention_mask(q_positions, k_positions, window=None):
    """``visible[t, s] = 0 <= k_s <= q_t and (window is None or k_s > q_t - window)``.

    Positions are absolute token positions. Causal: a query sees keys at its own position and
    before. With a sliding window W, query position i sees keys i-W+1 .. i: exactly W keys, itself
    included (gpt-oss W=128, Mistral W=4096). Negative key positions mark empty KV-cache slots and
    are never visible. A query that sees no key gets an all-False row (attention outputs zeros).
    """
    q = q_positions.astype(np.int64)[:, None]                   # [T,1]
    k = k_positions.astype(np.int64)[None, :]                   # [1,S]
    visible = (k >= 0) & (k <= q)                               # [T,S]
    if window is not None:
        visible &= k > q - window                               # [T,S]
    return visible
