"""Atomics and a spin barrier for the threads of one numba parallel region (x86-64 hosts).

Numba has no atomic operations; these ``@intrinsic``s emit LLVM's (``atomicrmw``, ``cmpxchg``,
atomic loads) on an int64 array used as shared state, plus ``pause`` and ``sched_yield`` for
polite spinning. :func:`rendezvous` and :func:`barrier` let the ``n`` iterations of a
``prange(n)`` region (one per thread) wait for each other, so a chain of dependent steps runs in
one region instead of one region per step (spec/backends.md, "Fused decode").

State array ``sync`` (int64, zeroed by the caller before each region): ``sync[0]`` counts barrier
arrivals, ``sync[8]`` counts rendezvous arrivals, ``sync[16]`` holds the rendezvous verdict (0 open,
1 everyone arrived, 2 timed out). The slots are 64 bytes apart.
"""
from __future__ import annotations

import numba
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from gptevo.backends.numba._simd import _I32, _I64, _index, _intrinsic_fn, _ptr

_OPTS = dict(cache=True, fastmath=False, error_model="numpy", nogil=True)
kjit = numba.njit(**_OPTS)

ARRIVALS, GUESTS, VERDICT = 0, 8, 16          # slots of the sync array (8 int64 = 64 bytes apart)
SYNC_SIZE = 24
SPINS_PER_YIELD = 64                          # pause instructions between two sched_yield calls
RENDEZVOUS_YIELDS = 1 << 17                   # about 0.1-1 s: then the region is run one step at a time


@intrinsic
def atomic_add(typingctx, arr, index, value):
    """``old = arr[index]; arr[index] += value`` atomically (sequentially consistent); returns old."""
    sig = types.int64(arr, index, types.int64)

    def codegen(context, builder, sig, args):
        idx = _index(context, builder, sig.args[1], args[1])
        p = _ptr(context, builder, sig.args[0], args[0], idx, _I64, _I64)
        val = context.cast(builder, args[2], sig.args[2], types.int64)
        return builder.atomic_rmw("add", p, val, "seq_cst")
    return sig, codegen


@intrinsic
def atomic_load(typingctx, arr, index):
    """``arr[index]`` read atomically (acquire): never hoisted out of a spinning loop."""
    sig = types.int64(arr, index)

    def codegen(context, builder, sig, args):
        idx = _index(context, builder, sig.args[1], args[1])
        p = _ptr(context, builder, sig.args[0], args[0], idx, _I64, _I64)
        return builder.load_atomic(p, "acquire", 8)
    return sig, codegen


@intrinsic
def atomic_cas(typingctx, arr, index, expected, new):
    """Set ``arr[index] = new`` if it equals ``expected``, atomically; returns the value it held."""
    sig = types.int64(arr, index, types.int64, types.int64)

    def codegen(context, builder, sig, args):
        idx = _index(context, builder, sig.args[1], args[1])
        p = _ptr(context, builder, sig.args[0], args[0], idx, _I64, _I64)
        exp = context.cast(builder, args[2], sig.args[2], types.int64)
        new = context.cast(builder, args[3], sig.args[3], types.int64)
        pair = builder.cmpxchg(p, exp, new, "seq_cst", "seq_cst")
        return builder.extract_value(pair, 0)
    return sig, codegen


@intrinsic
def cpu_pause(typingctx):
    """The x86 ``pause`` hint of a spin-wait loop."""
    sig = types.void()

    def codegen(context, builder, sig, args):
        fn = _intrinsic_fn(builder, "llvm.x86.sse2.pause", ir.VoidType(), [])
        builder.call(fn, [])
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def yield_cpu(typingctx):
    """``sched_yield()`` (libc, resolved by name, so kernels using it stay cacheable)."""
    sig = types.void()

    def codegen(context, builder, sig, args):
        fn = _intrinsic_fn(builder, "sched_yield", _I32, [])
        builder.call(fn, [])
        return context.get_dummy_value()
    return sig, codegen


@kjit
def _wait_at_least(sync, slot, target):
    spins = 0
    while atomic_load(sync, slot) < target:
        cpu_pause()
        spins += 1
        if spins % SPINS_PER_YIELD == 0:
            yield_cpu()


@kjit
def barrier(sync, n_threads, generation):
    """Wait until all ``n_threads`` threads have arrived at barrier number ``generation`` (1, 2, ...;
    every thread passes the same sequence). Only valid after a successful :func:`rendezvous`."""
    atomic_add(sync, ARRIVALS, 1)
    _wait_at_least(sync, ARRIVALS, n_threads * generation)


@kjit
def rendezvous(sync, n_threads):
    """True when all ``n_threads`` iterations of the region run at once (each arrived here while
    the others waited); False (for every thread, consistently) when they did not within the time
    limit, e.g. a threading layer that ran the iterations one after another: the caller then does
    no work in the region. Barriers are safe only after True."""
    if atomic_add(sync, GUESTS, 1) + 1 == n_threads:
        atomic_cas(sync, VERDICT, 0, 1)
    yields = 0
    spins = 0
    while atomic_load(sync, VERDICT) == 0:
        cpu_pause()
        spins += 1
        if spins % SPINS_PER_YIELD == 0:
            yield_cpu()
            yields += 1
            if yields >= RENDEZVOUS_YIELDS:
                atomic_cas(sync, VERDICT, 0, 2)
    return atomic_load(sync, VERDICT) == 1


@kjit
def take_chunk(work, slot, n_items, chunk):
    """The next ``[lo, hi)`` of ``n_items`` items in chunks of ``chunk``, from the shared counter
    ``work[slot]`` (zeroed before the region): each chunk goes to exactly one thread, so threads that
    stream faster take more chunks (dynamic scheduling). ``lo >= n_items`` when none is left."""
    c = atomic_add(work, slot, 1)
    lo = c * chunk
    return lo, min(n_items, lo + chunk)


def chunk_size(n_items: int, n_threads: int, multiple: int = 1) -> int:
    """Items per chunk: about 8 chunks per thread, at least 16 items, a multiple of ``multiple``."""
    c = max(16, -(-n_items // (8 * max(1, n_threads))))
    return -(-c // multiple) * multiple
