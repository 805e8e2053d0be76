"""Monitor worker processes: decoding and monitors on more than one core.

One Python process runs one core's worth of monitors (the GIL), and a top-k
step's decode and default monitors cost a few hundred microseconds of pure
Python and NumPy. With `server.monitor_processes = N`, the gRPC front process
only relays each Watch stream's raw bytes: every stream is pinned to one of N
worker processes, which parses, decodes and monitors its messages in order
(the same StreamHandler as in-process mode) and sends back serialised events.
Streams run in parallel across workers, and even a single stream overlaps
the front's receiving with the worker's monitoring.

The front writes frames (workers/protocol.py) through asyncio pipe
transports, so relaying costs its event loop a write and a read callback and
no front thread competes with the loop for the GIL; the worker side is
workers/child.py. Each stream may have at most
WINDOW messages in flight, so a slow worker slows its own streams' reads
(gRPC flow control then pushes back on the client) instead of queueing
without bound.

A worker that dies ends its streams with UNAVAILABLE and is replaced; the
other workers' streams go on. A worker is one thread, so a monitor that never
returns (an infinite loop in plugin code) would stall every stream pinned to
it: the worker acknowledges each batch of frames, and one with frames
outstanding and no acknowledgement for server.monitor_hard_deadline_s is
killed (its streams end with UNAVAILABLE saying why) and replaced, counted in
canvaswatch_monitor_workers_killed. While no worker is up, health says
NOT_SERVING; new streams avoid a worker that has been silent for a second. The embedding matrix, when on the CPU, is
shared with the workers through shared memory rather than copied.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import pickle
import time
from dataclasses import dataclass, field
from typing import Callable

import structlog
import torch
import torch.multiprocessing as torch_mp

from canvaswatch.server.config import Config
from canvaswatch.server.errors import Refusal, StepError
from canvaswatch.server.ops.merged_metrics import Family, add
from canvaswatch.server.workers.child import worker_main
from canvaswatch.server.workers.protocol import CUT, REPLY, REQUEST, Frame, StreamEnd, StreamStatus
from canvaswatch.server.workers.shared_memory import shareable

log = structlog.get_logger(__name__)

WINDOW = 64  # messages a stream may have in flight to its runner ...
WINDOW_BYTES = 16 * 1024 * 1024  # ... and bytes (beyond one message): a stream's read-ahead memory stays bounded
START_TIMEOUT_S = 300.0
RESTART_BACKOFF_MAX_S = 60.0  # between tries to start a replacement worker that keeps failing
STALL_S = 1.0  # a worker silent this long with frames outstanding gets no new streams while others can take them


class WorkerStartError(RuntimeError):
    """A monitor worker could not start; the sidecar does not serve without its workers."""


@dataclass
class RelayStream:
    """The front's end of one stream: its runner, its window, and what came back.

    Each window counter has one writer, so a step thread (workers/threads.py) can answer a message
    that raised nothing without waking the event loop: the loop counts what it sends and the replies
    it takes (deliver); a step thread counts the replies it kept to itself (`quiet`) and the bytes of
    every message it handled (`runner_bytes`), and wakes the loop only while the pump waits for room
    (`waiting`). Under the GIL, a `+= 1` with a single writer loses nothing, and whichever of the
    pump's check and the thread's count comes second sees the other. A worker process's replies all
    come through deliver, which frees their bytes from `sizes`.
    """

    stream_id: int
    worker: "WorkerProcess"
    results: asyncio.Queue = field(default_factory=asyncio.Queue)
    sizes: collections.deque | None = field(default_factory=collections.deque)  # worker mode: in flight, in order
    sent: int = 0
    sent_bytes: int = 0
    delivered: int = 0  # replies the loop took
    freed_bytes: int = 0  # worker mode: bytes of the messages those replies answered
    quiet: int = 0  # step thread: replies with no events and no status, never delivered
    runner_bytes: int = 0  # step thread: bytes of every message it handled
    room: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: bool = False  # the pump waits for room: a quiet reply must wake it
    done: bool = False  # the worker ended the stream (or the front released it)
    finished: bool = False  # the worker has seen the final message

    @property
    def in_flight(self) -> int:
        return self.sent - self.delivered - self.quiet

    @property
    def in_flight_bytes(self) -> int:
        return self.sent_bytes - self.freed_bytes - self.runner_bytes

    def send(self, raw: bytes) -> None:
        self.sent += 1
        self.sent_bytes += len(raw)
        if self.sizes is not None:
            self.sizes.append(len(raw))
        self.worker.send(Frame.MESSAGE, self.stream_id, raw)

    def full(self, limit: int = WINDOW) -> bool:
        in_flight = self.in_flight
        return in_flight >= limit or (in_flight > 0 and self.in_flight_bytes >= WINDOW_BYTES)

    async def wait_for_room(self, limit: int = WINDOW) -> None:
        """Until fewer than `limit` messages (and WINDOW_BYTES) are in flight (limit=1: all answered) or the
        stream is over."""
        while self.full(limit) and not self.done:
            self.room.clear()
            self.waiting = True  # announced before the re-check, so a quiet reply counted after it wakes us
            try:
                if self.full(limit) and not self.done:
                    await self.room.wait()
            finally:
                self.waiting = False

    def deliver(self, events: list[bytes], status: StreamStatus | None) -> None:
        self.delivered += 1
        if self.sizes:  # replies come in order; an END's reply comes after every message's
            self.freed_bytes += self.sizes.popleft()
        self.room.set()
        if status is not None and status.over:
            self.done = True
        if events or status is not None:  # most steps raise nothing: Watch need not wake for them
            self.results.put_nowait((events, status))

    def lose(self, status: StreamStatus) -> None:
        """The runner is gone (a worker died, a step thread was given up on): end the stream with `status`."""
        self.done = True
        self.room.set()
        self.results.put_nowait(([], status))


class WorkerProcess(asyncio.Protocol):
    """One worker process, seen from the front's event loop: frames out on one pipe, replies in on another.

    Both pipe ends are asyncio transports, so relaying costs the loop a write and a read callback,
    and no thread of the front competes with the loop for the GIL.
    """

    def __init__(self, pool: "MonitorWorkers", index: int) -> None:
        self.pool = pool
        self.index = index
        context = torch_mp.get_context("spawn")
        child_requests, requests = context.Pipe(duplex=False)
        replies, child_replies = context.Pipe(duplex=False)
        self.process = context.Process(
            target=worker_main, name=f"canvaswatch-monitor-{index}", daemon=True,
            args=(index, pool.config, pool.embeddings, pool.log_level, child_requests, child_replies),
        )
        self.process.start()
        child_requests.close()
        child_replies.close()
        self._request_fd, self._reply_fd = os.dup(requests.fileno()), os.dup(replies.fileno())
        requests.close()
        replies.close()
        self.streams: dict[int, RelayStream] = {}
        self.metrics: list[Family] = []
        self.alive = False
        self.outstanding = 0  # frames sent and not yet acknowledged (the watchdog's view of progress)
        self.progress_at = time.monotonic()
        self.killed_because: str | None = None
        self.ready: asyncio.Future = pool.loop.create_future()
        self._buffer = bytearray()
        self._writer: asyncio.WriteTransport | None = None

    async def connect(self) -> None:
        loop = self.pool.loop
        self._writer, _ = await loop.connect_write_pipe(asyncio.Protocol, open(self._request_fd, "wb", buffering=0))
        await loop.connect_read_pipe(lambda: self, open(self._reply_fd, "rb", buffering=0))

    def send(self, kind: int, stream_id: int, body: bytes = b"") -> None:
        if self._writer is not None and not self._writer.is_closing():
            if not self.outstanding:
                self.progress_at = time.monotonic()
            self.outstanding += 1
            self._writer.write(REQUEST.pack(len(body), kind, stream_id) + body)

    def silent_for(self, now: float) -> float:
        """Seconds since the worker last acknowledged frames while some were outstanding (0: none outstanding)."""
        return now - self.progress_at if self.outstanding else 0.0

    # asyncio.Protocol, for the reply pipe
    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        at = 0
        while len(buffer) - at >= REPLY.size:
            (size,) = REPLY.unpack_from(buffer, at)
            stop = at + REPLY.size + size
            if stop > len(buffer):
                break
            self._on_replies(pickle.loads(buffer[at + REPLY.size : stop]))
            at = stop
        del buffer[:at]

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.worker_exited(self)

    def _on_replies(self, items: list[tuple]) -> None:
        for item in items:
            head = item[0]
            if head == "progress":
                self.outstanding -= item[1]
                self.progress_at = time.monotonic()
            elif head == "metrics":
                self.metrics = item[1]
            elif head == "ready":
                self.alive = True
                if not self.ready.done():
                    self.ready.set_result(None)
            elif head == "failed":
                if not self.ready.done():
                    self.ready.set_exception(WorkerStartError(
                        f"server.monitor_processes: worker {self.index} failed to start: {item[1]}"))
            else:
                stream = self.streams.get(head)
                if stream is not None:
                    stream.deliver(item[1], item[2])

    def stop(self, timeout: float) -> None:
        if self.silent_for(time.monotonic()) > STALL_S:
            timeout = 0.5  # stuck in a call: it would not read STOP; shutdown need not wait for it
        self.alive = False
        self.send(Frame.STOP, 0)
        if self._writer is not None:
            self._writer.close()
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout)


class MonitorWorkers:
    """N worker processes; each stream is pinned to the worker with the fewest open streams."""

    def __init__(self, config: Config, embeddings: torch.Tensor | None, log_level: str = "info",
                 killed: Callable[[], None] = lambda: None) -> None:
        self.config = config
        self.hard_deadline_s = config.server.monitor_hard_deadline_s
        self._killed = killed  # counts a worker killed by the watchdog (the front's metric)
        self._watchdog: asyncio.Task | None = None
        self.log_level = log_level
        self.count = config.server.monitor_processes
        self.embeddings = shareable(embeddings)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.workers: list[WorkerProcess] = []
        self.retired_metrics: list[list[Family]] = []
        self._ids = itertools.count(1)
        self._turns = itertools.count()
        self._stopping = False
        # Called on the loop with True / False when the first worker is up again / the last one is gone:
        # the sidecar's health then says NOT_SERVING, so a readiness probe routes traffic elsewhere.
        self.on_serving_change: Callable[[bool], None] = lambda serving: None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        started = time.perf_counter()
        self.workers = [WorkerProcess(self, index) for index in range(self.count)]
        try:
            for worker in self.workers:
                await self._await_ready(worker)
        except BaseException:
            self.stop()
            raise
        log.info("monitor_workers_started", processes=self.count, seconds=round(time.perf_counter() - started, 1))
        self._watchdog = self.loop.create_task(self._watch())

    async def _watch(self) -> None:
        """Kill a worker stuck in one call past server.monitor_hard_deadline_s; worker_exited replaces it."""
        every = min(1.0, self.hard_deadline_s / 4)
        while not self._stopping:
            await asyncio.sleep(every)
            now = time.monotonic()
            for worker in self.workers:
                silent = worker.silent_for(now)
                if worker.alive and worker.killed_because is None and silent > self.hard_deadline_s:
                    worker.killed_because = (
                        f"monitor worker {worker.index} made no progress for {silent:.1f} s (server.monitor_hard_deadline_s = "
                        f"{self.hard_deadline_s:g}): a monitor ran away or a step is too large; the worker was killed "
                        "and is being replaced, and this request was not monitored to its end; retry it")
                    log.error("monitor_worker_killed", worker=worker.index, silent_s=round(silent, 1),
                              streams=len(worker.streams), hard_deadline_s=self.hard_deadline_s)
                    self._killed()
                    worker.process.kill()  # the reply pipe closes: worker_exited fails its streams and replaces it

    async def _await_ready(self, worker: WorkerProcess) -> None:
        await worker.connect()
        try:
            await asyncio.wait_for(asyncio.shield(worker.ready), START_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise WorkerStartError(f"server.monitor_processes: worker {worker.index} did not start "
                                   f"within {START_TIMEOUT_S:.0f} s") from None

    def open_stream(self) -> RelayStream:
        live = [w for w in self.workers if w.alive]
        if not live:
            raise StepError("workers: no monitor worker is running; retry shortly", Refusal.UNAVAILABLE)
        now = time.monotonic()
        responsive = [w for w in live if w.silent_for(now) < STALL_S]
        live = responsive or live  # a worker stuck in a call takes no new streams while another can
        # Fewest open streams; ties go round the workers, so light traffic does not all land on the first.
        turn = next(self._turns)
        worker = min(live, key=lambda w: (len(w.streams), (w.index - turn) % self.count))
        stream = RelayStream(next(self._ids), worker)
        worker.streams[stream.stream_id] = stream
        worker.send(Frame.OPEN, stream.stream_id)
        return stream

    def end_input(self, stream: RelayStream) -> None:
        stream.worker.send(Frame.END, stream.stream_id)

    def release(self, stream: RelayStream, cut: bool = False) -> None:
        """The front is done with the stream; a worker still holding it is told to drop it as cancelled
        (`cut`: cut at the drain deadline, so incomplete)."""
        stream.worker.streams.pop(stream.stream_id, None)
        if not stream.done:
            stream.done = True
            stream.worker.send(Frame.CANCEL, stream.stream_id, CUT if cut else b"")

    def metric_snapshots(self) -> list[list[Family]]:
        """Called from the /metrics thread: reads lists that the loop only ever replaces whole."""
        return [*self.retired_metrics, *(w.metrics for w in list(self.workers))]

    def worker_exited(self, worker: WorkerProcess) -> None:
        """On the loop: the worker's reply pipe closed. Fail its streams; replace it unless stopping."""
        was_alive, worker.alive = worker.alive, False
        if not worker.ready.done():
            worker.ready.set_exception(WorkerStartError(
                f"server.monitor_processes: worker {worker.index} exited while starting"))
        if self._stopping or not was_alive:
            return
        if not any(w.alive for w in self.workers):
            self.on_serving_change(False)
        worker.process.join(1)
        log.error("monitor_worker_exited", worker=worker.index, exit_code=worker.process.exitcode,
                  streams=len(worker.streams))
        message = (worker.killed_because or
                   f"monitor worker {worker.index} exited (exit code {worker.process.exitcode}); retry the request")
        for stream in list(worker.streams.values()):
            stream.lose(StreamStatus(StreamEnd.LOST, Refusal.UNAVAILABLE, message))
        # added into one snapshot: a sidecar whose workers are replaced again and again keeps one, not one each
        self.retired_metrics = [add(*self.retired_metrics, worker.metrics)]
        worker.metrics = []
        replacement = WorkerProcess(self, worker.index)
        self.workers = [replacement if w is worker else w for w in self.workers]
        self.loop.create_task(self._restart(replacement))

    async def _restart(self, worker: WorkerProcess) -> None:
        """Start `worker` in its slot; a start that fails (or hangs past START_TIMEOUT_S) is killed and tried
        again after 1, 2, 4 ... RESTART_BACKOFF_MAX_S seconds until it serves or the pool stops: a slot
        never stays dead for good (with every slot dead, every Watch would get UNAVAILABLE forever)."""
        delay = 1.0
        while True:
            try:
                await self._await_ready(worker)
                break
            except Exception as err:
                log.error("monitor_worker_restart_failed", worker=worker.index, error=str(err), retry_in_s=delay)
            if worker.process.is_alive():
                worker.process.kill()  # hung while starting: not left behind
            await asyncio.sleep(delay)
            delay = min(2 * delay, RESTART_BACKOFF_MAX_S)
            if self._stopping:
                return
            replacement = WorkerProcess(self, worker.index)
            self.workers = [replacement if w is worker else w for w in self.workers]
            worker = replacement
        log.info("monitor_worker_restarted", worker=worker.index)
        if sum(w.alive for w in self.workers) == 1:
            self.on_serving_change(True)

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        for worker in self.workers:
            worker.stop(timeout)
