"""Explicit SIMD for numba kernels: 512-bit vector types and x86 intrinsics as ``@intrinsic``s.

LLVM does not vectorize 4-bit table lookups (see spec/backends.md, "MXFP4 decode kernels"), so the
MXFP4 kernels in ``_mxfp4_gemv.py`` are written with explicit vector operations. This module gives
numba two vector types that live in registers like any scalar local:

- ``f32x16``: LLVM ``<16 x float>`` (one zmm register);
- ``i32x16``: LLVM ``<16 x i32>`` (the same register seen as 16 dwords, or 64 bytes for the
  byte-wise operations ``pshufb`` and ``dpbusd``);

and the operations on them (loads, arithmetic, shuffles, reductions), each a tiny ``@intrinsic``
that emits one or a few LLVM instructions. Loops over them are ordinary numba loops; LLVM keeps the
loop-carried vectors in registers (mem2reg), so the generated code is what one would write with
C intrinsics.

The x86 intrinsics (``llvm.x86.avx512.*``) can only be compiled for a CPU that has them: kernels
that use them must be called only when :data:`FEATURES` says so (``has_avx512()`` / ``has_vnni()``).
The generic operations (loads, fma, shifts, reductions) are plain LLVM IR and compile anywhere.
"""
from __future__ import annotations

import functools

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, models, register_model

# --- host CPU features --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def host_features() -> frozenset:
    """The host CPU's features as LLVM names ('avx512f', 'avx512bw', 'avx512vnni', ...)."""
    try:
        import llvmlite.binding as llvm

        feats = llvm.get_host_cpu_features()
        return frozenset(k for k, v in feats.items() if v)
    except Exception:                      # pragma: no cover  (unknown platform): portable code only
        return frozenset()


def has_avx512() -> bool:
    """AVX-512 F + BW (512-bit float permutes, byte shuffles and byte/word conversions)."""
    f = host_features()
    return {"avx512f", "avx512bw"} <= f


def has_vnni() -> bool:
    """AVX-512 VNNI (vpdpbusd on 512-bit registers) on top of :func:`has_avx512`."""
    return has_avx512() and "avx512vnni" in host_features()


def has_vbmi() -> bool:
    """AVX-512 VBMI (vpermb: a byte lookup in a 64-byte table) on top of :func:`has_avx512`."""
    return has_avx512() and "avx512vbmi" in host_features()


# --- vector types -------------------------------------------------------------------------------


class Vec(types.Type):
    """A SIMD register value: ``kind`` 'f32' or 'i32', ``lanes`` elements."""

    def __init__(self, kind: str, lanes: int):
        self.kind = kind
        self.lanes = lanes
        super().__init__(name=f"simd.{kind}x{lanes}")

    @property
    def key(self):
        return self.kind, self.lanes


f32x16 = Vec("f32", 16)
i32x16 = Vec("i32", 16)

_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_I8 = ir.IntType(8)
_I64 = ir.IntType(64)
_V16F = ir.VectorType(_F32, 16)
_V16I = ir.VectorType(_I32, 16)
_V64B = ir.VectorType(_I8, 64)
_V16B = ir.VectorType(_I8, 16)
_I16 = ir.IntType(16)
_V16H = ir.VectorType(ir.HalfType(), 16)


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        elt = _F32 if fe_type.kind == "f32" else _I32
        super().__init__(dmm, fe_type, ir.VectorType(elt, fe_type.lanes))


def _intrinsic_fn(builder, name, ret, args):
    """Declare (once per module) and return the LLVM intrinsic ``name``."""
    mod = builder.module
    fnty = ir.FunctionType(ret, args)
    return cgutils.get_or_insert_function(mod, fnty, name)


def _ptr(context, builder, arrty, arr, index, elt_ty, vec_ty):
    """Address of ``arr.flat[index]`` (contiguous array) as a pointer to ``vec_ty``."""
    a = context.make_array(arrty)(context, builder, arr)
    data = builder.bitcast(a.data, elt_ty.as_pointer())
    p = builder.gep(data, [index], source_etype=elt_ty)
    return builder.bitcast(p, vec_ty.as_pointer())


def _index(context, builder, ty, val):
    return context.cast(builder, val, ty, types.intp)


# --- loads and constants --------------------------------------------------------------------------


