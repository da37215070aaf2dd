"""The cupy backend's ops: kernels on the device; NumPy in, NumPy out, or device in, device out.

:class:`CudaOps` (its MoE ops in ``_ops_moe.py``, constants shared with it in ``_ops_common.py``)
holds a :class:`~gptevo.backends.cupy._runtime.Runtime` (CuPy on a GPU, or the
CPU emulator in the tests) and implements every backend op with the reference's keyword
signature and output dtype. The kind of the activations decides the kind of the result: host
(NumPy) activations are uploaded and the result is downloaded (the conformance suite's calls);
device activations stay on the device and the result is a device array (the model's calls with
the backend's arrays, see :class:`~gptevo.backends.cupy._runtime.DeviceArrays`): no transfer and
no synchronization. Weights (NumPy arrays, MXFP4) are uploaded once, in their stored dtype, and
cached. Arguments arrive checked by the registry (each op's check in gptevo/ops/, which reads a
device array's shape and dtype only, never its values), so nothing here validates them; what
remains are this backend's own limits (32-bit kernel indices, shared memory, the route kernel's k).

Kernel ops (kernels/*.cu): embedding, learned_positions, rms_norm, layer_norm, silu, gelu, swiglu,
clamped_swiglu, linear, gelu_mlp, swiglu_mlp (linear + activation kernels, device-resident in
between), mxfp4_decode, softmax, apply_rope, attention (one block per (query, head), or split-K
over the keys with a merge for decode over long caches), moe_experts, moe_combine; rope_cos_sin
and moe_route run as kernels for device inputs and as the reference for host inputs.
sinusoidal_positions likewise (CuPy array functions). Host ops (the NumPy reference, unchanged:
constants, or work whose contract is NumPy's generator): alibi_slopes, alibi_bias, attention_mask, dropout.
Not an op: ``sample_token`` (sampling.cu), which gptevo.generation reaches through the arrays.

Compute dtypes: float32 or float64 (from the reference's ``compute_dtype`` rules); every kernel
exists in both. Big weights (linear, experts, embedding tables) stay in their stored dtype on the
device (f32, f64, f16 and bf16 as raw 16-bit words, MXFP4 packed) and are widened or decoded in
registers; small vectors (norm weights, biases, sinks, ALiBi slopes) are widened on the host once
and cached. Other weight objects with ``decode(dtype)`` are decoded on the host once and cached.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

from gptevo.backends.cupy._ops_common import (
    ATTN_MAX_DH, ATTN_MAX_GROUP, ATTN_MAX_SPLITS, ATTN_SPLIT_KEYS, ATTN_SPLIT_THREADS, LINEAR_ROWS_PER_BLOCK,
    LINEAR_TOK, MAX_GRID_Y, RAW_TAG, RAW_VIEW, REFERENCE, SAMPLE_THREADS, SHARED_LIMIT,
    SUFFIX, WEIGHT_KIND, _i32, _reduce_block,
)
from gptevo.backends.cupy._ops_moe import MoeOps
from gptevo.errors import RequestError
from gptevo.ops import mxfp4 as ref_mxfp4
from gptevo.ops.spec import compute_dtype, widen


class CudaOps(MoeOps):
    """Every backend op, run on ``runtime`` (created lazily by ``make_runtime`` on first use).

    Inputs may be host (NumPy) or device arrays. The kind of the activations decides the kind of
    the result: NumPy in, NumPy out (each call uploads its activations and downloads its result,
    as the conformance suite calls it); device in, device out, with no host transfer and no
    synchronization (as the model calls it with backend-owned arrays). The methods take canonical
    arguments (checked by the registry); a device input's values are never read on the host.
    """

    def __init__(self, runtime=None, make_runtime=None):
        self._runtime = runtime
        self._make_runtime = make_runtime
        self._index_arrays = {}          # (kind, n) -> device int64 [n]: 0..n-1 or zeros
        self._consts = {}                # (tag, bytes) -> device copy of a small host constant

    def _indices(self, kind: str, n: int, k: int = 1):
        """Device int64 ``arange(n)`` ("arange"), ``zeros(n)`` ("zeros") or the token of each of the
        n*k (token, slot) pairs ("repeat"), cached for n <= 65536."""
        key = (kind, n, k)
        dev = self._index_arrays.get(key)
        if dev is None:
            if kind == "arange":
                host = np.arange(n, dtype=np.int64)
            elif kind == "repeat":
                host = np.repeat(np.arange(n, dtype=np.int64), k)
            else:
                host = np.zeros(n, dtype=np.int64)
            dev = self.rt.upload(host)
            if n <= 65536:
                self._index_arrays[key] = dev
        return dev

    def _const(self, host: np.ndarray, dt, tag: str = ""):
        """The device copy of a small host array, cached by value (for per-call constants such as
        RoPE frequencies or ALiBi slopes that arrive as fresh arrays on every call)."""
        host = np.ascontiguousarray(np.asarray(host).astype(dt, copy=False))
        key = (tag, host.dtype.str, host.shape, host.tobytes())
        dev = self._consts.get(key)
        if dev is None:
            dev = self.rt.upload(host)
            if host.nbytes <= 1 << 16 and len(self._consts) < 4096:
                self._consts[key] = dev
        return dev

    @property
    def rt(self):
        if self._runtime is None:
            self._runtime = self._make_runtime()
        return self._runtime

    # ---- host / device plumbing ---------------------------------------------------------------
    def _dev(self, *arrays) -> bool:
        """True when any of ``arrays`` is a device array (then results stay on the device)."""
        is_device = self.rt.is_device
        return any(a is not None and is_device(a) for a in arrays)

    def _act(self, x, dt):
        """An activation as a C-contiguous device array of dtype ``dt`` (uploaded when on the host)."""
        if self.rt.is_device(x):
            if x.dtype != dt:
                x = x.astype(dt)
            return self.rt.xp.ascontiguousarray(x)
        return self.rt.upload(np.asarray(x).astype(dt, copy=False))

    def _out(self, y, on_device: bool):
        return y if on_device else self.rt.to_host(y)

    def _per_head(self, v, dt, what: str):
        """A small per-head vector [H] (sinks, ALiBi slopes) on the device: a device array as given,
        or a host array's device copy cached by value (slopes arrive as a fresh array per call)."""
        if self.rt.is_device(v):
            return self.rt.xp.ascontiguousarray(v.astype(dt))
        return self._const(widen(v, dt), dt, what)

    # ---- helpers ------------------------------------------------------------------------------
    def _grid(self, blocks: int) -> int:
        """Blocks for a grid-stride kernel: as many as wanted, capped by the runtime's max_blocks."""
        return max(1, min(blocks, self.rt.max_blocks))

    def _grid_1d(self, n: int, block: int) -> int:
        return self._grid(-(-n // block))

    def _vector(self, v, dt: np.dtype):
        """A small weight vector widened to dt on the host, cached on the device."""
        return self.rt.weight(v, SUFFIX[dt], lambda a: widen(a, dt).astype(dt, copy=False))

    def _dense_or_packed(self, weight, dt: np.dtype):
        """(kind, device arrays, logical shape) of a linear/expert weight; kind as in linear.cu."""
        if isinstance(weight, ref_mxfp4.Mxfp4Weight):
            blocks = self.rt.weight(weight.blocks, "raw", np.asarray)
            scales = self.rt.weight(weight.scales, "raw", np.asarray)
            return "mxfp4", (blocks, scales), tuple(weight.shape)
        if isinstance(weight, np.ndarray) and weight.dtype in WEIGHT_KIND:
            kind = WEIGHT_KIND[weight.dtype]
            raw = RAW_VIEW[kind]
            dev = self.rt.weight(weight, RAW_TAG[kind], lambda a: np.ascontiguousarray(a).view(raw))
            return kind, (dev,), weight.shape
        if self.rt.is_device(weight):                                        # a device weight as given
            w = self.rt.xp.ascontiguousarray(weight.astype(dt))
            return WEIGHT_KIND[dt], (w,), tuple(w.shape)
        w = self.rt.weight(weight, f"widened:{dt.name}", lambda a: np.asarray(widen(a, dt)).astype(dt, copy=False))
        return WEIGHT_KIND[dt], (w,), tuple(w.shape)

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
        n_out = packed[2][0]
        b = None
        if bias is not None:
            b = self._vector(bias, dt) if not self.rt.is_device(bias) else self._act(bias, dt)
        if self._use_gemm(n_rows) and packed[0] != "mxfp4":       # prefill-sized: cuBLAS
            y = self.rt.xp.matmul(x_dev, self._widen_dev(packed[0], packed[1][0], dt).T)     # [rows, out]
            return y + b[None, :] if b is not None else y
        src, eid = self._indices("arange", n_rows), self._indices("zeros", n_rows)
        return self._grouped_linear(x_dev, src, eid, packed[:2], b, n_out, n_in, dt)

    # ---- prefill: cuBLAS GEMMs on weights widened on the device ----------------------------------
    def _use_gemm(self, rows: int) -> bool:
        """Use GEMMs (``xp.matmul``, cuBLAS on CuPy) for ``rows`` tokens: the runtime allows it
        (``gemm_min_rows``, None = never, as under the plain emulator) and there are enough rows."""
        m = getattr(self.rt, "gemm_min_rows", None)
        return m is not None and rows >= m

    def _widen_dev(self, kind: str, raw, dt):
        """A dense stored weight (raw device bits) widened to dt on the device (a temporary)."""
        if kind == "bf16w":
            return (raw.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(dt, copy=False)
        if kind == "f16w":
            return raw.view(np.float16).astype(dt)
        return raw.astype(dt, copy=False)


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
        return self._lookup(table, ids)

    def learned_positions(self, table, positions):
        return self._lookup(table, positions)

    def _lookup(self, table, ids):
        """Host ids were range-checked by the registry; device ids only on their dtype (no transfer):
        the kernel writes NaN for an id outside the table."""
        on_dev = self._dev(ids)
        dt = compute_dtype(table)
        d = table.shape[1]
        kernels = {np.dtype(np.float32): ("embedding_u32", np.uint32, np.uint32),
                   np.dtype(np.float64): ("embedding_u64", np.uint64, np.uint64),
                   np.dtype(ml_dtypes.bfloat16): ("embedding_bf16", np.uint16, np.uint32),
                   np.dtype(np.float16): ("embedding_f16", np.uint16, np.uint32)}
        if ids.size == 0 or d == 0:
            out = table[np.zeros(ids.shape, np.int64)][..., :0] if d == 0 else np.zeros((*ids.shape, d), dt)
            out = out.astype(dt)
            return self.rt.upload(out) if on_dev else out
        if table.dtype not in kernels:
            if not on_dev:
                return table[ids].astype(dt)                                     # [T,D] on the host
            tab = self.rt.weight(table, f"widened:{dt.name}", lambda a: np.asarray(widen(a, dt)).astype(dt))
            return tab[ids.reshape(-1)].reshape(*ids.shape, d)
        name, raw, out_bits = kernels[table.dtype]
        tab = self.rt.weight(table, f"raw:{np.dtype(raw).name}", lambda a: np.ascontiguousarray(a).view(raw))
        flat = self._act(ids.reshape(-1), np.dtype(np.int64))
        out = self.rt.empty((ids.size, d), out_bits)
        n = ids.size * d
        self.rt.launch("embedding", name, (self._grid_1d(n, 256),), (256,),
                       (tab, flat, out, np.int64(ids.size), _i32(d, "D"), np.int64(table.shape[0])))
        return self._out(out, on_dev).view(dt).reshape(*ids.shape, d)           # [T,D]

    def sinusoidal_positions(self, positions, dim, base=10000.0, dtype="float32"):
        """Host positions: the reference. Device positions: the same table made on the device."""
        if not self._dev(positions):
            return REFERENCE["sinusoidal_positions"](positions, dim, base, dtype)
        xp = self.rt.xp
        j = np.arange(dim)
        inv = self._const(base ** (-(2 * (j // 2)) / dim), np.float64, "sinusoidal")             # [dim]
        even = self._const(j % 2 == 0, np.bool_, "sinusoidal-even")                            # [dim]
        angles = positions.astype(np.float64)[:, None] * inv[None, :]                            # [T,dim]
        return xp.where(even[None, :], xp.sin(angles), xp.cos(angles)).astype(np.dtype(dtype))

    def kv_store(self, keys, values, positions, k_new, v_new, pos) -> None:
        """Write one new position into its slot ``pos[0] % slots`` of a device KV buffer (slot read on
        the device: no host value, the same launch for every step). keys/values [slots, G, Dh],
        positions [slots] int64; k_new/v_new [1, G, Dh] in the buffer's dtype; pos [1] int64."""
        slots = keys.shape[0]
        row = int(np.prod(keys.shape[1:]))
        bits = {4: np.uint32, 8: np.uint64}[keys.dtype.itemsize]
        xp = self.rt.xp
        k = xp.ascontiguousarray(k_new.astype(keys.dtype, copy=False))
        v = xp.ascontiguousarray(v_new.astype(keys.dtype, copy=False))
        self.rt.launch("embedding", f"kv_store_u{8 * keys.dtype.itemsize}", (self._grid_1d(row, 256),), (256,),
                       (keys.view(bits), values.view(bits), positions, k.view(bits), v.view(bits),
                        self._act(pos, np.dtype(np.int64)), np.int64(slots), _i32(row, "G*Dh")))

    # ---- norms --------------------------------------------------------------------------------
    def _norm_setup(self, x):
        """(on device, D, compute dtype, rows, the output buffer) of a norm over x's last axis."""
        d = x.shape[-1]
        dt = compute_dtype(x)
        return self._dev(x), d, dt, x.size // d, self.rt.empty(x.shape, dt)

    def rms_norm(self, x, weight, eps, offset=0.0):
        on_dev, d, dt, rows, y = self._norm_setup(x)
        if rows:
            w = self._act(weight, dt) if self._dev(weight) else self._vector(weight, dt)
            self.rt.launch("norms", f"rms_norm_{SUFFIX[dt]}", (self._grid(rows),), (_reduce_block(d),),
                           (self._act(x, dt), w, y, _i32(rows, "rows"), _i32(d, "D"),
                            dt.type(eps), dt.type(offset)))
        return self._out(y, on_dev)

    def layer_norm(self, x, weight, bias, eps):
        on_dev, d, dt, rows, y = self._norm_setup(x)
        if rows:
            w = self._vector(weight, dt)
            b = self._vector(bias, dt) if bias is not None else w
            self.rt.launch("norms", f"layer_norm_{SUFFIX[dt]}", (self._grid(rows),), (_reduce_block(d),),
                           (self._act(x, dt), w, b, np.int32(bias is not None), y, _i32(rows, "rows"),
                            _i32(d, "D"), dt.type(eps)))
        return self._out(y, on_dev)

    # ---- activations --------------------------------------------------------------------------
    def _act_in(self, *xs):
        """(the inputs, compute dtype, on device)."""
        return xs, compute_dtype(*xs), self._dev(*xs)

    def silu(self, x):
        (x,), dt, on_dev = self._act_in(x)
        return self._unary("silu", x, dt, on_dev)

    def gelu(self, x, approximate="none"):
        (x,), dt, on_dev = self._act_in(x)
        return self._unary("gelu", x, dt, on_dev, np.int32(approximate == "tanh"))

    def _unary(self, name, x, dt, on_dev, *extra):
        y = self.rt.empty(x.shape, dt)
        if x.size:
            self._elementwise(name, dt, x.size, self._act(x, dt), y, np.int64(x.size), *extra)
        return self._out(y, on_dev)

    def swiglu(self, gate, up):
        (g, u), dt, on_dev = self._act_in(gate, up)
        y = self.rt.empty(g.shape, dt)
        if g.size:
            self._elementwise("swiglu", dt, g.size, self._act(g, dt), self._act(u, dt), y, np.int64(g.size))
        return self._out(y, on_dev)

    def clamped_swiglu(self, h, alpha=1.702, limit=7.0):
        (h_arr,), dt, on_dev = self._act_in(h)
        inter = h_arr.shape[-1] // 2
        rows = h_arr.size // h_arr.shape[-1] if h_arr.shape[-1] else 0
        out_shape = (*h_arr.shape[:-1], inter)
        if rows == 0 or inter == 0:
            return self.rt.xp.zeros(out_shape, dt) if on_dev else np.zeros(out_shape, dt)
        a = self._glu_rows_dev(self._act(h_arr, dt), rows, inter, 1, alpha, limit, dt)
        return self._out(a, on_dev).reshape(out_shape)

    # ---- linear and MLPs ----------------------------------------------------------------------
    def _rows_in(self, x):
        """(x, compute dtype, on device) for the matrix ops."""
        return x, compute_dtype(x), self._dev(x)

    def linear(self, x, weight, bias=None):
        x, dt, on_dev = self._rows_in(x)
        n_in = x.shape[-1]
        rows = x.size // n_in if n_in else int(np.prod(x.shape[:-1]))
        y = self._linear_dev(self._act(x.reshape(rows, n_in), dt), weight, bias, dt, rows, n_in)
        return self._out(y, on_dev).reshape(*x.shape[:-1], y.shape[1])         # [...,out]

    def gelu_mlp(self, x, w_fc, b_fc, w_proj, b_proj, approximate):
        x, dt, on_dev = self._rows_in(x)
        n_in = x.shape[-1]
        rows = x.size // n_in if n_in else int(np.prod(x.shape[:-1]))
        h = self._linear_dev(self._act(x.reshape(rows, n_in), dt), w_fc, b_fc, dt, rows, n_in)   # [T,I]
        inter = h.shape[1]
        a = self.rt.empty((rows, inter), dt)
        if rows * inter:
            self._elementwise("gelu", dt, rows * inter, h, a, np.int64(rows * inter),
                              np.int32(approximate == "tanh"))
        y = self._linear_dev(a, w_proj, b_proj, dt, rows, inter)                 # [T,D]
        return self._out(y, on_dev).reshape(*x.shape[:-1], y.shape[1])

    def swiglu_mlp(self, x, w_gate, w_up, w_down, b_gate=None, b_up=None, b_down=None):
        x, dt, on_dev = self._rows_in(x)
        n_in = x.shape[-1]
        rows = x.size // n_in if n_in else int(np.prod(x.shape[:-1]))
        x_dev = self._act(x.reshape(rows, n_in), dt)
        gate = self._linear_dev(x_dev, w_gate, b_gate, dt, rows, n_in)          # [T,I]
        up = self._linear_dev(x_dev, w_up, b_up, dt, rows, n_in)                # [T,I]
        a = self.rt.empty(gate.shape, dt)
        if gate.size:
            self._elementwise("swiglu", dt, gate.size, gate, up, a, np.int64(gate.size))
        y = self._linear_dev(a, w_down, b_down, dt, rows, gate.shape[1])         # [T,D]
        return self._out(y, on_dev).reshape(*x.shape[:-1], y.shape[1])

    # ---- MXFP4 --------------------------------------------------------------------------------
    def mxfp4_decode(self, blocks, scales, dtype="float32"):
        dt = np.dtype(dtype)
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
        on_dev = self._dev(x)
        dt = compute_dtype(x)
        sink = None
        if sinks is not None:
            if self._dev(sinks):
                sink = self.rt.xp.ascontiguousarray(self.rt.xp.broadcast_to(sinks.astype(dt), x.shape[:-1]))
            else:
                sink = np.broadcast_to(sinks.astype(dt), x.shape[:-1])                       # [...]
        s = x.shape[-1]
        rows = x.size // s if s else 0
        if rows == 0:
            return self.rt.xp.zeros(x.shape, dt) if on_dev else np.zeros(x.shape, dt)
        y = self.rt.empty(x.shape, dt)
        x_dev = self._act(x, dt)
        sink_dev = self._act(sink, dt) if sink is not None else x_dev
        self.rt.launch("softmax", f"softmax_{SUFFIX[dt]}", (self._grid(rows),), (_reduce_block(s),),
                       (x_dev, sink_dev, np.int32(sink is not None), y, _i32(rows, "rows"), _i32(s, "S")))
        return self._out(y, on_dev)

    def rope_cos_sin(self, positions, inv_freq, attention_factor=1.0):
        """Host positions: the reference. Device positions: the same formula on the device (the
        angle is the float32 product, its cosine taken in float64 and rounded once)."""
        if not self._dev(positions):
            return REFERENCE["rope_cos_sin"](positions, inv_freq, attention_factor)
        inv = np.asarray(inv_freq)
        dt = compute_dtype(inv)
        t, half = positions.shape[0], inv.shape[0]
        cos = self.rt.empty((t, half), dt)
        sin = self.rt.empty((t, half), dt)
        if t * half:
            self.rt.launch("rope", f"rope_cos_sin_{SUFFIX[dt]}", (self._grid_1d(t * half, 256),), (256,),
                           (self._act(positions, np.dtype(np.int64)), self._const(inv, dt, "inv_freq"), cos, sin,
                            _i32(t, "T"), _i32(half, "R/2"), dt.type(attention_factor)))
        return cos, sin

    def apply_rope(self, x, cos, sin, interleaved=False):
        on_dev = self._dev(x, cos, sin)
        dt = compute_dtype(x)
        t, h, dh = x.shape
        half = cos.shape[1]
        if x.size == 0:
            return x.astype(dt) if on_dev else x.astype(dt, copy=False).copy()
        y = self.rt.empty(x.shape, dt)
        c_dev = self._act(cos, dt) if cos.size else self.rt.empty((1,), dt)
        s_dev = self._act(sin, dt) if sin.size else self.rt.empty((1,), dt)
        self.rt.launch("rope", f"apply_rope_{SUFFIX[dt]}", (self._grid_1d(x.size, 256),), (256,),
                       (self._act(x, dt), c_dev, s_dev, y, _i32(t, "T"), _i32(h, "H"), _i32(dh, "Dh"),
                        np.int32(half), np.int32(interleaved)))
        return self._out(y, on_dev)

    def attention(self, q, k, v, q_positions=None, k_positions=None, window=None, sinks=None, scale=None,
                  alibi_slopes=None):
        on_dev = self._dev(q, k, v, q_positions, k_positions)
        t, h, dh = q.shape
        s, g, _ = k.shape
        dv = v.shape[2]
        dt = compute_dtype(q)
        if t * h == 0 or dv == 0:
            return self.rt.xp.zeros((t, h, dv), dt) if on_dev else np.zeros((t, h, dv), dt)
        out = self.rt.empty((t, h, dv), dt)
        q_dev = self._act(q, dt)
        k_dev = self._act(k, dt) if k.size else self.rt.empty((1,), dt)
        v_dev = self._act(v, dt) if v.size else self.rt.empty((1,), dt)
        qpos_dev = self._positions(q_positions, on_dev)
        kpos_dev = self._positions(k_positions, on_dev) if s else self.rt.empty((1,), np.int64)
        sinks_dev = self._per_head(sinks, dt, "sinks") if sinks is not None else q_dev
        slopes_dev = self._per_head(alibi_slopes, dt, "alibi_slopes") if alibi_slopes is not None else q_dev
        args = (q_dev, k_dev, v_dev, qpos_dev, kpos_dev, sinks_dev, np.int32(sinks is not None), slopes_dev,
                np.int32(alibi_slopes is not None))
        shapes = (_i32(t, "T"), _i32(h, "H"), _i32(g, "G"), _i32(s, "S"), _i32(dh, "Dh"), _i32(dv, "Dv"),
                  np.int64(window or 0), dt.type(scale))
        group = h // g
        splits = self._decode_splits(t, g, s, group, dh, dv)
        if splits:
            self._attention_split(args, shapes, out, t, h, g, dh, dv, splits, dt)
            return self._out(out, on_dev)
        nwarps = 4
        itemsize = dt.itemsize
        while nwarps > 1 and (dh + nwarps * (dv + 2)) * itemsize > SHARED_LIMIT:
            nwarps //= 2
        shared = (dh + nwarps * (dv + 2)) * itemsize
        if shared > SHARED_LIMIT:
            raise RequestError(f"attention: head dims Dh={dh}, Dv={dv} need {shared} bytes of shared memory, "
                               f"more than the kernel's {SHARED_LIMIT}")
        self.rt.launch("attention", f"attention_{SUFFIX[dt]}", (self._grid(t * h),), (32 * nwarps,),
                       (*args, out, *shapes), shared_mem=shared)
        return self._out(out, on_dev)

    def _positions(self, pos, on_dev: bool):
        """Positions [n] as device int64: a device array as given; host positions uploaded, or, in a
        device call (the registry's default positions), their device copy cached by value."""
        i64 = np.dtype(np.int64)
        if self.rt.is_device(pos) or not on_dev:
            return self._act(pos, i64)
        return self._const(pos, i64, "positions")

    def _decode_splits(self, t, g, s, group, dh, dv) -> int:
        """Key splits for the split-K decode kernel (0 = use the one-block-per-(query, head) kernel).
        Used for few queries over many keys: one block per (query, KV head, split), every query head
        of the group in one block, so each key and value row is read once per split."""
        if t > 4 or s < 256 or group > ATTN_MAX_GROUP or dh > ATTN_MAX_DH or dv > ATTN_MAX_DH or dh % 4:
            return 0
        return max(1, min(-(-s // ATTN_SPLIT_KEYS), ATTN_MAX_SPLITS))

    def _attention_split(self, args, shapes, out, t, h, g, dh, dv, splits, dt):
        part_o = self.rt.empty((t, h, splits, dv), dt)
        part_ml = self.rt.empty((t, h, splits, 2), dt)
        self.rt.launch("attention", f"attention_split_{SUFFIX[dt]}", (t * g, splits), (ATTN_SPLIT_THREADS,),
                       (*args, part_o, part_ml, *shapes, np.int32(splits)))
        self.rt.launch("attention", f"attention_merge_{SUFFIX[dt]}", (self._grid(t * h),), (32,),
                       (part_o, part_ml, args[5], args[6], out, _i32(t * h, "T*H"), _i32(h, "H"), _i32(dv, "Dv"),
                        np.int32(splits)))

    # ---- sampling (not a registry op: gptevo.generation calls it through the backend's arrays) ------
    def sample_token(self, logits_row, temperature: float, top_k: int, top_p: float, u: float):
        """One token id from a device row of logits [V] (greedy when temperature is 0), drawn with
        the uniform ``u`` on the device. Returns the device int64 [2]: (token, index of the first
        non-finite logit or -1)."""
        v = int(logits_row.shape[-1])
        row = self._act(logits_row.reshape(v), np.dtype(np.float32))
        out = self.rt.empty((2,), np.int64)
        block = min(SAMPLE_THREADS, max(32, -(-v // 32) * 32))
        self.rt.launch("sampling", "sample_f32", (1,), (block,),
                       (row, _i32(v, "V"), np.float64(temperature), np.int32(top_k), np.float64(top_p),
                        np.float64(u), out), shared_mem=0)
        return out


# Host ops: the NumPy reference's bodies (see the module docstring; arguments checked by the registry).
HOST_OPS = {name: REFERENCE[name] for name in ("alibi_slopes", "alibi_bias", "attention_mask", "dropout")}
KERNEL_OPS = ("embedding", "learned_positions", "rms_norm", "layer_norm", "silu", "gelu", "swiglu",
              "clamped_swiglu", "linear", "gelu_mlp", "swiglu_mlp", "mxfp4_decode", "softmax", "apply_rope",
              "attention", "moe_experts", "moe_combine", "rope_cos_sin", "moe_route",
              "sinusoidal_positions")

def make_ops(runtime=None, make_runtime=None, impl: CudaOps | None = None) -> dict:
    """The OPS mapping: kernel ops bound to a CudaOps on ``runtime`` (or ``impl``) plus the host ops."""
    impl = impl if impl is not None else CudaOps(runtime, make_runtime)
    ops = {name: getattr(impl, name) for name in KERNEL_OPS}
    ops.update(HOST_OPS)
    return ops
