"""The cupy backend's ops: NumPy in, kernels on the device, NumPy out.

:class:`CudaOps` holds a :class:`~gptevo.backends.cupy._runtime.Runtime` (CuPy on a GPU, or the
CPU emulator in the tests) and implements every backend op with the reference's keyword
signature and output dtype. Argument checking reuses the reference's own validators where it has
them, so errors read the same; every shape an index in a kernel depends on is checked before a
launch (a kernel never reads out of bounds).

Kernel ops (kernels/*.cu): embedding, learned_positions, rms_norm, layer_norm, silu, gelu, swiglu,
clamped_swiglu, linear, gelu_mlp, swiglu_mlp (linear + activation kernels, device-resident in
between), mxfp4_decode, softmax, apply_rope, attention, moe_experts, moe_combine.
Host ops (the NumPy reference, unchanged: small [T]- or [T,E]-sized work, or work whose contract is
NumPy's generator): sinusoidal_positions, alibi_slopes, alibi_bias, attention_mask,
rope_cos_sin, moe_route, dropout.

Compute dtypes: float32 or float64 (from the reference's ``compute_dtype`` rules); every kernel
exists in both. Big weights (linear, experts, embedding tables) stay in their stored dtype on the
device (f32, f64, f16 and bf16 as raw 16-bit words, MXFP4 packed) and are widened or decoded in
registers; small vectors (norm weights, biases, sinks, ALiBi slopes, cos/sin) are widened on the
host. Other weight objects with ``decode(dtype)`` are decoded on the host.
"""
from __future__ import annotations

import math
from numbers import Real

import ml_dtypes
import numpy as np

from gptevo.errors import RequestError
from gptevo.ops import activations as ref_act
from gptevo.ops import dropout as ref_dropout
from gptevo.ops import embedding as ref_embedding
from gptevo.ops import masks as ref_masks
from gptevo.ops import attention as ref_attention
from gptevo.ops import moe as ref_moe
from gptevo.ops import mxfp4 as ref_mxfp4
from gptevo.ops import norms as ref_norms
from gptevo.ops import rope as ref_rope
from gptevo.ops.spec import compute_dtype, widen

SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
WEIGHT_KIND = {np.dtype(np.float32): "f32w", np.dtype(np.float64): "f64w", np.dtype(np.float16): "f16w",
               np.dtype(ml_dtypes.bfloat16): "bf16w"}
RAW_VIEW = {"f32w": np.float32, "f64w": np.float64, "f16w": np.uint16, "bf16w": np.uint16}
LINEAR_ROWS_PER_BLOCK = 4        # warps per block in grouped_linear (one output row each)
LINEAR_TOK = 4                   # pairs per warp (LIN_TOK in linear.cu)
MAX_GRID_Y = 65535
MAX_INT32 = 2**31 - 1
SHARED_LIMIT = 48 * 1024


def _i32(value: int, what: str) -> np.int32:
    if value > MAX_INT32:
        raise RequestError(f"{what} = {value} exceeds the CUDA kernels' 32-bit limit ({MAX_INT32})")
    return np.int32(value)


def _check_alpha_limit(alpha, limit) -> None:
    for name, value in (("alpha", alpha), ("limit", limit)):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise RequestError(f"clamped_swiglu: {name} must be a finite real number; found {value!r}")


def _reduce_block(n: int) -> int:
    """Threads for a one-block-per-row reduction over n elements (a multiple of 32)."""
    return 32 if n <= 64 else 128 if n <= 2048 else 256


