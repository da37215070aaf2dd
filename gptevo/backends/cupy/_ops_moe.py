"""The cupy backend's MoE ops (``moe_route``, ``moe_combine``, ``moe_experts``) as a mixin of
:class:`~gptevo.backends.cupy._ops.CudaOps`: the same contract as the module doc there (host in, host
out; device in, device out). Decode-sized calls run the grouped linear kernels per (token, slot)
pair; prefill-sized ones one cuBLAS GEMM pair per used expert (``_moe_gemm``)."""
from __future__ import annotations

import numpy as np

from gptevo.backends.cupy._ops_common import MAX_ROUTE_K, REFERENCE, SUFFIX, _i32
from gptevo.errors import RequestError
from gptevo.ops.spec import compute_dtype, widen


class MoeOps:
    """Needs the host/device plumbing of CudaOps (``rt``, ``_act``, ``_dev``, ``_out``, ``_grid``, ...)."""

    def _expert_dev(self, packed, e: int, dt):
        """Expert ``e`` of an expert weight [E, out, in] as a dense device matrix [out, in] in dt."""
        kind, arrays, shape = packed
        if kind != "mxfp4":
            return self._widen_dev(kind, arrays[0][e], dt)
        blocks, scales = arrays[0][e], arrays[1][e]
        n_groups = int(scales.size)
        bits = np.uint32 if dt == np.float32 else np.uint64
        out = self.rt.empty((n_groups * 32,), bits)
        self.rt.launch("mxfp4", f"mxfp4_decode_{SUFFIX[dt]}", (self._grid_1d(n_groups * 16, 256),), (256,),
                       (blocks, scales, out, np.int64(n_groups)))
        return out.view(dt).reshape(shape[1], shape[2])

    def _moe_gemm(self, x_dev, eid, t, k, gate_up, down, b_gu, b_d, two_i, d, kind, alpha, limit, dt):
        """The expert projections of a prefill-sized chunk as one GEMM pair per used expert: the
        routing ids are read on the host (a prefill may synchronize; decode never comes here), the
        pairs sorted by expert, each expert's rows multiplied by its decoded weights (cuBLAS), and the
        results put back in pair order. Returns y [P, D] before the routing weights."""
        xp = self.rt.xp
        ids = self.rt.to_host(eid).astype(np.int64)                               # [P]
        order = np.argsort(ids, kind="stable")                                     # pairs by expert
        bounds = np.searchsorted(ids[order], np.arange(gate_up[2][0] + 1))         # [E+1]
        src_sorted = (order // k).astype(np.int64)                                 # token of each sorted pair
        order_dev, src_dev = self.rt.upload(order), self.rt.upload(src_sorted)
        xs = x_dev[src_dev]                                                        # [P, D] sorted by expert
        n_pairs = t * k
        h = self.rt.empty((n_pairs, two_i), dt)
        used = [e for e in range(len(bounds) - 1) if bounds[e + 1] > bounds[e]]
        for e in used:
            a, b = int(bounds[e]), int(bounds[e + 1])
            he = xp.matmul(xs[a:b], self._expert_dev(gate_up, e, dt).T)
            h[a:b] = he + b_gu[e][None, :] if b_gu is not None else he
        act = self._glu_rows_dev(h, n_pairs, two_i // 2, kind, alpha, limit, dt)  # [P, I]
        ys = self.rt.empty((n_pairs, d), dt)
        for e in used:
            a, b = int(bounds[e]), int(bounds[e + 1])
            ye = xp.matmul(act[a:b], self._expert_dev(down, e, dt).T)
            ys[a:b] = ye + b_d[e][None, :] if b_d is not None else ye
        y = self.rt.empty((n_pairs, d), dt)
        y[order_dev] = ys                                                          # back to pair order
        return y

    def moe_route(self, logits, k, order="softmax_topk", renormalize=False):
        """Host logits: the reference. Device logits: one warp per token picks the top k (ties to
        the lower expert id) and their weights, on the device."""
        if not self._dev(logits):
            return REFERENCE["moe_route"](logits, k, order, renormalize)
        t, n_experts = logits.shape
        if k > MAX_ROUTE_K:
            raise RequestError(f"moe_route: the device kernel picks at most {MAX_ROUTE_K} experts; k={k}")
        dt = compute_dtype(logits)
        weights = self.rt.empty((t, k), dt)
        ids = self.rt.empty((t, k), np.int64)
        if t:
            self.rt.launch("moe", f"moe_route_{SUFFIX[dt]}", (self._grid(t),), (32,),
                           (self._act(logits, dt), weights, ids, _i32(t, "T"), _i32(n_experts, "E"), np.int32(k),
                            np.int32(order == "softmax_topk"), np.int32(bool(renormalize))))
        return weights, ids

    def moe_combine(self, expert_out, weights):
        on_dev = self._dev(expert_out, weights)
        dt = compute_dtype(expert_out)
        y = self._act(expert_out, dt) if on_dev else self.rt.upload(widen(expert_out, dt))
        return self._out(self._combine_dev(y, weights, dt, *expert_out.shape), on_dev)

    def _combine_dev(self, y_dev, weights, dt, t, k, d):
        out = self.rt.empty((t, d), dt)
        if t * d == 0:
            return out
        if k == 0:
            out[...] = 0
            return out
        w = self._act(weights, dt) if self._dev(weights) else self.rt.upload(widen(weights, dt))
        self.rt.launch("moe", f"moe_combine_{SUFFIX[dt]}", (self._grid_1d(t * d, 256),), (256,),
                       (y_dev, w, out, np.int64(t), _i32(k, "k"), _i32(d, "D")))
        return out

    def moe_experts(self, x, weights, ids, w_gate_up, b_gate_up, w_down, b_down, activation="swiglu",
                    alpha=1.702, limit=7.0):
        on_dev = self._dev(x, weights, ids)
        n_experts, two_i, d = w_gate_up.shape
        dt = compute_dtype(x)
        t, k = ids.shape
        inter = two_i // 2
        if t * d == 0:
            return self.rt.xp.zeros((t, d), dt) if on_dev else np.zeros((t, d), dt)
        n_pairs = t * k
        eid = self._act(ids.reshape(-1), np.dtype(np.int64))                      # [P] expert of each pair
        src = self._indices("repeat", t, k)                                       # [P] token of each pair
        pairs = self._indices("arange", n_pairs)                                  # [P]
        gate_up = self._dense_or_packed(w_gate_up, dt)
        down = self._dense_or_packed(w_down, dt)
        b_gu = self._vector(b_gate_up, dt) if b_gate_up is not None else None
        b_d = self._vector(b_down, dt) if b_down is not None else None
        x_dev = self._act(x, dt)                                                  # [T,D]
        kind = 0 if activation == "swiglu" else 1
        if self._use_gemm(t):
            y = self._moe_gemm(x_dev, eid, t, k, gate_up, down, b_gu, b_d, two_i, d, kind, alpha, limit, dt)
            return self._out(self._combine_dev(y, weights, dt, t, k, d), on_dev)
        h = self._grouped_linear(x_dev, src, eid, gate_up[:2], b_gu, two_i, d, dt)     # [P,2I]
        a = self._glu_rows_dev(h, n_pairs, inter, kind, alpha, limit, dt)        # [P,I]
        y = self._grouped_linear(a, pairs, eid, down[:2], b_d, d, inter, dt)     # [P,D] bias before weighting
        return self._out(self._combine_dev(y, weights, dt, t, k, d), on_dev)     # [T,D]
