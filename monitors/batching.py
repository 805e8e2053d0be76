"""Windowed batching on one worker thread: items submitted from many threads, processed together.

A batch opens with its first item and closes `window_s` later, or as soon as
its items' total weight reaches `max_weight`. Shared by the classifier monitor
(texts from every request, one model call) and the sidecar's dense decoder
(steps from every stream, one kernel launch); it lives here because the
server may import monitors, not the other way round.
"""

from __future__ import annotations

import collections
import threading
from concurrent.futures import Future
from typing import Callable, Generic, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class WindowBatcher(Generic[T, R]):
    def __init__(self, process: Callable[[list[T]], Sequence[R]], *, window_s: float, max_weight: int,
                 weight: Callable[[T], int] = lambda item: 1, name: str = "canvaswatch-batcher") -> None:
        self._process = process
        self._weight = weight
        self.window_s = window_s
        self.max_weight = max_weight
        self.batches = 0
        self.items = 0
        self._queue: collections.deque[tuple[T, Future]] = collections.deque()
        self._queued_weight = 0
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: T) -> Future:
        """Queue an item; its Future gets its result, or the batch's exception, or is cancelled at close()."""
        future: Future = Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append((item, future))
            self._queued_weight += self._weight(item)
            self._ready.notify_all()
        return future

    def close(self, timeout: float = 10.0) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        self._thread.join(timeout=timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if self._closed:
                    for _, future in self._queue:
                        future.cancel()
                    return
                # Hold the window open for more items, unless the batch is already full.
                self._ready.wait_for(lambda: self._queued_weight >= self.max_weight or self._closed,
                                     timeout=self.window_s)
                batch, total = [], 0
                while self._queue and (not batch or total + self._weight(self._queue[0][0]) <= self.max_weight):
                    item = self._queue.popleft()
                    total += self._weight(item[0])
                    batch.append(item)
                self._queued_weight -= total
            self.batches += 1
            self.items += len(batch)
            try:
                results = self._process([item for item, _ in batch])
            except Exception as err:  # every waiter learns of the failure, none hangs
                for _, future in batch:
                    future.set_exception(err)
                continue
            for (_, future), result in zip(batch, results):
                future.set_result(result)