class CudaOps:
    """Every backend op, run on ``runtime`` (created lazily by ``make_runtime`` on first use)."""

    def __init__(self, runtime=None, make_runtime=None):
        self._runtime = runtime
        self._make_runtime = make_runtime
        self._index_arrays = {}          # (kind, n) -> device int64 [n]: 0..n-1 or zeros

    def _indices(self, kind: str, n: int):
        """Device int64 ``arange(n)`` ("arange") or ``zeros(n)`` ("zeros"), cached for n <= 65536."""
        key = (kind, n)
        dev = self._index_arrays.get(key)
        if dev is None:
            host = np.arange(n, dtype=np.int64) if kind == "arange" else np.zeros(n, dtype=np.int64)
            dev = self.rt.upload(host)
            if n <= 65536:
                self._index_arrays[key] = dev
        return dev

    @property
    def rt(self):
        if self._runtime is None:
            self._runtime = self._make_runtime()
        return self._runtime

    # ---- helpers ------------------------------------------------------------------------------
    def _grid(self, blocks: int) -> int:
        """Blocks for a grid-stride kernel: as many as wanted, capped by the runtime's max_blocks."""
        return max(1, min(blocks, self.rt.max_blocks))

    def _grid_1d(self, n: int, block: int) -> int:
        return self._grid(-(-n // block))

    def _vector(self, v, dt: np.dtype):
        """A small weight vector widened to dt on the host, cached on the device."""
        return self.rt.weight(v, dt.name, lambda a: widen(a, dt).astype(dt, copy=False))

    def _dense_or_packed(self, weight, dt: np.dtype):
        """(kind, device arrays, logical shape) of a linear/expert weight; kind as in linear.cu."""
        if isinstance(weight, ref_mxfp4.Mxfp4Weight):
            blocks = self.rt.weight(weight.blocks, "raw", np.asarray)
            scales = self.rt.weight(weight.scales, "raw", np.asarray)
            return "mxfp4", (blocks, scales), tuple(weight.shape)
        if isinstance(weight, np.ndarray) and weight.dtype in WEIGHT_KIND:
            kind = WEIGHT_KIND[weight.dtype]
            raw = RAW_VIEW[kind]
            dev = self.rt.weight(weight, f"raw:{np.dtype(raw).name}", lambda a: np.ascontiguousarray(a).view(raw))
            return kind, (dev,), tuple(weight.shape)
        w = np.asarray(widen(weight, dt)).astype(dt, copy=False)          # decode()-objects, other dtypes
        return WEIGHT_KIND[dt], (self.rt.upload(w),), tuple(w.shape)

    def _grouped_linear(self, x_dev, src, eid, weight, bias_dev, n_out: int, n_in: int, dt: np.dtype):
        """y[p] = W[eid[p]] @ x[src[p]] + b[eid[p]] on the device; returns y [P, n_out]."""
        kind, arrays = weight
        n_pairs = int(src.shape[0])
        y = self.rt.empty((n_pairs, n_out), dt)
        if n_pairs == 0 or n_out == 0:
            return y
        has_bias = bias_dev is not None
        b = bias_dev if has_bias else self.rt.empty((1,), dt)
        grid = (-(-n_out // LINEAR_ROWS_PER_BLOCK), min(-(-n_pairs // LINEAR_TOK), MAX_GRID_Y, self.rt.max_blocks))
        block = (32 * LINEAR_ROWS_PER_BLOCK,)
        name = f"grouped_linear_{SUFFIX[dt]}_{kind}"
        self.rt.launch("linear", name, grid, block,
                       (x_dev, src, eid, *arrays, b, np.int32(has_bias), y, _i32(n_pairs, "pairs"),
                        _i32(n_out, "output features"), _i32(n_in, "input features")))
        return y

    def _linear_dev(self, x_dev, weight, bias, dt: np.dtype, n_rows: int, n_in: int):
        """linear on a device [n_rows, n_in] input; returns device [n_rows, out]."""
        packed = self._dense_or_packed(weight, dt)
        shape = packed[2]
        if len(shape) != 2:
            raise RequestError(f"linear weight must be 2-D (out, in); found shape {shape}")
        if shape[1] != n_in:
            raise RequestError(f"linear: x has {n_in} input features but the weight expects {shape[1]} "
                               f"(weight shape {shape}, layout (out, in))")
        n_out = shape[0]
        b = None
        if bias is not None:
            if tuple(np.shape(bias)) != (n_out,):
                raise RequestError(f"linear: bias has shape {tuple(np.shape(bias))}, expected ({n_out},)")
            b = self._vector(bias, dt)
        src, eid = self._indices("arange", n_rows), self._indices("zeros", n_rows)
        return self._grouped_linear(x_dev, src, eid, packed[:2], b, n_out, n_in, dt)

    def _elementwise(self, name: str, dt: np.dtype, n: int, *args):
        block = 256
        self.rt.launch("activations", f"{name}_{SUFFIX[dt]}", (self._grid_1d(n, block),), (block,), args)

    def _glu_rows_dev(self, h_dev, rows: int, inter: int, kind: int, alpha: float, limit: float, dt):
        a = self.rt.empty((rows, inter), dt)
        if rows * inter:
            self._elementwise("glu_rows", dt, rows * inter, h_dev, a, np.int64(rows), _i32(inter, "I"),
                              np.int32(kind), dt.type(alpha), dt.type(limit))
        return a

    # ---- embeddings ---------------------------------------------------------------------------
    def embedding(self, table, ids):
        return self._lookup(table, ids, "ids", "the embedding table", "embedding table")

    def learned_positions(self, table, positions):
        return self._lookup(table, positions, "positions",
                            "the learned position table (max_position_embeddings)", "position table")

    def _lookup(self, table, ids, what, table_name, table_what):
        table = ref_embedding._check_table(table, table_what)
        ids = ref_embedding._check_index(ids, table.shape[0], what, table_name)
        dt = compute_dtype(table)
        d = table.shape[1]
        kernels = {np.dtype(np.float32): ("embedding_u32", np.uint32, np.uint32),
                   np.dtype(np.float64): ("embedding_u64", np.uint64, np.uint64),
                   np.dtype(ml_dtypes.bfloat16): ("embedding_bf16", np.uint16, np.uint32),
                   np.dtype(np.float16): ("embedding_f16", np.uint16, np.uint32)}
        if table.dtype not in kernels or ids.size == 0 or d == 0:
            return table[ids].astype(dt)                                         # [T,D] on the host
        name, raw, out_bits = kernels[table.dtype]
        tab = self.rt.weight(table, f"raw:{np.dtype(raw).name}", lambda a: np.ascontiguousarray(a).view(raw))
        flat = self.rt.upload(ids.reshape(-1).astype(np.int64))
        out = self.rt.empty((ids.size, d), out_bits)
        n = ids.size * d
        self.rt.launch("embedding", name, (self._grid_1d(n, 256),), (256,),
                       (tab, flat, out, np.int64(ids.size), _i32(d, "D")))
        return self.rt.to_host(out).view(dt).reshape(*ids.shape, d)            # [T,D]

    # ---- norms --------------------------------------------------------------------------------
    def rms_norm(self, x, weight, eps, offset=0.0):
        x = ref_norms._check_x(x)                                               # [...,D] compute dtype
        eps = ref_norms._check_eps(eps)
        offset = ref_norms._check_real(offset, "offset")
        d = x.shape[-1]
        ref_norms._check_vector(weight, d, "weight", x.dtype)
        dt = x.dtype
        rows = x.size // d
        y = self.rt.empty(x.shape, dt)
        if rows:
            self.rt.launch("norms", f"rms_norm_{SUFFIX[dt]}", (self._grid(rows),), (_reduce_block(d),),
                           (self.rt.upload(x), self._vector(weight, dt), y, _i32(rows, "rows"), _i32(d, "D"),
                            dt.type(eps), dt.type(offset)))
        return self.rt.to_host(y)

    def layer_norm(self, x, weight, bias, eps):
        x = ref_norms._check_x(x)
        d = x.shape[-1]
        eps = ref_norms._check_eps(eps)
        ref_norms._check_vector(weight, d, "weight", x.dtype)
        if bias is not None:
            ref_norms._check_vector(bias, d, "bias", x.dtype)
        dt = x.dtype
        rows = x.size // d
        y = self.rt.empty(x.shape, dt)
        if rows:
            w = self._vector(weight, dt)
            b = self._vector(bias, dt) if bias is not None else w
            self.rt.launch("norms", f"layer_norm_{SUFFIX[dt]}", (self._grid(rows),), (_reduce_block(d),),
                           (self.rt.upload(x), w, b, np.int32(bias is not None), y, _i32(rows, "rows"),
                            _i32(d, "D"), dt.type(eps)))
        return self.rt.to_host(y)

    # ---- activations --------------------------------------------------------------------------
    def silu(self, x):
        dt = ref_act._compute_dtype(x)
        x = ref_act._as(x, dt)
        return self._unary("silu", x, dt)

    def gelu(self, x, approximate="none"):
        if approximate not in ("none", "tanh"):
            raise RequestError(f'approximate must be "none" or "tanh"; found {approximate!r}')
        dt = ref_act._compute_dtype(x)
        x = ref_act._as(x, dt)
        return self._unary("gelu", x, dt, np.int32(approximate == "tanh"))

    def _unary(self, name, x, dt, *extra):
        y = self.rt.empty(x.shape, dt)
        if x.size:
            self._elementwise(name, dt, x.size, self.rt.upload(x), y, np.int64(x.size), *extra)
        return self.rt.to_host(y)

    def swiglu(self, gate, up):
        gate_arr, up_arr = np.asarray(gate), np.asarray(up)
        if gate_arr.shape != up_arr.shape:
            raise RequestError(f"swiglu: gate has shape {gate_arr.shape} but up has shape {up_arr.shape}; "
                               f"they must match")
        dt = ref_act._compute_dtype(gate_arr, up_arr)
        g, u = ref_act._as(gate_arr, dt), ref_act._as(up_arr, dt)
        y = self.rt.empty(g.shape, dt)
        if g.size:
            self._elementwise("swiglu", dt, g.size, self.rt.upload(g), self.rt.upload(u), y, np.int64(g.size))
        return self.rt.to_host(y)

    def clamped_swiglu(self, h, alpha=1.702, limit=7.0):
        _check_alpha_limit(alpha, limit)
        h_arr = np.asarray(h)
        if h_arr.ndim < 1 or h_arr.shape[-1] % 2:
            raise RequestError(f"clamped_swiglu: h must have an even last axis [..., 2I] (gate and linear "
                               f"columns interleaved); found shape {h_arr.shape}")
        dt = ref_act._compute_dtype(h_arr)
        h_arr = ref_act._as(h_arr, dt)
        inter = h_arr.shape[-1] // 2
        rows = h_arr.size // h_arr.shape[-1] if h_arr.shape[-1] else 0
        out_shape = (*h_arr.shape[:-1], inter)
        if rows == 0 or inter == 0:
            return np.zeros(out_shape, dt)
        a = self._glu_rows_dev(self.rt.upload(h_arr), rows, inter, 1, alpha, limit, dt)
        return self.rt.to_host(a).reshape(out_shape)

    # ---- linear and MLPs ----------------------------------------------------------------------
    def linear(self, x, weight, bias=None):
        x = np.asarray(x)
        if x.ndim < 1:
            raise RequestError("linear: x must have a last axis [..., in]; found a scalar")
        dt = compute_dtype(x)
        n_in = x.shape[-1]
        x2 = x.reshape(-1, n_in).astype(dt, copy=False)                         # [P,in]
        y = self._linear_dev(self.rt.upload(x2), weight, bias, dt, x2.shape[0], n_in)
        return self.rt.to_host(y).reshape(*x.shape[:-1], y.shape[1])            # [...,out]

    def gelu_mlp(self, x, w_fc, b_fc, w_proj, b_proj, approximate):
        if approximate not in ("none", "tanh"):
            raise RequestError(f'approximate must be "none" or "tanh"; found {approximate!r}')
        x = np.asarray(x)
        if x.ndim < 1:
            raise RequestError("linear: x must have a last axis [..., in]; found a scalar")
        dt = compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1]).astype(dt, copy=False)                  # [T,D]
        rows = x2.shape[0]
        h = self._linear_dev(self.rt.upload(x2), w_fc, b_fc, dt, rows, x2.shape[1])   # [T,I]
        inter = h.shape[1]
        a = self.rt.empty((rows, inter), dt)
        if rows * inter:
            self._elementwise("gelu", dt, rows * inter, h, a, np.int64(rows * inter),
                              np.int32(approximate == "tanh"))
        y = self._linear_dev(a, w_proj, b_proj, dt, rows, inter)                 # [T,D]
        return self.rt.to_host(y).reshape(*x.shape[:-1], y.shape[1])

    def swiglu_mlp(self, x, w_gate, w_up, w_down, b_gate=None, b_up=None, b_down=None):
        x = np.asarray(x)
        if x.ndim < 1:
            raise RequestError("linear: x must have a last axis [..., in]; found a scalar")
        dt = compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1]).astype(dt, copy=False)                  # [T,D]
        rows = x2.shape[0]
        x_dev = self.rt.upload(x2)
        gate = self._linear_dev(x_dev, w_gate, b_gate, dt, rows, x2.shape[1])   # [T,I]
        up = self._linear_dev(x_dev, w_up, b_up, dt, rows, x2.shape[1])         # [T,I]
        if gate.shape != up.shape:
            raise RequestError(f"swiglu: gate has shape {gate.shape} but up has shape {up.shape}; they must match")
        a = self.rt.empty(gate.shape, dt)
        if gate.size:
            self._elementwise("swiglu", dt, gate.size, gate, up, a, np.int64(gate.size))
        y = self._linear_dev(a, w_down, b_down, dt, rows, gate.shape[1])         # [T,D]
        return self.rt.to_host(y).reshape(*x.shape[:-1], y.shape[1])

    # ---- MXFP4 --------------------------------------------------------------------------------
    def mxfp4_decode(self, blocks, scales, dtype="float32"):
        ref_mxfp4._check_packed(blocks, scales, "mxfp4_decode")
        dt = ref_mxfp4._decode_dtype(dtype)
        out_shape = (*scales.shape[:-1], scales.shape[-1] * ref_mxfp4.BLOCK_SIZE)
        n_groups = scales.size
        if n_groups == 0:
            return np.zeros(out_shape, dt)
        bits = np.uint32 if dt == np.float32 else np.uint64
        out = self.rt.empty((n_groups * 32,), bits)
        b = self.rt.weight(blocks, "raw", np.asarray)
        s = self.rt.weight(scales, "raw", np.asarray)
        self.rt.launch("mxfp4", f"mxfp4_decode_{SUFFIX[dt]}", (self._grid_1d(n_groups * 16, 256),), (256,),
                       (b, s, out, np.int64(n_groups)))
        return self.rt.to_host(out).view(dt).reshape(out_shape)

    # ---- softmax, RoPE, attention --------------------------------------------------------------
    def softmax(self, x, sinks=None):
        x = np.asarray(x)
        dt = compute_dtype(x)
        if x.ndim == 0:
            raise RequestError("softmax: x must have at least one axis (the axis normalised over)")
        x = x.astype(dt, copy=False)
        sink = None
        if sinks is not None:
            try:
                sink = np.broadcast_to(np.asarray(sinks).astype(dt), x.shape[:-1])         # [...]
            except ValueError:
                raise RequestError(f"softmax: sinks of shape {np.shape(sinks)} do not broadcast to the rows "
                                   f"of x, shape {x.shape[:-1]}") from None
        s = x.shape[-1]
        rows = x.size // s if s else 0
        if rows == 0:
            return np.zeros(x.shape, dt)
        y = self.rt.empty(x.shape, dt)
        x_dev = self.rt.upload(x)
        sink_dev = self.rt.upload(sink) if sink is not None else x_dev
        self.rt.launch("softmax", f"softmax_{SUFFIX[dt]}", (self._grid(rows),), (_reduce_block(s),),
                       (x_dev, sink_dev, np.int32(sink is not None), y, _i32(rows, "rows"), _i32(s, "S")))
        return self.rt.to_host(y)

    def apply_rope(self, x, cos, sin, interleaved=False):
        x, cos, sin = ref_rope.check_apply_rope_args(x, cos, sin)
        dt = compute_dtype(x)
        t, h, dh = x.shape
        half = cos.shape[1]
        x = x.astype(dt, copy=False)
        if x.size == 0:
            return x.copy()
        y = self.rt.empty(x.shape, dt)
        c_dev = self.rt.upload(cos.astype(dt)) if cos.size else self.rt.empty((1,), dt)
        s_dev = self.rt.upload(sin.astype(dt)) if sin.size else self.rt.empty((1,), dt)
        self.rt.launch("rope", f"apply_rope_{SUFFIX[dt]}", (self._grid_1d(x.size, 256),), (256,),
                       (self.rt.upload(x), c_dev, s_dev, y, _i32(t, "T"), _i32(h, "H"), _i32(dh, "Dh"),
                        np.int32(half), np.int32(bool(interleaved))))
        return self.rt.to_host(y)

    def attention(self, q, k, v, q_positions=None, k_positions=None, window=None, sinks=None, scale=None,
                  alibi_slopes=None):
        q, k, v, qpos, kpos, window, scale = ref_attention.check_attention_args(
            q, k, v, q_positions, k_positions, window, sinks, alibi_slopes, scale)
        t, h, dh = q.shape
        s, g, _ = k.shape
        dv = v.shape[2]
        dt = compute_dtype(q)
        for what, pos in (("q_positions", qpos), ("k_positions", kpos)):
            if pos.dtype.kind not in "iu":
                raise RequestError(f"attention_mask: {what} must be a 1-D integer array, got shape {pos.shape} "
                                   f"dtype {pos.dtype}")
        out = self.rt.empty((t, h, dv), dt)
        if t * h == 0 or dv == 0:
            return np.zeros((t, h, dv), dt)
        nwarps = 4
        itemsize = dt.itemsize
        while nwarps > 1 and (dh + nwarps * (dv + 2)) * itemsize > SHARED_LIMIT:
            nwarps //= 2
        shared = (dh + nwarps * (dv + 2)) * itemsize
        if shared > SHARED_LIMIT:
            raise RequestError(f"attention: head dims Dh={dh}, Dv={dv} need {shared} bytes of shared memory, "
                               f"more than the kernel's {SHARED_LIMIT}")
        up = self.rt.upload
        q_dev = up(q.astype(dt, copy=False))
        k_dev = up(k.astype(dt, copy=False)) if k.size else self.rt.empty((1,), dt)
        v_dev = up(v.astype(dt, copy=False)) if v.size else self.rt.empty((1,), dt)
        kpos_dev = up(kpos.astype(np.int64)) if s else self.rt.empty((1,), np.int64)
        sinks_dev = up(np.asarray(sinks).astype(dt)) if sinks is not None else q_dev
        slopes_dev = up(np.asarray(alibi_slopes).astype(dt)) if alibi_slopes is not None else q_dev
        self.rt.launch("attention", f"attention_{SUFFIX[dt]}", (self._grid(t * h),), (32 * nwarps,),
                       (q_dev, k_dev, v_dev, up(qpos.astype(np.int64)), kpos_dev, sinks_dev,
                        np.int32(sinks is not None), slopes_dev, np.int32(alibi_slopes is not None), out,
                        _i32(t, "T"), _i32(h, "H"), _i32(g, "G"), _i32(s, "S"), _i32(dh, "Dh"), _i32(dv, "Dv"),
                        np.int64(window or 0), dt.type(scale)), shared_mem=shared)
        return self.rt.to_host(out)

    # ---- MoE ----------------------------------------------------------------------------------
    def moe_combine(self, expert_out, weights):
        expert_out = np.asarray(expert_out)
        weights = np.asarray(weights)
        if expert_out.ndim != 3 or weights.shape != expert_out.shape[:2]:
            raise RequestError(f"moe_combine: expected expert_out [T,k,D] and weights [T,k], got "
                               f"{list(expert_out.shape)} and {list(weights.shape)}")
        dt = compute_dtype(expert_out)
        y = self.rt.upload(widen(expert_out, dt))
        return self.rt.to_host(self._combine_dev(y, weights, dt, *expert_out.shape))

    def _combine_dev(self, y_dev, weights, dt, t, k, d):
        out = self.rt.empty((t, d), dt)
        if t * d == 0:
            return out
        if k == 0:
            out[...] = 0
            return out
        w = self.rt.upload(widen(weights, dt))
        self.rt.launch("moe", f"moe_combine_{SUFFIX[dt]}", (self._grid_1d(t * d, 256),), (256,),
                       (y_dev, w, out, np.int64(t), _i32(k, "k"), _i32(d, "D")))
        return out

    def moe_experts(self, x, weights, ids, w_gate_up, b_gate_up, w_down, b_down, activation="swiglu",
                    alpha=1.702, limit=7.0):
        x, weights, ids, n_experts, two_i, d = ref_moe.check_moe_experts_args(
            x, weights, ids, w_gate_up, b_gate_up, w_down, b_down, activation)
        if activation == "clamped_swiglu":
            _check_alpha_limit(alpha, limit)
        dt = compute_dtype(x)
        t, k = ids.shape
        inter = two_i // 2
        if t * d == 0:
            return np.zeros((t, d), dt)
        n_pairs = t * k
        eid = self.rt.upload(ids.reshape(-1).astype(np.int64))                    # [P] expert of each pair
        src = self.rt.upload(np.repeat(np.arange(t, dtype=np.int64), k))          # [P] token of each pair
        pairs = self._indices("arange", n_pairs)                                  # [P]
        gate_up = self._dense_or_packed(w_gate_up, dt)
        down = self._dense_or_packed(w_down, dt)
        b_gu = self._vector(b_gate_up, dt) if b_gate_up is not None else None
        b_d = self._vector(b_down, dt) if b_down is not None else None
        x_dev = self.rt.upload(x.astype(dt, copy=False))                          # [T,D]
        h = self._grouped_linear(x_dev, src, eid, gate_up[:2], b_gu, two_i, d, dt)     # [P,2I]
        kind = 0 if activation == "swiglu" else 1
        a = self._glu_rows_dev(h, n_pairs, inter, kind, alpha, limit, dt)        # [P,I]
        y = self._grouped_linear(a, pairs, eid, down[:2], b_d, d, inter, dt)     # [P,D] bias before weighting
        return self.rt.to_host(self._combine_dev(y, weights, dt, t, k, d))      # [T,D]


# Host ops: the NumPy reference itself (see the module docstring).
HOST_OPS = {
    "sinusoidal_positions": ref_embedding.sinusoidal_positions,
    "alibi_slopes": ref_embedding.alibi_slopes,
    "alibi_bias": ref_embedding.alibi_bias,
    "attention_mask": ref_masks.attention_mask,
    "rope_cos_sin": ref_rope.rope_cos_sin,
    "moe_route": ref_moe.moe_route,
    "dropout": ref_dropout.dropout,
}
KERNEL_OPS = ("embedding", "learned_positions", "rms_norm", "layer_norm", "silu", "gelu", "swiglu",
              "clamped_swiglu", "linear", "gelu_mlp", "swiglu_mlp", "mxfp4_decode", "softmax", "apply_rope",
              "attention", "moe_experts", "moe_combine")

def make_ops(runtime=None, make_runtime=None) -> dict:
    """The OPS mapping: kernel ops bound to a CudaOps on ``runtime`` plus the host ops."""
    impl = CudaOps(runtime, make_runtime)
    ops = {name: getattr(impl, name) for name in KERNEL_OPS}
    ops.update(HOST_OPS)
    return ops
