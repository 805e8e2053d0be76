"""One Watch call's lifecycle, shared by the in-process servicer and the worker relay.

Whoever does the work, a Watch call holds a stream slot for its whole life; a refused step
aborts the call with the status its `Refusal` maps to; a call that ends without its final
message waits the cancellation grace before it is called incomplete; and a cancellation is
recorded as such.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Callable

import grpc
import structlog

from canvaswatch.server.errors import StepError
from canvaswatch.server.transport.status import grpc_status

log = structlog.get_logger(__name__)

# A cancelled call ends the request iterator just as a half-close does; the cancellation itself
# reaches the handler a moment later (gRPC's completion queue delivers the two separately). A
# stream that ends without its final message waits this long for it before being called
# incomplete, so cancellations are counted as such. Streams that sent their final never wait.
CANCEL_GRACE_S = 0.25


class StreamSlots:
    """server.max_streams and the active-streams gauge, shared by whichever servicer takes Watch."""

    def __init__(self, limit: int, gauge) -> None:
        self.limit = limit
        self.gauge = gauge  # canvaswatch_active_streams
        self.active = 0

    @contextlib.asynccontextmanager
    async def held(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """One slot for the body; a full server aborts the call with RESOURCE_EXHAUSTED instead."""
        if self.active >= self.limit:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.active} streams open; limit is {self.limit}")
        self.active += 1
        self.gauge.inc()
        try:
            yield
        finally:
            self.active -= 1
            self.gauge.dec()


@contextlib.asynccontextmanager
async def watch_call(slots: StreamSlots, context: grpc.aio.ServicerContext, *,
                     request_id: Callable[[], str | None] = lambda: None,
                     on_cancel: Callable[[], None] = lambda: None,
                     on_end: Callable[[], None] = lambda: None, log_refusal: bool = True) -> AsyncIterator[None]:
    """The body runs in a stream slot; its StepError aborts the call, its cancellation is recorded
    (`on_cancel`), and `on_end` runs last, once, however the call ended (a call refused for want
    of a slot never starts, so it runs neither)."""
    async with slots.held(context):
        try:
            yield
        except StepError as failure:
            status = grpc_status(failure.refusal)
            if log_refusal:
                log.warning("stream_rejected", request_id=request_id(), code=status.name, error=failure.message)
            await context.abort(status, failure.message)
        except asyncio.CancelledError:
            on_cancel()
            raise
        finally:
            on_end()


async def await_cancellation(finished: bool) -> None:
    """At the end of input: a stream without its final message waits the grace, so a cancellation
    on its way lands here (as CancelledError) instead of being counted as incomplete."""
    if not finished:
        await asyncio.sleep(CANCEL_GRACE_S)
