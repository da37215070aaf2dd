"""Mixture of Experts: routing, the expert MLPs, combining, and the load-balancing loss.

Written spec: ``spec/ops/moe.md``. Sources: the seed's section "7. Mixture of Experts (MoE)"
(router softmax, top-k, weighted sum, auxiliary loss); Mixtral and Qwen3-MoE routing as in HF
transformers (``modeling_mixtral.py``, ``modeling_qwen3_moe.py``); gpt-oss routing, clamped SwiGLU
experts and the bias order as in openai/gpt-oss ``gpt_oss/torch/model.py``.

A MoE layer, in calls: ``logits = linear(x, W_router, b_router)`` (the router bias, gpt-oss only, is
added there, before routing); ``weights, ids = moe_route(logits, k, order, renormalize)``;
``y = moe_experts(x, weights, ids, ...)``.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

from gptevo.errors import RequestError
from gptevo.ops import checks
from gptevo.ops.activations import clamped_swiglu, swiglu
from gptevo.ops.mxfp4 import Mxfp4Weight, mxfp4_encode
from gptevo.ops.softmax import softmax
from gptevo.ops.spec import Case, compute_dtype, op, unchecked, widen

ROUTE_ORDERS = ("softmax_topk", "topk_softmax")
EXPERT_ACTIVATIONS = ("swiglu", "clamped_swiglu")
BF16 = ml_dtypes.bfloat16

# The bodies the MoE ops compose: their arguments are checked once, by this module's checks.
_softmax, _swiglu, _clamped_swiglu = unchecked(softmax), unchecked(swiglu), unchecked(clamped_swiglu)


def _topk_ids(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries per row, largest first; ties go to the lower index."""
    return np.argsort(-scores, axis=-1, kind="stable")[..., :k]     # [T, k]


def _route_cases(rng: np.random.Generator):
    yield Case("T=1,E=8,k=2,softmax_topk,renorm", {
        "logits": rng.standard_normal((1, 8)).astype(np.float32), "k": 2, "renormalize": True})
    yield Case("T=7,E=8,k=2,softmax_topk", {
        "logits": rng.standard_normal((7, 8)).astype(np.float32), "k": 2})
    yield Case("T=5,E=32,k=4,topk_softmax", {
        "logits": (3 * rng.standard_normal((5, 32))).astype(np.float32), "k": 4, "order": "topk_softmax"})
    yield Case("T=6,E=5,k=1,bf16-logits", {
        "logits": rng.standard_normal((6, 5)).astype(BF16), "k": 1, "order": "topk_softmax"})
    yield Case("T=3,E=4,k=4,k=E", {"logits": rng.standard_normal((3, 4)).astype(np.float32), "k": 4})
    yield Case("T=9,E=16,k=3,f64,renorm", {
        "logits": rng.standard_normal((9, 16)), "k": 3, "renormalize": True})
    yield Case("T=4,E=128,k=8,softmax_topk", {
        "logits": rng.standard_normal((4, 128)).astype(np.float32), "k": 8})


def check_moe_route_args(logits, k, order="softmax_topk", renormalize=False) -> dict:
    """logits real [T, E]; k an int in 1..E; order one of ROUTE_ORDERS; renormalize as a bool."""
    logits = checks.real_array(logits, "moe_route: logits")
    if len(logits.shape) != 2:
        raise RequestError(f"moe_route: logits must be [T, E], got shape {list(logits.shape)}")
    n_experts = logits.shape[1]
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_experts:
        raise RequestError(f"moe_route: k must be an int in 1..{n_experts} (E), got {k!r}")
    order = checks.one_of(order, ROUTE_ORDERS, "moe_route: order must be one of " + str(ROUTE_ORDERS)
                          + ", got {value!r}")
    return {"logits": logits, "k": int(k), "order": order, "renormalize": bool(renormalize)}


@op("moe_route",
    signature='moe_route(logits[T,E], k, order="softmax_topk"|"topk_softmax", renormalize=False) '
              "-> (weights[T,k], ids[T,k] int64)",
    dtypes="logits: f32|f64|bf16|f16; weights out: compute dtype; ids out: int64",
    tolerance={"float32": 2e-6, "float64": 1e-13},
    cases=_route_cases,
    source="seed section 7 (Router, Top-K); HF Mixtral/Qwen3-MoE routing; gpt-oss gpt_oss/torch/model.py",
    spec_file="spec/ops/moe.md", check=check_moe_route_args)
