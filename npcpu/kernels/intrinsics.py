"""Five CPU operations Numba does not expose, written as LLVM intrinsics, and a spin barrier.

    prefetch(a, i)        start loading the cache line of a[i] (a hint; never faults)
    atomic_add(a, i, v)   a[i] += v as one indivisible, sequentially consistent step; returns old a[i]
    atomic_load(a, i)     read a[i] with acquire ordering (never hoisted out of a loop, never torn)
    spin_pause()          x86 `pause` in a spin loop (kinder to the other hyper-thread); elsewhere a no-op
    float32_from_bits(i)  the float32 whose bits are the int32 i (a register reinterpretation, so a
                          loop using it still vectorizes; NumPy's .view needs an array)
    barrier_wait(counter, threads, generation)
                          the spin barrier of npcpu.kernels.compiled_step's worker threads

These let the threads of one compiled training step meet twice per step for well under a
microsecond, where launching a parallel region costs several (and a step of a small model is tens
of microseconds of arithmetic).
"""

import sys

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

SPINS_BEFORE_YIELD = 2000  # pause loops (short against a step), then give the core away while waiting

_sched_yield = None if sys.platform == "win32" else types.ExternalFunction("sched_yield", types.intc())


def _element_pointer(context, builder, array_type, array, index):
    data = context.make_array(array_type)(context, builder, array)
    return cgutils.get_item_pointer(context, builder, array_type, data, [index], wraparound=False)


@intrinsic
def prefetch(typingctx, array, index):
    """Ask the CPU to start loading the cache line of array[index] (1-D) into every cache level.

    LLVM's llvm.prefetch (read, high locality, data cache); a hint that never faults. It lets the
    rows of the next tile of a shuffled batch arrive while the current tile is being computed
    (the hardware prefetcher only follows the rows once they are being read).
    """
    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], args[1])
        byte_pointer, int32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, int32, int32, int32]),
            "llvm.prefetch.p0i8")
        builder.call(function, [builder.bitcast(pointer, byte_pointer), int32(0), int32(3), int32(1)])
        return context.get_dummy_value()
    return types.void(array, index), codegen


@intrinsic
def atomic_add(typingctx, array, index, value):
    """array[index] += value atomically (sequentially consistent); returns the old value. int64 only."""
    if array.dtype != types.int64:
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], args[1])
        value = context.cast(builder, args[2], signature.args[2], types.int64)
        return builder.atomic_rmw("add", pointer, value, "seq_cst")
    return types.int64(array, index, value), codegen


@intrinsic
def atomic_load(typingctx, array, index):
    """array[index] read atomically with acquire ordering (int64 only)."""
    if array.dtype != types.int64:
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], args[1])
        return builder.load_atomic(pointer, "acquire", 8)
    return types.int64(array, index), codegen


@intrinsic
def spin_pause(typingctx):
    """The x86 `pause` instruction (llvm.x86.sse2.pause); nothing on other CPUs."""
    def codegen(context, builder, signature, args):
        if "x86" in builder.module.triple or "i686" in builder.module.triple:
            function = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause")
            builder.call(function, [])
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def float32_from_bits(typingctx, bits):
    """The float32 with the same 32 bits as the int32 `bits` (LLVM bitcast)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(bits), codegen


if _sched_yield is None:
    @njit(cache=True)
    def _give_way():
        spin_pause()
else:
    @njit(cache=True)
    def _give_way():
        _sched_yield()


@njit(cache=True)
def barrier_wait(counter, threads, generation):
    """Wait until all `threads` threads have arrived at barrier number `generation` (0, 1, 2, ...).

    counter (1,) int64 starts at 0 and only grows: arriving adds 1, and barrier g is passed once it
    reaches threads * (g + 1). Everything a thread wrote before arriving is visible to every thread
    after it passes (the add is sequentially consistent, the loads acquire). Spins with `pause`,
    then yields the core between checks, so a waiting thread does not starve a descheduled one.
    Returns True when it had to yield: a thread it waited for was late by more than the spins,
    which on a shared machine means it was not running.
    """
    if threads == 1:
        return False
    target = threads * (generation + 1)
    atomic_add(counter, 0, 1)
    spins = 0
    while atomic_load(counter, 0) < target:
        if spins < SPINS_BEFORE_YIELD:
            spin_pause()
            spins += 1
        else:
            _give_way()
    return spins == SPINS_BEFORE_YIELD
