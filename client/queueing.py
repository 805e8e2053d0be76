"""The bounded, never-blocking queue between a serving loop and its sidecar stream.

put() never waits: when the queue is full, a step is dropped by the policy
("oldest": evict the oldest queued step, "newest": refuse the incoming one)
and counted. A final message is never dropped: it evicts the oldest ordinary
step instead. Items may be messages or zero-argument callables that build the
message later, on the sender's thread, so costly work (the top-k bottleneck,
serialisation) stays out of the denoising loop.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Any, Callable

DROP_POLICIES = ("oldest", "newest")


@dataclass
class QueuedItem:
    payload: Any  # a message or a callable returning one
    final: bool = False


class StepQueue:
    def __init__(self, max_pending: int, drop_policy: str = "oldest", on_put: Callable[[], None] | None = None) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        if drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
        self.max_pending = max_pending
        self.drop_policy = drop_policy
        self._items: collections.deque[QueuedItem] = collections.deque()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._on_put = on_put
        self._closed = False
        self.dropped = 0
        self.accepted = 0

    def put(self, payload: Any, final: bool = False) -> bool:
        """Queue an item without ever blocking; False if this item was dropped."""
        with self._lock:
            if self._closed:
                self.dropped += 0 if final else 1
                return False
            if len(self._items) >= self.max_pending:
                if final or self.drop_policy == "oldest":
                    if not self._evict_oldest_ordinary() and not final:
                        self.dropped += 1
                        return False
                else:
                    self.dropped += 1
                    return False
            self._items.append(QueuedItem(payload, final))
            self.accepted += 1
            self._ready.notify()
        if self._on_put is not None:
            self._on_put()
        return True

    def count_dropped(self, steps: int) -> None:
        """Count steps dropped before put() (the producer's own queue), under the same lock as put()."""
        with self._lock:
            self.dropped += steps

    def get(self, timeout: float | None = None) -> QueuedItem | None:
        """Next item (blocking up to timeout); None when closed and drained, or on timeout."""
        with self._ready:
            if not self._items and not self._closed:
                self._ready.wait(timeout)
            return self._items.popleft() if self._items else None

    def get_nowait(self) -> QueuedItem | None:
        with self._lock:
            return self._items.popleft() if self._items else None

    def close(self) -> None:
        """No more puts; items still queued are counted as dropped if never taken (see abandon)."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        if self._on_put is not None:
            self._on_put()

    def abandon(self) -> None:
        """The stream died: what is still queued will never be sent."""
        with self._ready:
            self.dropped += sum(1 for item in self._items if not item.final)
            self._items.clear()
            self._closed = True
            self._ready.notify_all()
        if self._on_put is not None:
            self._on_put()  # an asyncio sender waiting for the next item sees the queue closed and ends

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def _evict_oldest_ordinary(self) -> bool:
        for index, item in enumerate(self._items):
            if not item.final:
                del self._items[index]
                self.dropped += 1
                return True
        return False