def moe_route(logits, k, order="softmax_topk", renormalize=False):
    """Pick ``k`` experts per token and their mixing weights.

    logits: [T, E] router logits (any router bias already added by ``linear``).
    order="softmax_topk" (Mixtral, Qwen3-MoE): p = softmax(logits) over all E, keep the k largest;
        with ``renormalize`` divide them by their sum (Mixtral always; Qwen3-MoE iff norm_topk_prob).
    order="topk_softmax" (gpt-oss): keep the k largest logits, weights = softmax over those k only
        (they already sum to 1, so ``renormalize`` changes nothing).
    Returns (weights [T, k] in the compute dtype, ids [T, k] int64), each row sorted by descending
    weight. Softmax is monotone, so both orders rank experts by their logits; equal logits are
    taken lower expert index first (torch.topk leaves ties unspecified).
    """
    z = widen(logits, compute_dtype(logits))                         # [T, E]
    ids = _topk_ids(z, k)                                            # [T, k]
    if order == "softmax_topk":
        p = _softmax(z)                                              # [T, E]
        weights = np.take_along_axis(p, ids, axis=-1)                # [T, k]
        if renormalize:
            weights = weights / weights.sum(axis=-1, keepdims=True)  # [T, k]
    else:
        weights = _softmax(np.take_along_axis(z, ids, axis=-1))      # [T, k]
    return weights, ids.astype(np.int64)


def _combine_cases(rng: np.random.Generator):
    for t, k, d in ((1, 2, 16), (5, 4, 33), (3, 1, 8)):
        yield Case(f"T={t},k={k},D={d}", {
            "expert_out": rng.standard_normal((t, k, d)).astype(np.float32),
            "weights": rng.dirichlet(np.ones(k), size=t).astype(np.float32)})
    yield Case("T=4,k=2,D=12,f64", {"expert_out": rng.standard_normal((4, 2, 12)),
                                    "weights": rng.dirichlet(np.ones(2), size=4)})


def check_moe_combine_args(expert_out, weights) -> dict:
    """expert_out real [T,k,D]; weights real [T,k]."""
    expert_out = checks.real_array(expert_out, "moe_combine: expert_out")
    weights = checks.real_array(weights, "moe_combine: weights")
    if len(expert_out.shape) != 3 or tuple(weights.shape) != tuple(expert_out.shape[:2]):
        raise RequestError(f"moe_combine: expected expert_out [T,k,D] and weights [T,k], got "
                           f"{list(expert_out.shape)} and {list(weights.shape)}")
    return {"expert_out": expert_out, "weights": weights}


@op("moe_combine",
    signature="moe_combine(expert_out[T,k,D], weights[T,k]) -> [T,D]",
    dtypes="expert_out: f32|f64; weights: f32|f64|bf16",
    tolerance={"float32": 2e-6, "float64": 1e-13},
    cases=_combine_cases,
    source="seed section 7 (Expert Output: sum over TopK of g_i(x) * E_i(x))",
    spec_file="spec/ops/moe.md", check=check_moe_combine_args)
def moe_combine(expert_out, weights):
    """out[t] = sum_j weights[t, j] * expert_out[t, j], summed over the k slots in order."""
    dt = compute_dtype(expert_out)
    y = widen(expert_out, dt)                                        # [T, k, D]
    w = widen(weights, dt)                                           # [T, k]
    return (w[:, :, None] * y).sum(axis=1)                           # [T, D]


_moe_combine = unchecked(moe_combine)     # moe_experts' last step, on arguments it made


def _expert_activation(h: np.ndarray, activation: str, alpha: float, limit: float) -> np.ndarray:
    """[n, 2I] -> [n, I]. swiglu: gate = h[:, :I], up = h[:, I:] (concatenated, Mixtral/Qwen3-MoE);
    clamped_swiglu: gate = even columns, linear = odd columns (interleaved, gpt-oss)."""
    if activation == "swiglu":
        half = h.shape[-1] // 2
        return _swiglu(h[:, :half], h[:, half:])                     # [n, I]
    return _clamped_swiglu(h, alpha=alpha, limit=limit)              # [n, I]


