"""The one place per-step kernels are compiled: numba, cached on disk.

Why compiled kernels: a monitor's step is a state machine over [L] or [L, k]
arrays. Written as NumPy calls it costs ~1-2 us of dispatch per call and a
dozen calls per monitor, which at L = 256-1024 is most of a step; one
compiled loop per step costs ~1-3 us in all. Kernels hold only the per-position
arithmetic; deciding what to flag and writing evidence stays in Python, on the
rare steps that flag.

`kernel` is numba's `njit` with the on-disk cache (a process loads a compiled
kernel in milliseconds instead of compiling it for ~0.5 s), or without it where
no cache directory is writable (logged once). Kernels keep the
GIL: each runs for a few microseconds, less than a hand-over of the GIL to
gRPC's poller thread and back can cost (the throughput benchmark measured the
same or better without nogil, within its noise). NUMBA_DISABLE_JIT=1 runs
every kernel as plain Python (slow; for debugging).

Rule: a kernel calls no kernel of another module; Python chains them
(`prefetch`, an intrinsic of a few instructions, is the exception). The cache is
keyed on the defining file alone, so a caller would keep a stale compiled copy
of a callee edited elsewhere, and a per-position call that numba does not
inline costs ~20 ns, more than a helper's own work. For the same reason an edit
of this file's decorator recompiles nothing already cached: clear the
`__pycache__/*.nbi` files after one.
"""

from __future__ import annotations

from typing import Callable

import numba
import structlog
from llvmlite import ir
from numba.core import cgutils, types
from numba.core.extending import intrinsic

log = structlog.get_logger(__name__)
_uncached: list[str] = []


def kernel(function: Callable) -> Callable:
    """numba.njit with the disk cache; compiled in memory only where numba finds no writable cache directory.

    numba needs its cache directory writable even to read it (it checks with a temporary file),
    and raises at decoration when neither NUMBA_CACHE_DIR, the package's __pycache__ nor a
    user cache directory is: e.g. a read-only root filesystem. The sidecar must start there
    too, compiling at start-up instead (~3.5 s).
    """
    try:
        return numba.njit(cache=True)(function)
    except RuntimeError as err:  # "cannot cache function ...: no locator available"
        if "no locator" not in str(err):
            raise
        if not _uncached:
            log.warning("kernel_cache_unavailable", reason=str(err),
                        fix="set NUMBA_CACHE_DIR to a writable directory")
        _uncached.append(function.__qualname__)
        return numba.njit(function)


@intrinsic
def prefetch(typingctx, array, index):
    """prefetch(array, index) inside a kernel: start loading array[index] into cache and go on.

    For gathers over the vocabulary (a token's piece, its pattern column): ids are random, so
    each lookup misses cache, and a loop whose next step depends on the last one (an automaton
    walk) waits for every miss in turn. Asking a few tokens ahead overlaps them (2-3x measured at
    L = 1,024). An index past the end is harmless: a prefetch never faults.
    """
    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        data = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, data, [args[1]], wraparound=False)
        byte_pointer = ir.IntType(8).as_pointer()
        int32 = ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, int32, int32, int32]), "llvm.prefetch.p0i8")
        # read, high temporal locality, data cache
        builder.call(function, [builder.bitcast(pointer, byte_pointer), int32(0), int32(3), int32(1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen
