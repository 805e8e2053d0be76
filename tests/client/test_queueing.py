"""The never-blocking queue: drop policies, counting, and the final message that is never dropped."""

from __future__ import annotations

import pytest

from canvaswatch.client.queueing import StepQueue


def _drain(queue: StepQueue) -> list:
    out = []
    while (item := queue.get_nowait()) is not None:
        out.append(item.payload)
    return out


def test_drop_oldest_keeps_the_newest_steps():
    queue = StepQueue(3, "oldest")
    results = [queue.put(i) for i in range(6)]
    assert results == [True] * 6
    assert queue.dropped == 3
    assert _drain(queue) == [3, 4, 5]


def test_drop_newest_refuses_the_incoming_step():
    queue = StepQueue(3, "newest")
    results = [queue.put(i) for i in range(6)]
    assert results == [True, True, True, False, False, False]
    assert queue.dropped == 3
    assert _drain(queue) == [0, 1, 2]


@pytest.mark.parametrize("policy", ["oldest", "newest"])
def test_final_is_never_dropped_even_when_full(policy):
    queue = StepQueue(2, policy)
    queue.put("a")
    queue.put("b")
    assert queue.put("final", final=True) is True
    items = []
    while (item := queue.get_nowait()) is not None:
        items.append((item.payload, item.final))
    assert items[-1] == ("final", True)
    assert queue.dropped == 1


def test_abandon_counts_what_will_never_be_sent():
    queue = StepQueue(10)
    for i in range(4):
        queue.put(i)
    queue.abandon()
    assert queue.dropped == 4 and queue.put(9) is False and queue.dropped == 5


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_pending"):
        StepQueue(0)
    with pytest.raises(ValueError, match="drop_policy"):
        StepQueue(4, "random")
