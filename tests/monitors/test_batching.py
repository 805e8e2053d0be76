"""WindowBatcher: batches close on weight or window, results go back in order, close cancels what is left."""

from __future__ import annotations

import threading

from canvaswatch.monitors.batching import WindowBatcher


def test_batches_respect_max_weight_and_return_results_in_order():
    seen: list[list[int]] = []
    gate = threading.Event()

    def process(items: list[int]) -> list[int]:
        gate.wait(5)  # hold the first batch so the rest queue up behind it
        seen.append(items)
        return [i * 10 for i in items]

    batcher = WindowBatcher(process, window_s=0.05, max_weight=5, weight=lambda i: i)
    futures = [batcher.submit(i) for i in (1, 2, 3, 4, 1)]
    gate.set()
    assert [f.result(timeout=5) for f in futures] == [10, 20, 30, 40, 10]
    assert all(sum(batch) <= 5 for batch in seen) and sum(map(len, seen)) == 5
    assert batcher.items == 5 and batcher.batches == len(seen) < 5
    batcher.close()


def test_close_cancels_queued_items_and_refuses_new_ones():
    started, release = threading.Event(), threading.Event()

    def slow(items):
        started.set()
        release.wait(5)
        return items

    batcher = WindowBatcher(slow, window_s=0.0, max_weight=1)
    first = batcher.submit("a")
    started.wait(5)
    queued = batcher.submit("b")
    closer = threading.Thread(target=batcher.close)
    closer.start()
    release.set()
    closer.join(5)
    assert first.result(timeout=5) == "a" and queued.cancelled()
    try:
        batcher.submit("c")
    except RuntimeError as err:
        assert "closed" in str(err)
    else:
        raise AssertionError("submit after close must fail")