@intrinsic
def load_f32x16(typingctx, arr, index):
    """16 float32 from a contiguous float32 array starting at flat index ``index`` (unaligned)."""
    sig = f32x16(arr, index)

    def codegen(context, builder, sig, args):
        idx = _index(context, builder, sig.args[1], args[1])
        p = _ptr(context, builder, sig.args[0], args[0], idx, _F32, _V16F)
        return builder.load(p, align=4, typ=_V16F)
    return sig, codegen


@intrinsic
def store_f32x16(typingctx, arr, index, v):
    """arr.flat[index:index+16] = v (float32 array, unaligned)."""
    sig = types.void(arr, index, v)

    def codegen(context, builder, sig, args):
        idx = _index(context, builder, sig.args[1], args[1])
        p = _ptr(context, builder, sig.args[0], args[0], idx, _F32, _V16F)
        builder.store(args[2], p, align=4)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def load_i32x16(typingctx, arr, byte_offset):
    """64 bytes of a contiguous array (any dtype) at ``byte_offset``, as 16 dwords (unaligned)."""
    sig = i32x16(arr, byte_offset)

    def codegen(context, builder, sig, args):
        idx = _index(context, builder, sig.args[1], args[1])
        p = _ptr(context, builder, sig.args[0], args[0], idx, _I8, _V16I)
        return builder.load(p, align=1, typ=_V16I)
    return sig, codegen


@intrinsic
def load_u8x16_zext(typingctx, arr, byte_offset):
    """16 bytes at ``byte_offset`` zero-extended to 16 dwords (vpmovzxbd)."""
    sig = i32x16(arr, byte_offset)

    def codegen(context, builder, sig, args):
        idx = _index(context, builder, sig.args[1], args[1])
        p = _ptr(context, builder, sig.args[0], args[0], idx, _I8, _V16B)
        v = builder.load(p, align=1, typ=_V16B)
        return builder.zext(v, _V16I)
    return sig, codegen


@intrinsic
def load_i8x16_f32(typingctx, arr, byte_offset):
    """16 signed bytes at ``byte_offset`` as 16 float32 (vpmovsxbd + vcvtdq2ps; exact)."""
    sig = f32x16(arr, byte_offset)

    def codegen(context, builder, sig, args):
        idx = _index(context, builder, sig.args[1], args[1])
        p = _ptr(context, builder, sig.args[0], args[0], idx, _I8, _V16B)
        v = builder.load(p, align=1, typ=_V16B)
        return builder.sitofp(v, _V16F)
    return sig, codegen


@intrinsic
def load_f16x16_f32(typingctx, arr, index):
    """16 IEEE binary16 values (a uint16 array of their bits) from flat index ``index``, widened to
    float32 (vcvtph2ps; exact): the int8 mode's weight scales."""
    sig = f32x16(arr, index)

    def codegen(context, builder, sig, args):
        idx = _index(context, builder, sig.args[1], args[1])
        p = _ptr(context, builder, sig.args[0], args[0], idx, _I16, _V16H)
        return builder.fpext(builder.load(p, align=2, typ=_V16H), _V16F)
    return sig, codegen


@intrinsic
def f16_to_f32(typingctx, bits):
    """float32 of one IEEE binary16 value given as its uint16 bits (exact)."""
    if not isinstance(bits, types.Integer) or bits.bitwidth != 16:
        return None
    sig = types.float32(bits)

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), _F32)
    return sig, codegen


@intrinsic
def load_u8x4_bcast(typingctx, arr, byte_offset):
    """4 bytes at ``byte_offset`` as one dword broadcast to all 16 lanes."""
    sig = i32x16(arr, byte_offset)

    def codegen(context, builder, sig, args):
        idx = _index(context, builder, sig.args[1], args[1])
        a = context.make_array(sig.args[0])(context, builder, args[0])
        data = builder.bitcast(a.data, _I8.as_pointer())
        p = builder.bitcast(builder.gep(data, [idx], source_etype=_I8), _I32.as_pointer())
        d = builder.load(p, align=1, typ=_I32)
        v = builder.insert_element(ir.Constant(_V16I, ir.Undefined), d, ir.Constant(_I32, 0))
        return builder.shuffle_vector(v, v, ir.Constant(_V16I, [0] * 16))
    return sig, codegen