def _routing_for(rng, t, n_experts, k, dtype=np.float32):
    """Valid routing for cases: k distinct experts per token, positive weights summing to 1."""
    ids = np.stack([rng.permutation(n_experts)[:k] for _ in range(t)]).astype(np.int64)  # [T, k]
    weights = rng.dirichlet(np.ones(k), size=t).astype(dtype)                             # [T, k]
    return weights, ids


def _experts_cases(rng: np.random.Generator):
    def dense(e, rows, cols, dtype=np.float32, scale=0.3):
        return (scale * rng.standard_normal((e, rows, cols))).astype(dtype)

    t, e, k, d, i = 1, 4, 2, 16, 8
    w, ids = _routing_for(rng, t, e, k)
    yield Case("T=1,E=4,k=2,D=16,I=8,swiglu,f32w,nobias", {
        "x": rng.standard_normal((t, d)).astype(np.float32), "weights": w, "ids": ids,
        "w_gate_up": dense(e, 2 * i, d), "b_gate_up": None, "w_down": dense(e, d, i), "b_down": None})
    t, e, k, d, i = 5, 8, 2, 32, 24
    w, ids = _routing_for(rng, t, e, k)
    yield Case("T=5,E=8,k=2,D=32,I=24,swiglu,bf16w,bias", {
        "x": rng.standard_normal((t, d)).astype(np.float32), "weights": w, "ids": ids,
        "w_gate_up": dense(e, 2 * i, d, BF16), "b_gate_up": dense(1, e, 2 * i, BF16)[0],
        "w_down": dense(e, d, i, BF16), "b_down": dense(1, e, d, BF16)[0]})
    t, e, k, d, i = 3, 4, 4, 12, 6
    w, ids = _routing_for(rng, t, e, k)
    yield Case("T=3,E=4,k=4,D=12,I=6,clamped_swiglu,f16w,bias,clamp-active", {
        "x": (4 * rng.standard_normal((t, d))).astype(np.float32), "weights": w, "ids": ids,
        "w_gate_up": dense(e, 2 * i, d, np.float16, scale=1.0), "b_gate_up": dense(1, e, 2 * i)[0],
        "w_down": dense(e, d, i, np.float16), "b_down": dense(1, e, d)[0],
        "activation": "clamped_swiglu"})
    t, e, k, d, i = 4, 4, 2, 64, 32
    w, ids = _routing_for(rng, t, e, k)
    gate_up = Mxfp4Weight(*mxfp4_encode(dense(e, 2 * i, d)), name="case.gate_up")
    down = Mxfp4Weight(*mxfp4_encode(dense(e, d, i)), name="case.down")
    yield Case("T=4,E=4,k=2,D=64,I=32,clamped_swiglu,mxfp4w,bf16bias", {
        "x": rng.standard_normal((t, d)).astype(np.float32), "weights": w, "ids": ids,
        "w_gate_up": gate_up, "b_gate_up": dense(1, e, 2 * i, BF16)[0],
        "w_down": down, "b_down": dense(1, e, d, BF16)[0],
        "activation": "clamped_swiglu", "alpha": 1.702, "limit": 7.0})
    t, e, k, d, i = 6, 6, 3, 10, 7
    w, ids = _routing_for(rng, t, e, k, np.float64)
    yield Case("T=6,E=6,k=3,D=10,I=7,swiglu,f64x,f32w,bias", {
        "x": rng.standard_normal((t, d)), "weights": w, "ids": ids,
        "w_gate_up": dense(e, 2 * i, d), "b_gate_up": dense(1, e, 2 * i)[0],
        "w_down": dense(e, d, i), "b_down": dense(1, e, d)[0]})


