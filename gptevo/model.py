"""The transformer forward pass, written only as calls to backend ops (one forward for every family).

    x = embed(ids) * embedding_scale (+ learned / sinusoidal positions)
    for each layer i:
        x = x + o_proj(attention(rope(qk_norm(q)), rope(qk_norm(k)), v; window(i), sinks))  (norm first)
        x = x + mlp(norm(x))            dense GELU (GPT-2) | gated (SwiGLU, GeGLU) | MoE (router + experts)
    logits = lm_head(final_norm(x))

Every architectural difference is a ModelConfig flag (norm, position, qk_norm, attention_sinks,
window_for_layer(i), mlp / is_moe_layer(i), router_order, norm_topk_prob, expert_activation,
embedding_scale, rope_scaling, rotary_dim, ...); the model never branches on the family name. Tensor
names live in :mod:`gptevo.layouts`, stored weights in :mod:`gptevo.weights`, the KV cache in
:mod:`gptevo.kv_cache`. Ops are called as ``self.backend.<op>(...)`` with keyword arguments only, so any
backend with the same op names runs the model. Activations are float32 (float64 on request); weights
stay in their stored dtype (bf16, MXFP4) and are widened by the ops.

Equations: seed document sections on GPT-2, RoPE, RMSNorm, GQA, SwiGLU, MoE and sliding windows; the
per-family facts (HF families fact sheet, gpt-oss fact sheet).
"""
from __future__ import annotations

import math
import os
import sys
from typing import Callable

import numpy as np

from gptevo import backends as _backends
from gptevo.config import ModelConfig
from gptevo.errors import ConfigError, NumericalError, RequestError
from gptevo.kv_cache import KVCache
from gptevo.layouts import build_layout, is_moe_layer
from gptevo.weights import LayerWeights, ModelWeights, load_weights

COMPUTE_DTYPES = ("float32", "float64")


# -- what a config needs ---------------------------------------------------------------------------
def mlp_kind(config: ModelConfig, layer: int) -> str:
    """The MLP of ``layer``: "moe", "gelu" (GPT-2 fc/proj) or "gated" (SwiGLU / GeGLU gate, up, down)."""
    if is_moe_layer(config, layer):
        return "moe"
    if config.mlp == "gelu":
        return "gelu"
    if config.mlp == "clamped_swiglu":
        raise ConfigError("mlp 'clamped_swiglu' is supported only for experts (mlp='moe' with "
                          "expert_activation='clamped_swiglu'); no dense layout stores it")
    return "gated"


def gelu_approximate(config: ModelConfig) -> str:
    return "tanh" if config.activation in ("gelu_tanh", "gelu_new", "gelu_pytorch_tanh") else "none"


def ops_needed(config: ModelConfig) -> set[str]:
    """The backend ops a forward pass of ``config`` calls (checked at load time)."""
    ops = {"embedding", "linear", "attention", "layer_norm" if config.norm == "layernorm" else "rms_norm"}
    ops |= {"rope": {"rope_cos_sin", "apply_rope"}, "learned": {"learned_positions"},
            "sinusoidal": {"sinusoidal_positions"}, "alibi": {"alibi_slopes"}}.get(config.position, set())
    if config.qk_norm:
        ops.add("rms_norm" if config.norm != "layernorm" else "layer_norm")
    for i in range(config.num_layers):
        kind = mlp_kind(config, i)
        if kind == "moe":
            ops |= {"moe_route", "moe_experts"}
        elif kind == "gelu":
            ops.add("gelu_mlp")
        elif config.activation == "silu":
            ops |= {"swiglu_mlp", "swiglu"}
        else:
            ops.add("gelu")
    return ops


