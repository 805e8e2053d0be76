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