@intrinsic
def load_u32(typingctx, arr, byte_offset):
    """4 bytes at ``byte_offset`` as an unsigned 32-bit integer (little-endian), returned as int64."""
    sig = types.int64(arr, byte_offset)

    def codegen(context, builder, sig, args):
        idx = _index(context, builder, sig.args[1], args[1])
        a = context.make_array(sig.args[0])(context, builder, args[0])
        data = builder.bitcast(a.data, _I8.as_pointer())
        p = builder.bitcast(builder.gep(data, [idx], source_etype=_I8), _I32.as_pointer())
        return builder.zext(builder.load(p, align=1, typ=_I32), _I64)
    return sig, codegen


@intrinsic
def f32x16_zero(typingctx):
    sig = f32x16()

    def codegen(context, builder, sig, args):
        return ir.Constant(_V16F, [0.0] * 16)
    return sig, codegen


@intrinsic
def i32x16_zero(typingctx):
    sig = i32x16()

    def codegen(context, builder, sig, args):
        return ir.Constant(_V16I, [0] * 16)
    return sig, codegen


@intrinsic
def f32x16_bcast(typingctx, x):
    """A float32 scalar in all 16 lanes."""
    sig = f32x16(types.float32)

    def codegen(context, builder, sig, args):
        v = builder.insert_element(ir.Constant(_V16F, ir.Undefined), args[0], ir.Constant(_I32, 0))
        return builder.shuffle_vector(v, v, ir.Constant(_V16I, [0] * 16))
    return sig, codegen


@intrinsic
def i32x16_bcast(typingctx, x):
    """An integer scalar (truncated to 32 bits) in all 16 lanes."""
    sig = i32x16(types.int32)

    def codegen(context, builder, sig, args):
        v = builder.insert_element(ir.Constant(_V16I, ir.Undefined), args[0], ir.Constant(_I32, 0))
        return builder.shuffle_vector(v, v, ir.Constant(_V16I, [0] * 16))
    return sig, codegen


# --- arithmetic ---------------------------------------------------------------------------------


def _binop(op):
    @intrinsic
    def fn(typingctx, a, b):
        if not (isinstance(a, Vec) and a == b):
            return None
        sig = a(a, b)

        def codegen(context, builder, sig, args):
            return getattr(builder, op)(args[0], args[1])
        return sig, codegen
    return fn


vadd = _binop("fadd")        # f32x16 + f32x16 (IEEE, no fast-math flags)
vsub = _binop("fsub")
vmul = _binop("fmul")
iadd = _binop("add")         # i32x16 lane-wise
isub = _binop("sub")
iand = _binop("and_")
ixor = _binop("xor")


@intrinsic
def vfma(typingctx, a, b, c):
    """a * b + c, lane-wise, one rounding (llvm.fma)."""
    sig = f32x16(f32x16, f32x16, f32x16)

    def codegen(context, builder, sig, args):
        fn = _intrinsic_fn(builder, "llvm.fma.v16f32", _V16F, [_V16F, _V16F, _V16F])
        return builder.call(fn, args)
    return sig, codegen


@intrinsic
def isrl(typingctx, v, n):
    """Logical right shift of every dword by the constant-in-practice ``n``."""
    sig = i32x16(i32x16, types.int32)

    def codegen(context, builder, sig, args):
        s = builder.insert_element(ir.Constant(_V16I, ir.Undefined), args[1], ir.Constant(_I32, 0))
        s = builder.shuffle_vector(s, s, ir.Constant(_V16I, [0] * 16))
        return builder.lshr(args[0], s)
    return sig, codegen


@intrinsic
def isll(typingctx, v, n):
    """Left shift of every dword by ``n``."""
    sig = i32x16(i32x16, types.int32)

    def codegen(context, builder, sig, args):
        s = builder.insert_element(ir.Constant(_V16I, ir.Undefined), args[1], ir.Constant(_I32, 0))
        s = builder.shuffle_vector(s, s, ir.Constant(_V16I, [0] * 16))
        return builder.shl(args[0], s)
    return sig, codegen


@intrinsic
def i32_to_f32(typingctx, v):
    """Signed dwords converted to float32 (vcvtdq2ps)."""
    sig = f32x16(i32x16)

    def codegen(context, builder, sig, args):
        return builder.sitofp(args[0], _V16F)
    return sig, codegen


@intrinsic
def bits_to_f32(typingctx, v):
    """Reinterpret 16 dwords as 16 float32 (no instruction)."""
    sig = f32x16(i32x16)

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], _V16F)
    return sig, codegen