def compute_dtype(dtype) -> np.dtype:
    """The activation dtype: float32 or float64 (RequestError otherwise)."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in COMPUTE_DTYPES:
        raise RequestError(f"dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}")
    return dt


def _host(a) -> np.ndarray:
    """An op result as a NumPy array (device arrays expose ``.get()``)."""
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "get"):
        return a.get()
    return np.asarray(a)


def backend_arrays(backend):
    """The backend's own array functions (upload ``asarray``, ``to_host``, ``zeros``/``full``/``arange``,
    ``is_device``, optionally ``sample_token``), or None for NumPy backends (reference, numba).

    Found as ``backend.arrays`` when set on the Backend object, else as ``ARRAYS`` of a built-in
    backend's module when the Backend's ops are that module's (so a Backend built from other ops,
    e.g. an emulated runtime registered under the same name, keeps NumPy arrays)."""
    arrays = backend.__dict__.get("arrays")
    if arrays is not None:
        return arrays
    spec = _backends.BUILTIN.get(backend.name)
    module = sys.modules.get(spec.import_path) if spec is not None else None
    arrays = getattr(module, "ARRAYS", None)
    if arrays is None or backend.impls.get("embedding") is not getattr(module, "OPS", {}).get("embedding"):
        return None
    return arrays


# -- the model -------------------------------------------------------------------------------------
class Model:
    """A loaded model: ``logits(ids)``, ``forward(ids, cache)``, ``new_cache(n)`` and ``trace(ids)``.

    config:         the ModelConfig.
    weights:        ModelWeights in stored dtypes.
    backend:        the Backend whose ops run the forward pass.
    path:           the directory it was loaded from (None when built in memory).
    unused_tensors: checkpoint tensors no role uses (sorted names), e.g. GPT-2 ``attn.bias`` buffers;
                    they are never read.
    dtype:          the activation (compute) dtype, "float32" (default) or "float64".
    check_finite:   when True (default), ``logits`` and ``forward`` raise NumericalError instead of
                    returning NaN or inf logits (``trace`` never checks: it is the tool to find where
                    non-finite values start). Set it to False to get the raw logits.
    """

    check_finite = True
    weight_mode = "stored"

    def __init__(self, config: ModelConfig, weights: ModelWeights, backend=None, path=None,
                 unused_tensors=(), dtype="float32", checkpoint=None):
        self.config = config
        self.weights = weights
        self.backend = _backends.resolve(backend)
        self.backend.require(ops_needed(config), what=f"a {config.family} model")
        self.path = None if path is None else os.fspath(path)
        self.unused_tensors = sorted(unused_tensors)
        self.dtype = compute_dtype(dtype)
        self.checkpoint = checkpoint            # keeps memory-mapped files open
        self._rope_by_length: dict = {}         # batched steps: RoPE frequencies by sequence length
        self._fused_step = None                 # the backend's fused decode step, built on first use
        if config.position == "rope":
            # fail at load time, not at the first call, on a bad rope config
            self._rope_frequencies(config.max_position_embeddings)

    @classmethod
    def from_checkpoint(cls, config: ModelConfig, checkpoint, backend=None, path=None, dtype="float32",
                        check_weights: bool = False, weights: str = "stored") -> "Model":
        """Build from a config and an open checkpoint (anything with names/info/get).

        ``check_weights=True`` scans the used tensors' values before building (see weights.check_values).
        ``weights="int8"`` quantizes the dense matrices to blockwise int8 (gptevo.prepare.quantize_dense);
        then the backend's ``prepare_weights`` hook, if any, prepares them for its kernels.
        """
        from gptevo.prepare import check_weight_mode, quantize_dense

        if not isinstance(check_weights, bool):
            raise RequestError(f"check_weights must be True or False, got {check_weights!r}")
        check_weight_mode(weights)
        backend = _backends.resolve(backend)
        backend.require(ops_needed(config), what=f"a {config.family} model")
        layout = build_layout(config, checkpoint.names())
        stored = load_weights(checkpoint, layout, check_weights=check_weights)
        if weights == "int8":
            quantize_dense(stored)
        if backend.prepare_weights is not None:
            stored = backend.prepare_weights(stored, config, weights)
        unused = set(checkpoint.names()) - layout.used_names()
        model = cls(config, stored, backend, path=path, unused_tensors=unused, dtype=dtype, checkpoint=checkpoint)
        model.weight_mode = weights
        return model

    def __repr__(self) -> str:
        c = self.config
        return (f"<gptevo Model {c.family}: {c.num_layers} layers, D={c.hidden_size}, V={c.vocab_size}, "
                f"backend={self.backend.name!r}>")

    # -- public API ------------------------------------------------------------------------------
    def logits(self, token_ids) -> np.ndarray:
        """float32 logits ``[T, vocab]`` for the whole sequence, positions 0..T-1 (no cache)."""
        ids = self._check_ids(token_ids, start=0)
        return self._finite(_host(self._run(ids, cache=None, record=None).astype(np.float32, copy=False)), start=0)

    def new_cache(self, max_tokens: int) -> KVCache:
        """A KV cache for one generation of at most ``max_tokens`` positions (prompt included)."""
        if isinstance(max_tokens, (int, np.integer)) and not isinstance(max_tokens, bool) \
                and max_tokens > self.config.context_length:
            raise RequestError(f"max_tokens={max_tokens} exceeds the model's context of "
                               f"{self.config.context_length} positions")
        return KVCache(self.config, max_tokens, dtype=self.dtype, arrays=backend_arrays(self.backend))

    def forward(self, token_ids, cache: KVCache, logits: str = "all") -> np.ndarray:
        """float32 logits ``[T, vocab]`` of new tokens at positions ``cache.length ..``; extends ``cache``.

        ``logits="last"`` returns only the last position's ``[1, vocab]`` (what generation needs after a
        prompt: the output head then runs on one row instead of T, as llama.cpp does in prefill).
        """
        before = cache.length if isinstance(cache, KVCache) else 0
        last = logits == "last"
        logits = self.forward_on_backend(token_ids, cache, logits=logits)
        try:
            return self._finite(_host(logits), cache.length - 1 if last else before)
        except BaseException as exc:
            if any(n != before for n in cache._lengths):
                cache.broken = f"{type(exc).__name__} at position {before}"
            raise

    def forward_on_backend(self, token_ids, cache: KVCache, logits: str = "all"):
        """``forward`` without the host conversion and the finiteness check: float32 logits ``[T, vocab]``
        (``[1, vocab]`` with ``logits="last"``) as the backend's array (a device array on cupy, so
        nothing crosses to the host)."""
        if logits not in ("all", "last"):
            raise RequestError(f"logits must be 'all' or 'last', got {logits!r}")
        if not isinstance(cache, KVCache):
            raise RequestError(f"cache must be a KVCache from model.new_cache(), got {type(cache).__name__}")
        if cache.num_layers != self.config.num_layers:
            raise RequestError(f"cache has {cache.num_layers} layers, the model has {self.config.num_layers}")
        ids = self._check_ids(token_ids, start=cache.length)
        if cache.length + ids.shape[0] > cache.max_tokens:
            raise RequestError(f"KV cache overflow: {cache.length} cached + {ids.shape[0]} new tokens = "
                               f"{cache.length + ids.shape[0]} positions, but the cache holds "
                               f"max_tokens={cache.max_tokens}")
        before = cache.length
        if ids.shape[0] == 1:
            out = self._fused_decode(int(ids[0]), cache)
            if out is not None:
                return out                                                             # [1,V]
        try:
            return self._run(ids, cache=cache, record=None, last_only=logits == "last").astype(np.float32, copy=False)
        except BaseException as exc:
            if any(n != before for n in cache._lengths):
                cache.broken = f"{type(exc).__name__} at position {before}"
            raise

    def _fused_decode(self, token, cache):
        """Logits from the backend's fused decode step (its ``decode_program`` hook, e.g. the numba
        backend's single-region steps), or None: no such step for this model and cache(s), and the
        ops run instead. ``token`` int and ``cache`` a KVCache: ``[1, V]``; ``token`` ids [B] and
        ``cache`` a list of B caches: ``[B, V]`` from the step's ``rows`` method, if it has one. The
        step writes the caches exactly as the ops would."""
        if self._fused_step is None:
            make = getattr(self.backend, "decode_program", None)
            self._fused_step = (make(self.config, self.weights, self.dtype) if make is not None else None) or False
        if self._fused_step is False:
            return None
        batched = isinstance(cache, list)
        if batched and getattr(self._fused_step, "rows", None) is None:
            return None
        check = getattr(self.checkpoint, "check_unchanged", None)
        if check is not None:
            check()
        return self._fused_step.rows(token, cache) if batched else self._fused_step(token, cache)

    def forward_batch(self, token_ids, caches) -> np.ndarray:
        """float32 logits ``[B, vocab]``: one new token per sequence, ``token_ids[b]`` at position
        ``caches[b].length``, appended to ``caches[b]`` (B distinct caches, each its own sequence).

        One weight pass for all B rows: embeddings, norms, projections, MLPs, MoE and the output head
        run on the stacked ``[B, D]`` matrix; positions (learned, sinusoidal, RoPE) are per row, and
        attention runs per sequence against its own cache (spec/batching.md). Row b equals, within the
        ops' conformance tolerance, ``forward([token_ids[b]], caches[b])``. Backends with their own
        arrays (cupy) run the rows one at a time through ``forward``. Non-finite logits in any row
        raise NumericalError naming the row (every cache has then taken its token).
        """
        ids, caches = self._check_batch(token_ids, caches)
        logits = self._forward_rows(ids, caches)                                     # [B,V]
        if self.check_finite and not np.isfinite(logits).all():
            b = int(np.flatnonzero(~np.isfinite(logits).all(axis=1))[0])
            try:
                self._finite(logits[b:b + 1], caches[b].length - 1)
            except NumericalError as exc:
                raise NumericalError(f"batch row {b}: {exc}") from None
        return logits

    def _forward_rows(self, ids: np.ndarray, caches: list) -> np.ndarray:
        """``forward_batch`` on checked input, without the finiteness check: host float32 ``[B,V]``."""
        if backend_arrays(self.backend) is not None:   # device arrays: one sequence at a time
            rows = [_host(self.forward_on_backend(ids[b:b + 1], cache)) for b, cache in enumerate(caches)]
            return np.concatenate(rows).astype(np.float32, copy=False)                # [B,V]
        # the backend's fused step: its one-token form for one sequence, its batched form for several
        out = self._fused_decode(int(ids[0]), caches[0]) if len(caches) == 1 else self._fused_decode(ids, caches)
        if out is not None:
            return out                                                                 # [B,V]
        before = [cache.length for cache in caches]
        try:
            return _host(self._run_rows(ids, caches)).astype(np.float32, copy=False)  # [B,V]
        except BaseException as exc:
            for cache, n in zip(caches, before):
                if any(m != n for m in cache._lengths):
                    cache.broken = f"{type(exc).__name__} at position {n} (batched step)"
            raise

    def _check_batch(self, token_ids, caches):
        """(ids int64 [B], list of B KVCaches); RequestError naming the bad row or cache."""
        if not isinstance(caches, (list, tuple)) or not caches:
            raise RequestError(f"caches must be a non-empty list of KVCache, got {type(caches).__name__}")
        if len({id(c) for c in caches}) != len(caches):
            raise RequestError("caches must be distinct: each row is its own sequence with its own cache")
        if isinstance(token_ids, np.ndarray) or isinstance(token_ids, (list, tuple)):
            if len(token_ids) != len(caches):
                raise RequestError(f"forward_batch: {len(token_ids)} token ids for {len(caches)} caches; "
                                   f"give one new token per sequence")
        for b, cache in enumerate(caches):
            if not isinstance(cache, KVCache):
                raise RequestError(f"caches[{b}] must be a KVCache from model.new_cache(), got "
                                   f"{type(cache).__name__}")
            if cache.num_layers != self.config.num_layers:
                raise RequestError(f"caches[{b}] has {cache.num_layers} layers, the model has "
                                   f"{self.config.num_layers}")
            if cache.broken is not None:
                raise RequestError(f"caches[{b}] was left incomplete by a failed forward ({cache.broken}); "
                                   f"call cache.reset() or make a new cache")
            if cache.length + 1 > cache.max_tokens:
                raise RequestError(f"KV cache overflow in caches[{b}]: {cache.length} cached + 1 new token, "
                                   f"but the cache holds max_tokens={cache.max_tokens}")
        ids = self._check_ids(token_ids, start=None)                                  # [B]
        for b, cache in enumerate(caches):
            if cache.length + 1 > self.config.context_length:
                raise RequestError(f"caches[{b}]: position {cache.length} is beyond the model's context of "
                                   f"{self.config.context_length} positions")
        return ids, list(caches)

    def trace(self, token_ids) -> dict[str, np.ndarray]:
        """Named intermediates of a full-sequence forward, in order of computation.

        Names: ``embed``; per layer i ``layer{i}.attn_norm``, ``.q``, ``.k``, ``.v`` (projections,
        after q/k-norm), ``.q_rope``, ``.k_rope`` (RoPE models), ``.attn`` (attention output
        [T,H,Dh]), ``.attn_out`` (after the output projection), ``.resid_attn``, ``.mlp_norm``,
        ``.router_logits`` (MoE layers), ``.mlp_out``, ``.out``; then ``final_norm`` and ``logits``.
        """
        ids = self._check_ids(token_ids, start=0)
        out: dict[str, np.ndarray] = {}

        def record(name, value):
            out[name] = np.array(_host(value), copy=True)

        self._run(ids, cache=None, record=record)
        return out

    def _finite(self, logits: np.ndarray, start: int) -> np.ndarray:
        """``logits`` [T,V] unchanged, or NumericalError naming the first non-finite one (check_finite)."""
        if not self.check_finite:
            return logits
        ok = np.isfinite(logits)                                                     # [T,V]
        if ok.all():
            return logits
        t, v = (int(i[0]) for i in np.nonzero(~ok))
        raise NumericalError(f"non-finite logits: {logits[t, v]} at position {start + t}, vocab id {v} "
                             f"({int(ok.size - np.count_nonzero(ok))} of {ok.size} values non-finite); "
                             f"likely causes: NaN/inf weights or MXFP4 scales (gptevo.load(path, "
                             f"check_weights=True) names the tensor), or activations overflowing "
                             f"{self.dtype.name} (try dtype='float64')")

    # -- input checks ----------------------------------------------------------------------------
    def _check_ids(self, token_ids, start: int | None) -> np.ndarray:
        """token_ids as int64 [T]; RequestError for empty, non-integer, out-of-range or too long input
        (``start=None``: ids of different sequences, no length check)."""
        V, P = self.config.vocab_size, self.config.context_length
        if isinstance(token_ids, np.ndarray):
            if token_ids.ndim != 1 or token_ids.dtype.kind not in "iu":
                raise RequestError(f"token ids must be a 1-D integer array, got shape {list(token_ids.shape)} "
                                   f"dtype {token_ids.dtype}")
            ids = token_ids.astype(np.int64)
        elif isinstance(token_ids, (list, tuple)):
            for t, v in enumerate(token_ids):
                if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                    raise RequestError(f"token ids must be integers; item {t} is {v!r} ({type(v).__name__})")
            try:
                ids = np.array([int(v) for v in token_ids], dtype=np.int64)
            except OverflowError:
                raise RequestError(f"token ids must be in [0, {V}); got an integer beyond int64") from None
        else:
            raise RequestError(f"token ids must be a list of ints or a 1-D integer array, "
                               f"got {type(token_ids).__name__}")
        if ids.size == 0:
            raise RequestError("token ids are empty; need at least one token")
        bad = np.flatnonzero((ids < 0) | (ids >= V))
        if bad.size:
            raise RequestError(f"token id {int(ids[bad[0]])} at index {int(bad[0])} is out of range; "
                               f"ids must be in [0, {V}) (vocab_size={V})")
        if start is not None and start + ids.size > P:
            raise RequestError(f"sequence of {start + ids.size} positions ({start} cached + {ids.size} new) "
                               f"exceeds the model's context of {P} positions")
        return ids

    # -- the forward pass ------------------------------------------------------------------------
    def _run(self, ids: np.ndarray, cache: KVCache | None, record: Callable | None,
             last_only: bool = False) -> np.ndarray:
        check = getattr(self.checkpoint, "check_unchanged", None)
        if check is not None:
            check()        # a mapped file truncated since loading: FormatError now, not SIGBUS below
        c, w, B = self.config, self.weights, self.backend
        rec = record or (lambda name, value: None)
        start = cache.length if cache is not None else 0
        pos = np.arange(start, start + ids.shape[0], dtype=np.int64)                # [T]
        arrays = backend_arrays(B)
        if arrays is not None:   # backend-owned arrays: the ids cross once, positions are made on the device
            pos = arrays.arange(start, start + ids.shape[0], np.int64)                 # [T]
            ids = arrays.asarray(ids)                                                  # [T]

        x = B.embedding(table=w.embed, ids=ids).astype(self.dtype, copy=False)      # [T,D]
        if c.embedding_scale != 1.0:
            x = x * self.dtype.type(c.embedding_scale)                               # [T,D] Gemma sqrt(D)
        if c.position == "learned":
            x = x + B.learned_positions(table=w.pos_embed, positions=pos)            # [T,D]
        elif c.position == "sinusoidal":
            x = x + B.sinusoidal_positions(positions=pos, dim=c.hidden_size, dtype=self.dtype.name)
        rec("embed", x)

        rope = None
        if c.position == "rope":
            inv_freq, factor = self._rope_frequencies(start + ids.shape[0])
            rope = B.rope_cos_sin(positions=pos, inv_freq=inv_freq, attention_factor=factor)  # ([T,R/2],)*2
        slopes = B.alibi_slopes(num_heads=c.num_heads) if c.position == "alibi" else None    # [H]

        for i, layer in enumerate(w.layers):
            x = self._block(i, layer, x, pos, rope, slopes, cache, rec)               # [T,D]

        if last_only:
            x = x[-1:]                                                                 # [1,D]
        x = self._norm(x, w.final_norm, w.final_norm_bias)                            # [T,D]
        rec("final_norm", x)
        logits = B.linear(x=x, weight=w.lm_head)                                     # [T,V]
        rec("logits", logits)
        return logits                   # [T,V] the backend's array; forward/logits convert it

    def _run_rows(self, ids: np.ndarray, caches: list) -> np.ndarray:
        """One decode step of B sequences: ``ids[b]`` at position ``caches[b].length`` (host arrays)."""
        check = getattr(self.checkpoint, "check_unchanged", None)
        if check is not None:
            check()
        c, w, B = self.config, self.weights, self.backend
        rec = lambda name, value: None                                                 # noqa: E731
        pos = np.array([cache.length for cache in caches], dtype=np.int64)             # [B]
        x = B.embedding(table=w.embed, ids=ids).astype(self.dtype, copy=False)       # [B,D]
        if c.embedding_scale != 1.0:
            x = x * self.dtype.type(c.embedding_scale)                               # [B,D]
        if c.position == "learned":
            x = x + B.learned_positions(table=w.pos_embed, positions=pos)            # [B,D]
        elif c.position == "sinusoidal":
            x = x + B.sinusoidal_positions(positions=pos, dim=c.hidden_size, dtype=self.dtype.name)
        rope = self._rope_rows(pos) if c.position == "rope" else None                # ([B,R/2],)*2
        slopes = B.alibi_slopes(num_heads=c.num_heads) if c.position == "alibi" else None    # [H]
        for i, layer in enumerate(w.layers):
            x = self._block(i, layer, x, pos, rope, slopes, caches, rec)              # [B,D]
        x = self._norm(x, w.final_norm, w.final_norm_bias)                            # [B,D]
        return B.linear(x=x, weight=w.lm_head)                                       # [B,V]

    def _rope_rows(self, pos: np.ndarray):
        """cos, sin ``[B, R/2]`` for rows at positions ``pos`` [B], each with the frequencies a forward
        ending at its own position uses (dynamic and longrope scaling depend on that length)."""
        groups: dict[tuple, list[int]] = {}
        freqs = {}
        memo = self._rope_by_length                                 # seq_len -> (inv_freq, factor)
        if len(memo) > 4096:
            memo.clear()
        for b, p in enumerate(pos.tolist()):
            if p + 1 not in memo:
                memo[p + 1] = self._rope_frequencies(p + 1)
            inv_freq, factor = memo[p + 1]
            key = (inv_freq.tobytes(), float(factor))
            groups.setdefault(key, []).append(b)
            freqs[key] = (inv_freq, factor)
        if len(groups) == 1:
            inv_freq, factor = next(iter(freqs.values()))
            return self.backend.rope_cos_sin(positions=pos, inv_freq=inv_freq, attention_factor=factor)
        cos = sin = None
        for key, rows in groups.items():
            inv_freq, factor = freqs[key]
            rows_ = np.array(rows, dtype=np.int64)                                     # [b]
            c_, s_ = self.backend.rope_cos_sin(positions=pos[rows_], inv_freq=inv_freq,
                                               attention_factor=factor)                # ([b,R/2],)*2
            if cos is None:
                cos = np.empty((pos.shape[0], c_.shape[1]), c_.dtype)                  # [B,R/2]
                sin = np.empty((pos.shape[0], s_.shape[1]), s_.dtype)                  # [B,R/2]
            cos[rows_], sin[rows_] = c_, s_
        return cos, sin

    def _rope_frequencies(self, seq_len: int):
        from gptevo.ops.rope import rope_frequencies   # a helper, not a backend op

        c = self.config
        return rope_frequencies(head_dim=c.head_dim, theta=c.rope_theta, rotary_dim=c.rotary_dim,
                                scaling=c.scaling or None, seq_len=seq_len)

    def _norm(self, x, weight, bias=None):
        c, B = self.config, self.backend
        if c.norm == "layernorm":
            return B.layer_norm(x=x, weight=weight, bias=bias, eps=c.norm_eps)
        return B.rms_norm(x=x, weight=weight, eps=c.norm_eps, offset=c.norm_offset)

    def _block(self, i: int, L: LayerWeights, x, pos, rope, slopes, cache, rec):
        """One transformer block; pre-norm ``x + f(norm(x))`` or post-norm ``norm(x + f(x))``."""
        pre = self.config.block_order == "pre"
        h = self._norm(x, L.attn_norm, L.attn_norm_bias) if pre else x                # [T,D]
        rec(f"layer{i}.attn_norm", h)
        a = self._attention(i, L, h, pos, rope, slopes, cache, rec)                  # [T,D]
        rec(f"layer{i}.attn_out", a)
        x = x + a if pre else self._norm(x + a, L.attn_norm, L.attn_norm_bias)      # [T,D]
        rec(f"layer{i}.resid_attn", x)
        h = self._norm(x, L.mlp_norm, L.mlp_norm_bias) if pre else x                 # [T,D]
        rec(f"layer{i}.mlp_norm", h)
        m = self._mlp(i, L, h, rec)                                                  # [T,D]
        rec(f"layer{i}.mlp_out", m)
        x = x + m if pre else self._norm(x + m, L.mlp_norm, L.mlp_norm_bias)        # [T,D]
        rec(f"layer{i}.out", x)
        return x

    def _attention(self, i: int, L: LayerWeights, h, pos, rope, slopes, cache, rec):
        c, B = self.config, self.backend
        T, H, G, Dh = h.shape[0], c.num_heads, c.num_kv_heads, c.head_dim
        if L.wqkv is not None:      # fused at load time (gptevo.prepare): one matrix call
            qkv = B.linear(x=h, weight=L.wqkv, bias=L.bqkv)                           # [T,(H+2G)*Dh]
            q = qkv[:, :H * Dh].reshape(T, H, Dh)                                      # [T,H,Dh]
            k = qkv[:, H * Dh:(H + G) * Dh].reshape(T, G, Dh)                          # [T,G,Dh]
            v = qkv[:, (H + G) * Dh:].reshape(T, G, Dh)                                # [T,G,Dh]
        else:
            q = B.linear(x=h, weight=L.wq, bias=L.bq).reshape(T, H, Dh)               # [T,H,Dh]
            k = B.linear(x=h, weight=L.wk, bias=L.bk).reshape(T, G, Dh)               # [T,G,Dh]
            v = B.linear(x=h, weight=L.wv, bias=L.bv).reshape(T, G, Dh)               # [T,G,Dh]
        if c.qk_norm:   # Qwen3: RMSNorm over each head's Dh, before RoPE
            q = self._norm(q, L.q_norm)                                                # [T,H,Dh]
            k = self._norm(k, L.k_norm)                                                # [T,G,Dh]
        rec(f"layer{i}.q", q)
        rec(f"layer{i}.k", k)
        rec(f"layer{i}.v", v)
        if rope is not None:
            cos, sin = rope
            q = B.apply_rope(x=q, cos=cos, sin=sin, interleaved=c.rope_interleaved)   # [T,H,Dh]
            k = B.apply_rope(x=k, cos=cos, sin=sin, interleaved=c.rope_interleaved)   # [T,G,Dh]
            rec(f"layer{i}.q_rope", q)
            rec(f"layer{i}.k_rope", k)
        scale = c.attn_scale if c.attn_scale is not None else 1.0 / math.sqrt(Dh)
        if getattr(c, "attn_scale_inverse_layer", False):
            scale = scale / (i + 1)                                                    # GPT-2 option
        if isinstance(cache, list):   # a batched step: row b is sequence b, attending to its own cache
            o = self._attention_rows(i, L, q, k, v, pos, cache, scale, slopes)          # [B,H,Dh]
            rec(f"layer{i}.attn", o)
            return B.linear(x=o.reshape(T, H * Dh), weight=L.wo, bias=L.bo)           # [B,D]
        if cache is not None:
            k_all, v_all, k_pos = cache.view(i, k, v, pos)                            # [S,G,Dh], [S]
        else:
            k_all, v_all, k_pos = k, v, pos
        o = B.attention(q=q, k=k_all, v=v_all, q_positions=pos, k_positions=k_pos,
                        window=c.window_for_layer(i), sinks=L.sinks, scale=scale,
                        alibi_slopes=slopes)                                           # [T,H,Dh]
        if cache is not None:
            cache.commit(i, k, v, pos)
        rec(f"layer{i}.attn", o)
        return B.linear(x=o.reshape(T, H * Dh), weight=L.wo, bias=L.bo)               # [T,D]

    def _attention_rows(self, i: int, L: LayerWeights, q, k, v, pos, caches, scale, slopes):
        """Attention of a batched step: query row b ``[1,H,Dh]`` against ``caches[b]`` plus its new key."""
        c, B = self.config, self.backend
        out = None
        for b, cache in enumerate(caches):
            rows = slice(b, b + 1)
            k_all, v_all, k_pos = cache.append_one(i, k[rows], v[rows])               # [S,G,Dh], [S]
            o = B.attention(q=q[rows], k=k_all, v=v_all, q_positions=pos[rows], k_positions=k_pos,
                            window=c.window_for_layer(i), sinks=L.sinks, scale=scale,
                            alibi_slopes=slopes)                                       # [1,H,Dh]
            if out is None:
                out = np.empty((len(caches),) + o.shape[1:], o.dtype)                  # [B,H,Dh]
            out[b] = o[0]
        return out

    def _mlp(self, i: int, L: LayerWeights, h, rec):
        c, B = self.config, self.backend
        kind = mlp_kind(c, i)
        if kind == "moe":
            logits = B.linear(x=h, weight=L.router, bias=L.router_bias)               # [T,E]
            rec(f"layer{i}.router_logits", logits)
            weights, ids = B.moe_route(logits=logits, k=c.experts_per_token, order=c.router_order,
                                       renormalize=c.norm_topk_prob)                   # [T,k], [T,k]
            return B.moe_experts(x=h, weights=weights, ids=ids, w_gate_up=L.experts_gate_up,
                                 b_gate_up=L.experts_gate_up_bias, w_down=L.experts_down,
                                 b_down=L.experts_down_bias, activation=c.expert_activation,
                                 alpha=c.swiglu_alpha, limit=c.swiglu_limit)            # [T,D]
        if kind == "gelu":
            return B.gelu_mlp(x=h, w_fc=L.w_fc, b_fc=L.b_fc, w_proj=L.w_proj, b_proj=L.b_proj,
                              approximate=gelu_approximate(c))                         # [T,D]
        if c.activation == "silu" and L.w_gate_up is not None:   # fused gate|up: one matrix call
            gate_up = B.linear(x=h, weight=L.w_gate_up, bias=L.b_gate_up)             # [T,2I]
            n = gate_up.shape[1] // 2
            act = B.swiglu(gate=gate_up[:, :n], up=gate_up[:, n:])                    # [T,I]
            return B.linear(x=act, weight=L.w_down, bias=L.b_down)                    # [T,D]
        if c.activation == "silu":
            return B.swiglu_mlp(x=h, w_gate=L.w_gate, w_up=L.w_up, w_down=L.w_down,
                                b_gate=L.b_gate, b_up=L.b_up, b_down=L.b_down)         # [T,D]
        if L.w_gate_up is not None:  # fused at load time (gptevo.prepare): one matrix call
            gate_up = B.linear(x=h, weight=L.w_gate_up, bias=L.b_gate_up)             # [T,2I]
            gate, up = gate_up[:, :gate_up.shape[1] // 2], gate_up[:, gate_up.shape[1] // 2:]
        else:
            gate = B.linear(x=h, weight=L.w_gate, bias=L.b_gate)                      # [T,I]
            up = B.linear(x=h, weight=L.w_up, bias=L.b_up)                            # [T,I]
        act = B.gelu(x=gate, approximate=gelu_approximate(c))                         # [T,I] Gemma GeGLU
        return B.linear(x=act * up, weight=L.w_down, bias=L.b_down)                   # [T,D]
