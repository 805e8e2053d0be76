"""In-process step threads: each Watch stream's decoding and monitors run off the event loop.

With server.monitor_processes = 0 the gRPC process does the work itself, but not on its event
loop: the loop only moves bytes (it serves every stream, health and signals, and a step that
took it, e.g. a 2 s monitor or a huge valid step, used to stall them all). Each open stream
holds one step thread (a StepRunner, reused from an idle pool) that parses, decodes, monitors
and serialises its messages in order through the same StreamTable as a worker process, and hands
the events back to the loop in batches (one wake-up per batch). The front end is the worker
relay's (transport/relay.py): the same window, end-of-input and cancellation rules in both modes.

With the GIL the threads do not run Python in parallel, so this buys isolation, not cores (use
monitor_processes for cores): a slow or blocking monitor holds up only its own stream. Dense steps
(large torch ops) are limited to server.workers at a time, which bounds their memory.

A Python thread cannot be killed. A step still running past server.monitor_hard_deadline_s (a
runaway monitor) ends its stream with UNAVAILABLE naming the monitor, counts
canvaswatch_monitors_stopped{reason="hard_deadline"}, and leaves the thread behind
(canvaswatch_stuck_step_threads; health says NOT_SERVING while any is stuck). Should it ever
return, it exits. A Check call (a whole trace on one step thread, StepThreads.check) is under the
same deadline and ends the same way; it runs here in worker mode too (monitor_processes > 0), so
there it is the one place where a runaway leaves a stuck thread in the gRPC process. The threads are daemon threads, so a stuck one does not keep the process from
exiting at shutdown (docs/operations.md says what can and cannot be guaranteed in-process).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import queue
import sys
import threading
import time
from typing import Any, Callable

import structlog

from canvaswatch.server.errors import Refusal, StepError
from canvaswatch.server.ops.metrics import Metrics
from canvaswatch.server.pipeline.engine import Engine
from canvaswatch.server.pipeline.session import Session, SessionVerdict
from canvaswatch.server.pipeline.stream_handler import Outcome
from canvaswatch.v1 import monitor_pb2 as pb
from canvaswatch.server.workers.pool import RelayStream
from canvaswatch.server.workers.protocol import CUT, Frame, StreamEnd, StreamStatus
from canvaswatch.server.workers.streams import StreamTable

log = structlog.get_logger(__name__)

_RETURN = -1  # runner-only frame kinds: the stream is released (the runner goes back to the idle pool) ...
_CALL = -2  # ... or check a whole trace (Check) off the loop
MAX_IDLE = 32  # idle runners kept for the next streams; more exit
_THREAD_PRIORITIES = sys.platform == "linux" and hasattr(os, "setpriority")


class StepRunner:
    """One thread serving one stream at a time; frames arrive in its inbox in order."""

    def __init__(self, pool: "StepThreads", number: int) -> None:
        self.pool = pool
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.stream: RelayStream | None = None  # the loop's side; only the loop reads or sets it
        self.table: StreamTable | None = None  # the thread's side
        self.busy_since: float | None = None  # monotonic start of the frame being handled (the watchdog reads it)
        self.abandoned = False
        # busy_since and abandoned change together under this lock, so a call that returns just as the
        # watchdog gives up on it is either answered or abandoned, never both or neither.
        self.lock = threading.Lock()
        self.session: Session | None = None  # a Check's session, once open (the thread sets it, the watchdog reads it)
        self.check: asyncio.Future | None = None  # the loop's side: the Check awaiting this runner
        self.lowered = False  # its OS priority was lowered for a large canvas: it exits when its stream ends
        self.thread = threading.Thread(target=self._run, name=f"canvaswatch-step-{number}", daemon=True)
        self.thread.start()

    def send(self, kind: int, stream_id: int, body: Any = b"") -> None:
        """From the loop (RelayStream.send and the pool): the frame goes after those already sent."""
        self.inbox.put((kind, stream_id, body))

    def running_monitor(self) -> str | None:
        session = self.session
        if session is not None:
            return session.running
        table = self.table
        if table is None:
            return None
        for handler in list(table.handlers.values()):
            if handler.session is not None and handler.session.running:
                return handler.session.running
        return None

    def _run(self) -> None:
        inbox, loop, pool = self.inbox, self.pool.loop, self.pool
        while True:
            batch = [inbox.get()]
            while True:  # whatever else is waiting goes in the same batch: one wake-up of the loop for all
                try:
                    batch.append(inbox.get_nowait())
                except queue.Empty:
                    break
            replies, wake = [], None
            for kind, stream_id, body in batch:
                if kind == Frame.OPEN:
                    engine, relay = body
                    self.table = StreamTable(engine, dense_slots=pool.dense_slots)
                    if pool.large_canvas_nice and _THREAD_PRIORITIES:
                        self.table.on_large_canvas = self._lower_priority
                    self.table.handle(kind, stream_id, b"")
                    continue
                if kind == _RETURN:
                    engine, self.table = body, None
                    loop.call_soon_threadsafe(pool.returned, self, engine)
                    continue
                if kind == _CALL:
                    engine, trace, future = body
                    self.busy_since = time.monotonic()
                    try:
                        outcome = (engine.check_trace(trace, opened=self._opened), None)
                    except BaseException as err:  # noqa: BLE001 - handed to the awaiting coroutine
                        outcome = (None, err)
                    if self._done():
                        self.session = None
                        loop.call_soon_threadsafe(_settle, future, *outcome)
                        continue
                    loop.call_soon_threadsafe(pool.came_back, self)
                    return
                if kind == Frame.STOP:
                    return
                self.busy_since = time.monotonic()
                reply = self.table.handle(kind, stream_id, body) if self.table is not None else None
                if not self._done():  # it came back after the watchdog gave up on it: nobody waits; leave
                    loop.call_soon_threadsafe(pool.came_back, self)
                    return
                if kind == Frame.MESSAGE:
                    relay.runner_bytes += len(body)
                    if reply is not None and not reply[1] and reply[2] is None:
                        # Nothing for Watch: counted here, and the loop is woken only if the pump waits for room
                        # (RelayStream says why this is safe). Most steps end here: no wake-up of the loop each.
                        relay.quiet += 1
                        if relay.waiting:
                            wake = relay
                        continue
                if reply is not None:
                    replies.append(reply)
            if replies:
                loop.call_soon_threadsafe(pool.deliver, self, replies)
            elif wake is not None:
                loop.call_soon_threadsafe(wake.room.set)

    def _lower_priority(self) -> None:
        """On this thread: nice it by server.large_canvas_nice, once. An unprivileged process cannot raise
        a thread's priority again, so a lowered runner is not reused: it exits when its stream ends. Only
        on Linux, where PRIO_PROCESS with a thread id means that one thread (elsewhere, the process)."""
        if self.lowered:
            return
        tid = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + self.pool.large_canvas_nice)
        except (OSError, OverflowError) as err:  # not allowed here (a sandbox): the stream runs as it is
            if not self.pool.nice_failed:
                self.pool.nice_failed = True
                log.warning("large_canvas_nice_failed", error=f"{type(err).__name__}: {err}",
                            detail="large canvases run at normal priority (server.large_canvas_nice)")
            return
        self.lowered = True

    def _opened(self, session: Session) -> None:
        self.session = session

    def _done(self) -> bool:
        """On the thread, after a frame or a call: False if the watchdog gave up on it meanwhile."""
        with self.lock:
            self.busy_since = None
            return not self.abandoned

    def give_up(self, now: float, deadline_s: float) -> float | None:
        """On the loop (the watchdog): abandon the runner if its frame or call has run past `deadline_s`;
        how long it had run, or None if it is within the deadline (or idle)."""
        with self.lock:
            since = self.busy_since
            if since is None or self.abandoned or now - since <= deadline_s:
                return None
            self.abandoned = True
            return now - since


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class StepThreads:
    """The in-process step runners, with the interface the relay expects of MonitorWorkers."""

    def __init__(self, borrow: Callable[[], Engine], give_back: Callable[[Engine], None], metrics: Metrics,
                 hard_deadline_s: float, dense_concurrency: int, large_canvas_nice: int = 0) -> None:
        self.borrow, self.give_back = borrow, give_back  # the servicer's engine accounting (SIGHUP reloads)
        self.large_canvas_nice = large_canvas_nice  # server.large_canvas_nice
        self.nice_failed = False  # logged once
        self.metrics = metrics
        self.hard_deadline_s = hard_deadline_s
        self.dense_slots = threading.BoundedSemaphore(dense_concurrency)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.idle: collections.deque[StepRunner] = collections.deque()
        self.busy: set[StepRunner] = set()
        self.stuck: set[StepRunner] = set()
        self._ids = itertools.count(1)
        self._numbers = itertools.count(1)
        self._watchdog: asyncio.Task | None = None
        # Called on the loop with False when a thread gets stuck and True when none is any more.
        self.on_serving_change: Callable[[bool], None] = lambda serving: None

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._watchdog = self.loop.create_task(self._watch())

    def _runner(self) -> StepRunner:
        runner = self.idle.pop() if self.idle else StepRunner(self, next(self._numbers))
        self.busy.add(runner)
        return runner

    def open_stream(self) -> RelayStream:
        runner = self._runner()
        engine = self.borrow()
        stream = RelayStream(next(self._ids), runner, sizes=None)  # the thread counts bytes itself
        stream.engine = engine  # type: ignore[attr-defined] - given back when the runner lets go of it
        runner.stream = stream
        runner.send(Frame.OPEN, stream.stream_id, (engine, stream))
        return stream

    def end_input(self, stream: RelayStream) -> None:
        stream.worker.send(Frame.END, stream.stream_id)

    def release(self, stream: RelayStream, cut: bool = False) -> None:
        """The front is done with the stream: a runner still holding it drops it as cancelled (`cut`: cut at
        the drain deadline, so incomplete), then goes back."""
        runner = stream.worker
        if not stream.done:
            stream.done = True
            runner.send(Frame.CANCEL, stream.stream_id, CUT if cut else b"")
        runner.stream = None
        if runner.abandoned:
            self.give_back(stream.engine)  # type: ignore[attr-defined]
            return
        runner.send(_RETURN, 0, stream.engine)  # type: ignore[attr-defined]

    async def check(self, engine: Engine, trace: pb.Trace) -> SessionVerdict:
        """`engine.check_trace(trace)` on a step thread (Check: a whole trace's monitors, off the loop).

        Under server.monitor_hard_deadline_s like a Watch step: past it the call raises StepError
        (UNAVAILABLE, naming the running monitor) and the thread is left behind as stuck."""
        runner = self._runner()
        future = runner.check = self.loop.create_future()
        runner.send(_CALL, 0, (engine, trace, future))
        try:
            return await future
        finally:
            runner.check = None
            if not runner.abandoned:  # (a cancelled Check: the runner goes back once the call has returned)
                runner.send(_RETURN, 0, None)

    # on the loop, from the runners
    def deliver(self, runner: StepRunner, replies: list[tuple]) -> None:
        stream = runner.stream
        if stream is None or runner.abandoned:
            return
        for stream_id, events, status in replies:
            if stream_id == stream.stream_id:
                stream.deliver(events, status)

    def returned(self, runner: StepRunner, engine: Engine | None) -> None:
        if engine is not None:
            self.give_back(engine)
        self.busy.discard(runner)
        if len(self.idle) < MAX_IDLE and not runner.lowered:
            self.idle.append(runner)
        else:
            runner.send(Frame.STOP, 0)

    def came_back(self, runner: StepRunner) -> None:
        """An abandoned runner finished its call after all: it has exited; health may say SERVING again."""
        if runner in self.stuck:
            self.stuck.discard(runner)
            self.metrics.stuck_threads.dec()
            log.warning("step_thread_came_back", thread=runner.thread.name)
            if not self.stuck:
                self.on_serving_change(True)

    async def _watch(self) -> None:
        every = min(1.0, self.hard_deadline_s / 4)
        while True:
            await asyncio.sleep(every)
            now = time.monotonic()
            for runner in list(self.busy):
                seconds = runner.give_up(now, self.hard_deadline_s)
                if seconds is not None:
                    self._abandon(runner, seconds)

    def _abandon(self, runner: StepRunner, seconds: float) -> None:
        self.busy.discard(runner)
        self.stuck.add(runner)
        self.metrics.stuck_threads.inc()
        monitor = runner.running_monitor()
        self.metrics.monitors_stopped.labels(monitor or "none", "hard_deadline").inc()
        what = f"monitor {monitor!r}" if monitor else "a step outside any monitor's on_step (decoding, sinks or a monitor's start)"
        where = "Check: " if runner.check is not None else ""
        remedy = ("Check runs in the gRPC process in every mode, and the thread cannot be stopped; send the trace "
                  "over Watch with server.monitor_processes > 0 to run monitors you did not write"
                  if where else "in-process, the thread cannot be stopped; worker mode, server.monitor_processes > 0, "
                  "kills and replaces a stuck worker")
        message = (f"{where}{what} ran {seconds:.1f} s, past server.monitor_hard_deadline_s = {self.hard_deadline_s:g}: "
                   f"the request was not monitored to its end ({remedy})")
        log.error("step_thread_stuck", monitor=monitor, seconds=round(seconds, 1), thread=runner.thread.name,
                  call="Check" if where else "Watch")
        check = runner.check
        if check is not None and not check.done():
            session = runner.session
            model = session.model_label if session is not None else self.metrics.model_label("")
            self.metrics.requests.labels(model, Outcome.ERROR.value).inc()  # a Watch's is counted by the relay
            check.set_exception(StepError(message, Refusal.UNAVAILABLE))
        stream = runner.stream
        if stream is not None and not stream.done:
            stream.lose(StreamStatus(StreamEnd.LOST, Refusal.UNAVAILABLE, message))
        if len(self.stuck) == 1:
            self.on_serving_change(False)

    def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        for runner in [*self.idle, *self.busy]:
            runner.send(Frame.STOP, 0)
        self.idle.clear()

