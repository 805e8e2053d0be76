"""The one place per-step kernels are compiled: numba, cached on disk.

Why compiled kernels: a monitor's step is a state machine over [L] or [L, k]
arrays. Written as NumPy calls it costs ~1-2 us of dispatch per call and a
dozen calls per monitor, which at L = 256-1024 is most of a step; one
compiled loop per step costs ~1-3 us in all. Kernels hold only the per-position
arithmetic; deciding what to flag and writing evidence stays in Python, on the
rare steps that flag.

`kernel` is numba's `njit` with the on-disk cache (a process loads a compiled
kernel in milliseconds instead of compiling it for ~0.5 s), or without it where
no cache directory is writable (logged once). NUMBA_DISABLE_JIT=1 runs
every kernel as plain Python (slow; for debugging).

The GIL. On ordinary canvases a kernel keeps it: each runs for microseconds,
less than handing the GIL to another thread and getting it back costs (with
every kernel releasing it, the throughput benchmark ran 6-25% slower with 8
streams, L = 256-1024). A canvas of LARGE_CANVAS positions or more is another
matter: at L = 65,536 one kernel runs for 1-3 ms, a step's kernels ~8 ms, and
holding the GIL through them stalls every other stream's threads (bench/gil_hold.py:
an ordinary stream's step p99 beside such a stream ~20 ms held, ~2 ms released;
BENCHMARKS.md). So a kernel declared with `gil_free_twin=True` gets a twin compiled
with nogil, and its caller picks one by size: `sized(kernel, L)(...)`. A twin
runs without the GIL, possibly beside the same kernel on another thread, so it
must write only arrays of its own call or of its own request (never a table
shared by streams). `compile_twins()`, after a warm-up, compiles each twin for
the signatures its kernel was compiled for, so no request compiles one while
holding the GIL (a signature first seen on a large canvas still would, once per
machine: the disk cache keeps it).

Rule: a kernel calls no kernel of another module; Python chains them
(`prefetch`, an intrinsic of a few instructions, is the exception). The cache is
keyed on the defining file alone, so a caller would keep a stale compiled copy
of a callee edited elsewhere, and a per-position call that numba does not
inline costs ~20 ns, more than a helper's own work. For the same reason an edit
of this file's decorator recompiles nothing already cached: clear the
`__pycache__/*.nbi` files after one.
"""

from __future__ import annotations

from types import FunctionType
from typing import Callable

import numba
import structlog
from llvmlite import ir
from numba.core import cgutils, types
from numba.core.extending import intrinsic

log = structlog.get_logger(__name__)
_uncached: list[str] = []


LARGE_CANVAS = 8192  # positions from which `sized` picks a kernel's GIL-free twin
_TWIN_SUFFIX = "__gil_free"  # the twin's qualified name, so the disk cache keeps it apart (numba keys on the name)
_twins: list[tuple[Callable, Callable]] = []  # (kernel, twin), for compile_twins
_kernels: list[Callable] = []  # every kernel, for compiled_signatures


def kernel(function: Callable | None = None, *, gil_free_twin: bool = False) -> Callable:
    """numba.njit with the disk cache; compiled in memory only where numba finds no writable cache directory.

    numba needs its cache directory writable even to read it (it checks with a temporary file),
    and raises at decoration when neither NUMBA_CACHE_DIR, the package's __pycache__ nor a
    user cache directory is: e.g. a read-only root filesystem. The sidecar must start there
    too, compiling at start-up instead (~3.5 s).

    gil_free_twin: also compile (lazily) a twin that releases the GIL, for `sized` to pick on large
    canvases; read the module's note on the GIL for what such a kernel may write.
    """
    if function is None:
        return lambda f: kernel(f, gil_free_twin=gil_free_twin)
    compiled = _njit(function)
    _kernels.append(compiled)
    if gil_free_twin:
        twin_function = FunctionType(function.__code__, function.__globals__, function.__name__,
                                           function.__defaults__, function.__closure__)
        twin_function.__qualname__ = function.__qualname__ + _TWIN_SUFFIX
        twin_function.__module__ = function.__module__
        twin = _njit(twin_function, nogil=True)
        compiled.gil_free = twin
        _twins.append((compiled, twin))
    return compiled


def _njit(function: Callable, **options) -> Callable:
    try:
        return numba.njit(cache=True, **options)(function)
    except RuntimeError as err:  # "cannot cache function ...: no locator available"
        if "no locator" not in str(err):
            raise
        if not _uncached:
            log.warning("kernel_cache_unavailable", reason=str(err),
                        fix="set NUMBA_CACHE_DIR to a writable directory")
        _uncached.append(function.__qualname__)
        return numba.njit(**options)(function)


def is_large(positions: int) -> bool:
    """A canvas whose kernels run without the GIL (read at each call, so a test can lower the bound)."""
    return positions >= LARGE_CANVAS


def sized(compiled: Callable, positions: int) -> Callable:
    """The kernel itself below LARGE_CANVAS positions, its GIL-free twin from there on."""
    return compiled.gil_free if is_large(positions) else compiled


def compile_twins() -> None:
    """Compile every twin for the signatures its kernel has been compiled for (call after a warm-up)."""
    for compiled, twin in _twins:
        for signature in getattr(compiled, "signatures", ()):  # none under NUMBA_DISABLE_JIT
            twin.compile(signature)


def compiled_signatures() -> dict[str, tuple]:
    """Each kernel's qualified name -> the signatures this process has compiled or loaded it for. A request
    that adds one after the warm-up paid a compile (or a disk-cache load) while it was served."""
    return {f"{k.py_func.__module__}.{k.py_func.__qualname__}": tuple(getattr(k, "signatures", ())) for k in _kernels}


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