def check_moe_experts_args(x, weights, ids, w_gate_up, b_gate_up, w_down, b_down, activation="swiglu",
                           alpha=1.702, limit=7.0) -> dict:
    """``moe_experts``'s arguments checked.

    x real [T,D]; weights real [T,k]; ids integers [T,k], all in 0..E-1 when they are a NumPy array
    (a backend's device ids: dtype only, no transfer); w_gate_up [E,2I,D] and w_down [E,D,I] real
    arrays or packed weights; biases None or [E,2I] and [E,D]; activation one of
    EXPERT_ACTIVATIONS; alpha and limit finite reals (as floats). RequestError names the argument.
    """
    activation = checks.one_of(activation, EXPERT_ACTIVATIONS, "moe_experts: activation must be one of "
                               + str(EXPERT_ACTIVATIONS) + ", got {value!r}")
    alpha = checks.finite_real(alpha, "moe_experts: alpha")
    limit = checks.finite_real(limit, "moe_experts: limit")
    x = checks.real_array(x, "moe_experts: x")
    weights = checks.real_array(weights, "moe_experts: weights")
    ids = checks.array(ids)
    if len(x.shape) != 2 or len(ids.shape) != 2 or ids.shape[0] != x.shape[0] or \
            tuple(weights.shape) != tuple(ids.shape):
        raise RequestError(f"moe_experts: expected x [T,D], weights [T,k], ids [T,k]; got "
                           f"{list(x.shape)}, {list(weights.shape)}, {list(ids.shape)}")
    if ids.dtype.kind not in "iu":
        raise RequestError(f"moe_experts: ids must be integers, got dtype {ids.dtype}")
    rank = "moe_experts: w_gate_up and w_down must be 3-D [E,2I,D] and [E,D,I], got {shape}"
    w_gate_up = checks.weight(w_gate_up, 3, "moe_experts: w_gate_up", rank)
    w_down = checks.weight(w_down, 3, "moe_experts: w_down", rank)
    n_experts, two_i, d = w_gate_up.shape
    if d != x.shape[1] or two_i % 2 or tuple(w_down.shape) != (n_experts, d, two_i // 2):
        raise RequestError(f"moe_experts: expected w_gate_up [E,2I,D] and w_down [E,D,I] with D={x.shape[1]}; "
                           f"got {list(w_gate_up.shape)} and {list(w_down.shape)}")
    if b_gate_up is not None and checks.shape_of(b_gate_up) != (n_experts, two_i):
        raise RequestError(f"moe_experts: b_gate_up must be [{n_experts}, {two_i}], got "
                           f"{list(checks.shape_of(b_gate_up))}")
    if b_down is not None and checks.shape_of(b_down) != (n_experts, d):
        raise RequestError(f"moe_experts: b_down must be [{n_experts}, {d}], got {list(checks.shape_of(b_down))}")
    if checks.on_host(ids) and ids.size and not checks.all_in_range(ids, n_experts):
        raise RequestError(f"moe_experts: expert ids must be in 0..{n_experts - 1}, got "
                           f"{int(ids.min())}..{int(ids.max())}")
    return {"x": x, "weights": weights, "ids": ids, "w_gate_up": w_gate_up,
            "b_gate_up": None if b_gate_up is None else checks.array(b_gate_up), "w_down": w_down,
            "b_down": None if b_down is None else checks.array(b_down), "activation": activation,
            "alpha": alpha, "limit": limit}


@op("moe_experts",
    signature='moe_experts(x[T,D], weights[T,k], ids[T,k], w_gate_up[E,2I,D], b_gate_up[E,2I]|None, '
              'w_down[E,D,I], b_down[E,D]|None, activation="swiglu"|"clamped_swiglu", alpha=1.702, '
              "limit=7.0) -> [T,D]",
    dtypes="x: f32|f64; weights: f32|f64|bf16; w_*: f32|f16|bf16|Mxfp4Weight; b_*: f32|f16|bf16",
    tolerance={"float32": 1e-5, "float64": 1e-12},
    cases=_experts_cases,
    source="seed section 7 (MoE(x) = sum_TopK g_i E_i(x)); gpt-oss gpt_oss/torch/model.py MLPBlock "
           "(clamped SwiGLU, interleaved gate/linear, b_down before weighting); HF Mixtral/Qwen3-MoE experts",
    spec_file="spec/ops/moe.md", check=check_moe_experts_args)
def moe_experts(x, weights, ids, w_gate_up, b_gate_up, w_down, b_down, activation="swiglu",
                alpha=1.702, limit=7.0):
    """The routed expert MLPs and their weighted sum.

    For each token t and slot j with e = ids[t, j]:
        h = w_gate_up[e] @ x[t] + b_gate_up[e]                        # [2I]
        a = silu(h[:I]) * h[I:]              (activation="swiglu": gate rows first, then up)
          | clamped_swiglu(h, alpha, limit)  (gate = even rows, linear = odd rows; gpt-oss)
        y = w_down[e] @ a + b_down[e]                                 # [D]; bias BEFORE weighting
        out[t] += weights[t, j] * y
    so b_down is scaled by the routing weight (gpt-oss). Weights may be float arrays or
    Mxfp4Weight; only the experts that appear in ``ids`` are read (and decoded).
    """
    d = w_gate_up.shape[2]
    dt = compute_dtype(x)
    x = widen(x, dt)                                                 # [T, D]
    expert_out = np.zeros((*ids.shape, d), dtype=dt)                 # [T, k, D]
    for e in np.unique(ids):
        tok, slot = np.nonzero(ids == e)                             # rows routed to expert e
        h = x[tok] @ widen(w_gate_up[e], dt).T                       # [n, 2I]
        if b_gate_up is not None:
            h = h + widen(b_gate_up[e], dt)                          # [n, 2I]
        a = _expert_activation(h, activation, alpha, limit)          # [n, I]
        y = a @ widen(w_down[e], dt).T                               # [n, D]
        if b_down is not None:
            y = y + widen(b_down[e], dt)                             # [n, D]
        expert_out[tok, slot] = y
    return _moe_combine(expert_out=expert_out, weights=weights)     # [T, D]


def _aux_cases(rng: np.random.Generator):
    p = softmax(rng.standard_normal((8, 4)))
    yield Case("T=8,E=4,k=2", {"router_probs": p, "ids": _topk_ids(p, 2).astype(np.int64)})


@op("moe_aux_loss",
    signature="moe_aux_loss(router_probs[T,E], ids[T,k]) -> float",
    dtypes="router_probs: f32|f64; ids: int",
    tolerance={"float32": 1e-6, "float64": 1e-13},
    cases=_aux_cases,
    source="seed section 7 (Load Balancing: L_aux = alpha * N * sum_i f_i P_i); Switch Transformer eq. 4",
    spec_file="spec/ops/moe.md", backend_op=False)
def moe_aux_loss(router_probs, ids):
    """The seed's load-balancing loss without its weight alpha: E * sum_i f_i * P_i.

    f_i = (number of (token, slot) assignments to expert i) / (T * k): the fraction of routed
    tokens that go to i, so sum_i f_i = 1 (Switch's f_i when k = 1). P_i = mean over tokens of
    router_probs[:, i] (the softmax over all E experts). Uniform routing gives exactly 1; all tokens
    on one expert with probability 1 gives E. The caller multiplies by alpha (the seed: 0.01).
    Computed in float64; training-only, not a backend op. (HF's ``load_balancing_loss_func`` sums
    the per-slot fractions instead, which is k times this value.)
    """
    probs = np.asarray(router_probs, dtype=np.float64)
    ids = np.asarray(ids)
    if probs.ndim != 2 or ids.ndim != 2 or ids.shape[0] != probs.shape[0] or probs.shape[0] == 0:
        raise RequestError(f"moe_aux_loss: expected router_probs [T,E] and ids [T,k] with T > 0, got "
                           f"{list(probs.shape)} and {list(ids.shape)}")
    n_experts = probs.shape[1]
    if ids.dtype.kind not in "iu" or (ids.size and (ids.min() < 0 or ids.max() >= n_experts)):
        raise RequestError(f"moe_aux_loss: ids must be integers in 0..{n_experts - 1}")
    f = np.bincount(ids.ravel(), minlength=n_experts) / ids.size    # [E], sums to 1
    p_mean = probs.mean(axis=0)                                      # [E]
    return float(n_experts * np.sum(f * p_mean))