@intrinsic
def hsum(typingctx, v):
    """Sum of the 16 float32 lanes (a pairwise tree: halve the vector four times)."""
    sig = types.float32(f32x16)

    def codegen(context, builder, sig, args):
        x = args[0]
        n = 16
        while n > 1:
            h = n // 2
            lo = builder.shuffle_vector(x, x, ir.Constant(ir.VectorType(_I32, h), list(range(h))))
            hi = builder.shuffle_vector(x, x, ir.Constant(ir.VectorType(_I32, h), list(range(h, n))))
            x = builder.fadd(lo, hi)
            n = h
        return builder.extract_element(x, ir.Constant(_I32, 0))
    return sig, codegen


@intrinsic
def hsum_i32(typingctx, v):
    """Sum of the 16 int32 lanes (wrapping), as int64."""
    sig = types.int64(i32x16)

    def codegen(context, builder, sig, args):
        fn = _intrinsic_fn(builder, "llvm.vector.reduce.add.v16i32", _I32, [_V16I])
        return builder.sext(builder.call(fn, [args[0]]), _I64)
    return sig, codegen


@intrinsic
def lane_f32(typingctx, v, i):
    """Lane ``i`` of an f32x16."""
    sig = types.float32(f32x16, types.int32)

    def codegen(context, builder, sig, args):
        return builder.extract_element(args[0], args[1])
    return sig, codegen


# --- x86 AVX-512 shuffles and dot products (call only when has_avx512() / has_vnni()) ------------


@intrinsic
def permps(typingctx, table, idx):
    """vpermps: lane i = table[idx[i] & 15] (AVX-512F; a 16-entry float table lookup)."""
    sig = f32x16(f32x16, i32x16)

    def codegen(context, builder, sig, args):
        fn = _intrinsic_fn(builder, "llvm.x86.avx512.permvar.sf.512", _V16F, [_V16F, _V16I])
        return builder.call(fn, [args[0], args[1]])
    return sig, codegen


def _byte_table_codegen(llvm_name):
    """Codegen of a 64-byte table lookup ``llvm_name(table, idx)`` on two i32x16 seen as bytes."""
    def codegen(context, builder, sig, args):
        fn = _intrinsic_fn(builder, llvm_name, _V64B, [_V64B, _V64B])
        t = builder.bitcast(args[0], _V64B)
        i = builder.bitcast(args[1], _V64B)
        return builder.bitcast(builder.call(fn, [t, i]), _V16I)
    return codegen


@intrinsic
def pshufb(typingctx, table, idx):
    """vpshufb on 64 bytes: byte i = table[16*(i//16) + (idx[i] & 15)], or 0 where idx[i] >= 128
    (AVX-512BW; the table is repeated in each 128-bit lane)."""
    return i32x16(i32x16, i32x16), _byte_table_codegen("llvm.x86.avx512.pshuf.b.512")


def _lane_pick(offset):
    @intrinsic
    def pick(typingctx, a, b):
        sig = i32x16(i32x16, i32x16)

        def codegen(context, builder, sig, args):
            mask = ir.Constant(_V16I, [2 * i + offset for i in range(16)])
            return builder.shuffle_vector(args[0], args[1], mask)
        return sig, codegen
    return pick


even_lanes = _lane_pick(0)   # (a, b) -> lanes 0, 2, .., 14 of a, then 0, 2, .., 14 of b
odd_lanes = _lane_pick(1)    # (a, b) -> lanes 1, 3, .., 15 of a, then of b


@intrinsic
def permb(typingctx, table, idx):
    """vpermb: byte i = table[idx[i] & 63] (AVX-512 VBMI). With a 16-entry table repeated four times
    the lookup reads only the low 4 bits of each index byte, so nibbles need no mask."""
    return i32x16(i32x16, i32x16), _byte_table_codegen("llvm.x86.avx512.permvar.qi.512")


