"""One Watch call's lifecycle, shared by the in-process servicer and the worker relay.

Whoever does the work, a Watch call holds a stream slot for its whole life; a refused step
aborts the call with the status its `Refusal` maps to; a call that ends without its final
message waits the cancellation grace before it is called incomplete; and a cancellation is
recorded as such.

No client can starve another (docs/operations.md): a slot is refused beyond server.max_streams,
beyond server.max_streams_per_peer for one client address and beyond server.max_streams_per_token
for one bearer token; and a stream that is silent past server.first_message_timeout_s (before its
first message) or server.idle_timeout_s (between two) ends with DEADLINE_EXCEEDED, so silent
streams hold their slots for a bounded time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import grpc
import structlog

from canvaswatch.server.config import ServerSection
from canvaswatch.server.errors import Refusal, StepError
from canvaswatch.server.transport.status import grpc_status

log = structlog.get_logger(__name__)

# A cancelled call ends the request iterator just as a half-close does; the cancellation itself
# reaches the handler a moment later (gRPC's completion queue delivers the two separately). A
# stream that ends without its final message waits this long for it before being called
# incomplete, so cancellations are counted as such. Streams that sent their final never wait.
CANCEL_GRACE_S = 0.25


@dataclass(frozen=True)
class StreamLimits:
    """The [server] keys that bound how many streams a client holds and how long a silent one lives."""

    total: int = 256
    per_peer: int = 0  # 0: no limit of its own
    per_token: int = 0
    first_message_s: float = 30.0
    idle_s: float = 120.0

    @classmethod
    def of(cls, server: ServerSection) -> "StreamLimits":
        return cls(server.max_streams, server.max_streams_per_peer, server.max_streams_per_token,
                   server.first_message_timeout_s, server.idle_timeout_s)


class StreamSlots:
    """The stream limits and the active-streams gauge, shared by whichever servicer takes Watch.

    Only the event loop touches the counts, so they need no lock.
    """

    def __init__(self, limits: StreamLimits, gauge: Any, refused: Any, tokens: list[str] | None = None) -> None:
        self.limits = limits
        self.gauge = gauge  # canvaswatch_active_streams
        self.refused = refused  # canvaswatch_streams_refused, by reason
        self._tokens = [token.encode() for token in tokens or ()]
        self.active = 0
        self.by_peer: collections.Counter[str] = collections.Counter()
        self.by_token: collections.Counter[int] = collections.Counter()
        self.draining = False  # set at shutdown: new streams are refused with UNAVAILABLE
        self.cut_message: str | None = None  # set at the drain deadline: open streams end with UNAVAILABLE
        self.tasks: set[asyncio.Task] = set()
        self.idle = asyncio.Event()  # set whenever no stream is open (the drain waits on it)
        self.idle.set()
        self._reads: set[_Read] = set()
        self._sweeper: asyncio.Task | None = None

    @contextlib.asynccontextmanager
    async def held(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """One slot for the body; a call over a limit is aborted (RESOURCE_EXHAUSTED naming the key) instead."""
        limits = self.limits
        peer = peer_address(context.peer())
        token = self._token_of(context) if limits.per_token else None
        if self.draining:
            await self._refuse(context, "draining", grpc.StatusCode.UNAVAILABLE,
                               "server: shutting down, no new streams; retry on another replica")
        if self.active >= limits.total:
            await self._refuse(context, "server_limit", grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"server.max_streams: {self.active} streams open; limit is {limits.total}")
        if limits.per_peer and self.by_peer[peer] >= limits.per_peer:
            await self._refuse(context, "peer_limit", grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"server.max_streams_per_peer: {self.by_peer[peer]} streams open from {peer}; "
                               f"limit is {limits.per_peer}")
        if token is not None and self.by_token[token] >= limits.per_token:
            await self._refuse(context, "token_limit", grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"server.max_streams_per_token: {self.by_token[token]} streams open with this "
                               f"token; limit is {limits.per_token}")
        self.active += 1
        self.by_peer[peer] += 1
        if token is not None:
            self.by_token[token] += 1
        self.idle.clear()
        self.gauge.inc()
        task = asyncio.current_task()
        self.tasks.add(task)
        try:
            yield
        finally:
            self.tasks.discard(task)
            self.active -= 1
            _release(self.by_peer, peer)
            if token is not None:
                _release(self.by_token, token)
            if not self.active:
                self.idle.set()
            self.gauge.dec()

    def cut(self, message: str) -> int:
        """End every open stream (the drain deadline passed): each is aborted with UNAVAILABLE `message`."""
        self.cut_message = message
        for task in list(self.tasks):
            task.cancel()
        return len(self.tasks)

    async def reads(self, request_iterator: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """The stream's messages in order; a DEADLINE refusal (StepError) if the client is silent past the
        first-message deadline (before its first) or the idle one (waiting for any later one).

        The deadlines cost a message one float store: a sweeper task checks every stream's read a few
        times a second and cancels one past its deadline, instead of a timer armed and disarmed per
        message (the asyncio.timeout this replaces cost ~15 us a message on the 2-core dev box,
        BENCHMARKS.md). A deadline runs only while the read waits, not while the consumer handles a
        message (a slow monitor is not the client's fault).
        """
        loop = asyncio.get_running_loop()
        iterator = request_iterator.__aiter__()
        read = _Read(asyncio.current_task())
        self._reads.add(read)
        self._sweep_started(loop)
        first_s, idle_s = self.limits.first_message_s, self.limits.idle_s
        try:
            while True:
                read.deadline = loop.time() + (idle_s if read.index else first_s)
                try:
                    message = await iterator.__anext__()
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if read.expired:
                        raise self._expired(read.index) from None
                    raise
                read.deadline = _NEVER
                read.index += 1
                yield message
        finally:
            self._reads.discard(read)

    def close(self) -> None:
        """At shutdown: the deadline sweeper stops with the loop."""
        if self._sweeper is not None:
            self._sweeper.cancel()

    def _expired(self, index: int) -> StepError:
        first = index == 0
        timeout = self.limits.first_message_s if first else self.limits.idle_s
        self.refused.labels("first_message_timeout" if first else "idle_timeout").inc()
        if first:
            return StepError(f"stream: no message within server.first_message_timeout_s = {timeout:g} s", Refusal.DEADLINE)
        return StepError(f"message[{index}]: none within server.idle_timeout_s = {timeout:g} s of message[{index - 1}]",
                         Refusal.DEADLINE)

    def _sweep_started(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        every = min(0.5, self.limits.first_message_s / 4, self.limits.idle_s / 4)
        loop = asyncio.get_running_loop()
        while self._reads:
            await asyncio.sleep(every)
            now = loop.time()
            for read in list(self._reads):
                if read.deadline < now and not read.expired:
                    read.expired = True
                    read.task.cancel()

    async def _refuse(self, context: grpc.aio.ServicerContext, reason: str, code: grpc.StatusCode, message: str) -> None:
        self.refused.labels(reason).inc()
        log.warning("stream_refused", reason=reason, peer=context.peer(), error=message)
        await context.abort(code, message)

    def _token_of(self, context: grpc.aio.ServicerContext) -> int:
        """The index of the caller's bearer token (the interceptor already let it in); -1 if none matches."""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and value.startswith("Bearer "):
                offered = value[len("Bearer "):].encode()
                for index, known in enumerate(self._tokens):
                    if hmac.compare_digest(offered, known):
                        return index
        return -1


_NEVER = float("inf")


class _Read:
    """One stream's read under a deadline (loop time); the sweeper cancels `task` past it."""

    __slots__ = ("task", "deadline", "index", "expired")

    def __init__(self, task: asyncio.Task | None) -> None:
        self.task = task
        self.deadline = _NEVER
        self.index = 0
        self.expired = False


def peer_address(peer: str) -> str:
    """A client's address without its port ("ipv4:127.0.0.1:5000" -> "ipv4:127.0.0.1"): a client that opens
    more connections gets new ports, not a new address."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        return f"{kind}:{rest.rsplit(':', 1)[0]}"
    return peer


def _release(counts: collections.Counter, key: Any) -> None:
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]  # the counter never keeps clients that have gone


@contextlib.asynccontextmanager
async def watch_call(slots: StreamSlots, context: grpc.aio.ServicerContext, *,
                     request_id: Callable[[], str | None] = lambda: None,
                     on_cancel: Callable[[], None] = lambda: None,
                     on_end: Callable[[], None] = lambda: None, log_refusal: bool = True) -> AsyncIterator[None]:
    """The body runs in a stream slot; its StepError aborts the call, its cancellation is recorded
    (`on_cancel`), and `on_end` runs last, once, however the call ended (a call refused for want
    of a slot never starts, so it runs neither). A stream cut at the drain deadline (StreamSlots.cut)
    is aborted with UNAVAILABLE and counted as incomplete, not as a client's cancellation."""
    async with slots.held(context):
        cut = False
        try:
            yield
        except StepError as failure:
            status = grpc_status(failure.refusal)
            if log_refusal:
                log.warning("stream_rejected", request_id=request_id(), code=status.name, error=failure.message)
            await context.abort(status, failure.message)
        except asyncio.CancelledError:
            if slots.cut_message is None:
                on_cancel()
                raise
            cut = True
        finally:
            on_end()
        if cut:
            slots.refused.labels("drain_deadline").inc()
            log.warning("stream_cut", request_id=request_id(), error=slots.cut_message)
            await context.abort(grpc.StatusCode.UNAVAILABLE, slots.cut_message)


async def await_cancellation(finished: bool) -> None:
    """At the end of input: a stream without its final message waits the grace, so a cancellation
    on its way lands here (as CancelledError) instead of being counted as incomplete."""
    if not finished:
        await asyncio.sleep(CANCEL_GRACE_S)
