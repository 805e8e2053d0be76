"""monitors/compiled.py: kernels work with or without a writable cache, and prefetch changes no result."""

from __future__ import annotations

import numpy as np

from canvaswatch.monitors import compiled


def test_a_kernel_without_any_cache_directory_is_compiled_in_memory_instead_of_failing():
    # Source with no file behind it has no cache locator: numba's njit(cache=True) raises at
    # decoration, exactly as on a read-only filesystem with no writable cache directory.
    namespace: dict = {}
    exec(compile("def total(values):\n    out = 0\n    for v in values:\n        out += v\n    return out\n",
                 "<generated>", "exec"), namespace)
    total = compiled.kernel(namespace["total"])
    assert total(np.arange(5)) == 10
    assert "total" in compiled._uncached


def test_prefetch_inside_a_kernel_changes_no_result_even_past_the_end():
    @compiled.kernel
    def gather(table, ids):
        out = 0
        for j in range(ids.shape[0]):
            compiled.prefetch(table, ids[j] + 1_000_000)  # past the end: a prefetch never faults
            out += table[ids[j]]
        return out

    table = np.arange(100, dtype=np.int64)
    assert gather(table, np.array([3, 5, 7])) == 15


def test_sized_picks_the_gil_free_twin_from_large_canvas_on_and_both_compute_the_same():
    @compiled.kernel(gil_free_twin=True)
    def weighted(values, out):
        total = 0.0
        for j in range(values.shape[0]):
            out[j] = values[j] * 2
            total += values[j]
        return total

    values = np.arange(10, dtype=np.float64)
    assert compiled.sized(weighted, compiled.LARGE_CANVAS - 1) is weighted
    assert compiled.sized(weighted, compiled.LARGE_CANVAS) is weighted.gil_free
    held, free = np.zeros(10), np.zeros(10)
    assert weighted(values, held) == weighted.gil_free(values, free) == 45.0
    assert np.array_equal(held, free)
    assert weighted.gil_free.targetoptions.get("nogil") is True and not weighted.targetoptions.get("nogil")
    # numba's disk cache keys on the qualified name, not the options: the twin must not share the kernel's entry
    assert weighted.gil_free.py_func.__qualname__ != weighted.py_func.__qualname__


def test_the_default_monitors_raise_the_same_flags_through_the_gil_free_twins(vocab, monkeypatch):
    # Every kernel call on the twins (the bound lowered to 1 position) against the kernels themselves,
    # over the labelled simulated corpus: the same flags, field by field.
    from canvaswatch.client import simulate
    from canvaswatch.server.bottleneck.dense import DenseDecoder
    from canvaswatch.server.config import default_config
    from canvaswatch.server.pipeline.engine import Engine

    traces = simulate.labelled_corpus(vocab.encode, vocab.size, per_scenario=2, seed=5)

    def flags() -> list:
        engine = Engine(default_config(), vocab, dense=DenseDecoder(None, vocab.size))
        try:
            return [engine.check_trace(trace).flags for trace in traces]
        finally:
            engine.close()

    held = flags()
    monkeypatch.setattr(compiled, "LARGE_CANVAS", 1)
    free = flags()
    assert free == held
    assert sum(len(f) for f in held) >= len(traces) // 2  # the corpus raises flags: the comparison means something