@intrinsic
def dpbusd(typingctx, acc, a, b):
    """vpdpbusd: acc[i] += sum_{j<4} u8(a)[4i+j] * s8(b)[4i+j] (AVX-512 VNNI; no saturation).

    Written as the generic IR pattern (zext/sext, multiply, pairwise adds) that LLVM's x86
    backend matches to vpdpbusd, so no version-specific intrinsic signature is needed."""
    sig = i32x16(i32x16, i32x16, i32x16)

    def codegen(context, builder, sig, args):
        v64i32 = ir.VectorType(_I32, 64)
        ua = builder.zext(builder.bitcast(args[1], _V64B), v64i32)
        sb = builder.sext(builder.bitcast(args[2], _V64B), v64i32)
        prod = builder.mul(ua, sb)
        parts = [builder.shuffle_vector(prod, prod, ir.Constant(_V16I, [4 * i + j for i in range(16)]))
                 for j in range(4)]
        s = builder.add(builder.add(parts[0], parts[1]), builder.add(parts[2], parts[3]))
        return builder.add(args[0], s)
    return sig, codegen


@intrinsic
def dpbusd_x86(typingctx, acc, a, b):
    """vpdpbusd through the x86 intrinsic (llvm.x86.avx512.vpdpbusd.512)."""
    sig = i32x16(i32x16, i32x16, i32x16)

    def codegen(context, builder, sig, args):
        fn = _intrinsic_fn(builder, "llvm.x86.avx512.vpdpbusd.512", _V16I, [_V16I, _V16I, _V16I])
        return builder.call(fn, list(args))
    return sig, codegen


@intrinsic
def pmaddubs_madd(typingctx, acc, a, b):
    """AVX-512BW without VNNI: acc += pmaddwd(pmaddubsw(u8 a, s8 b), 1) (i16 saturation cannot
    occur for |a| <= 24, |b| <= 127: 2 * 24 * 127 < 32767)."""
    sig = i32x16(i32x16, i32x16, i32x16)

    def codegen(context, builder, sig, args):
        v32i16 = ir.VectorType(ir.IntType(16), 32)
        f1 = _intrinsic_fn(builder, "llvm.x86.avx512.pmaddubs.w.512", v32i16, [_V64B, _V64B])
        f2 = _intrinsic_fn(builder, "llvm.x86.avx512.pmaddw.d.512", _V16I, [v32i16, v32i16])
        w = builder.call(f1, [builder.bitcast(args[1], _V64B), builder.bitcast(args[2], _V64B)])
        d = builder.call(f2, [w, ir.Constant(v32i16, [1] * 32)])
        return builder.add(args[0], d)
    return sig, codegen



def _prefetch_codegen(locality):
    def codegen(context, builder, sig, args):
        idx = _index(context, builder, sig.args[1], args[1])
        a = context.make_array(sig.args[0])(context, builder, args[0])
        data = builder.bitcast(a.data, _I8.as_pointer())
        p = builder.gep(data, [idx], source_etype=_I8)
        fn = _intrinsic_fn(builder, "llvm.prefetch.p0i8", ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32])
        builder.call(fn, [p, ir.Constant(_I32, 0), ir.Constant(_I32, locality), ir.Constant(_I32, 1)])
        return context.get_dummy_value()
    return codegen


@intrinsic
def prefetch(typingctx, arr, byte_offset):
    """Hint the cache line at ``byte_offset`` of a contiguous array into the caches (llvm.prefetch,
    read, high locality: ``prefetcht0``, into L1); an address past the end is harmless (prefetches
    do not fault)."""
    return types.void(arr, byte_offset), _prefetch_codegen(3)


@intrinsic
def prefetch_l2(typingctx, arr, byte_offset):
    """As :func:`prefetch`, locality 2 (``prefetcht1``: into L2, not L1). For weights streamed
    while the core is busy computing: measured 30 % faster than ``prefetcht0`` in the one-pass
    tiles of ``_gemm_tiles`` (the L1 keeps the input rows)."""
    return types.void(arr, byte_offset), _prefetch_codegen(2)


@intrinsic
def pointer_like(typingctx, address, like):
    """The integer ``address`` as a pointer to ``like``'s element type, for ``numba.carray``: a kernel
    that takes per-layer weights as one int64 array of data addresses (instead of a tuple of arrays,
    whose runtime indexing made compile time grow with the layer count: 24 layers, 7 minutes).
    The caller keeps the arrays alive and C-contiguous while the kernel runs."""
    sig = types.CPointer(like.dtype)(address, like)

    def codegen(context, builder, sig, args):
        addr = context.cast(builder, args[0], sig.args[0], types.int64)
        return builder.inttoptr(addr, context.get_value_type(sig.return_type))
    return sig, codegen
