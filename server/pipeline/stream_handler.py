"""One Watch stream's message sequence over an Engine, transport-free.

The rules every transport shares: the first message carries the request's
info, states follow in order, one final message ends the stream and nothing
may come after it, and a stream that ends without its final message is
incomplete. The in-process servicer and the monitor worker processes both
drive this class, so the two modes cannot drift apart. Errors are StepError
(a gRPC status and a message naming the field); after one, the stream is
over and the caller aborts it.
"""

from __future__ import annotations

import contextlib
from typing import AsyncIterator

import grpc

from canvaswatch.server.transport.convert import flag_to_pb, verdict_to_pb
from canvaswatch.server.bottleneck.step_decoder import StepError
from canvaswatch.server.pipeline.engine import Engine
from canvaswatch.server.pipeline.session import Session
from canvaswatch.v1 import monitor_pb2 as pb

_DENSE_FORMS = ("logits", "embeddings")
# A cancelled call ends the request iterator just as a half-close does; the cancellation itself
# reaches the handler a moment later (gRPC's completion queue delivers the two separately). A
# stream that ends without its final message waits this long for it before being called
# incomplete, so cancellations are counted as such. Streams that sent their final never wait.
CANCEL_GRACE_S = 0.25


def is_heavy(message: pb.StepState) -> bool:
    """Work that should leave an event loop: dense decoding (large torch ops) and the finish."""
    return message.final or message.WhichOneof("state") in _DENSE_FORMS


class StreamHandler:
    """Feed messages in arrival order; read `outcome` when the stream is over."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.session: Session | None = None
        self.index = 0
        self.finished = False
        # ok, invalid, incomplete, cancelled or error: the `outcome` label of canvaswatch_requests
        self.outcome = "error"

    @property
    def request_id(self) -> str | None:
        return self.session.meta.request_id if self.session is not None else None

    def feed(self, message: pb.StepState) -> list[pb.MonitorEvent]:
        """The events this message raises (flags, and the verdict after the final one)."""
        where = f"message[{self.index}]"
        try:
            if self.finished:
                raise StepError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: message after the final one")
            if self.session is None:
                if not message.HasField("info"):
                    raise StepError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}.info: required on the first message of a stream")
                self.session = self.engine.open(message.info, f"{where}.info")
            request_id = self.session.meta.request_id
            events = [pb.MonitorEvent(request_id=request_id, flag=flag_to_pb(flag))
                      for flag in self.engine.step(self.session, message, where)]
            if message.final:
                flags, verdict = self.engine.finish(self.session, message, where)
                events.extend(pb.MonitorEvent(request_id=request_id, flag=flag_to_pb(flag)) for flag in flags)
                events.append(pb.MonitorEvent(request_id=request_id, verdict=verdict_to_pb(verdict)))
                self.finished = True
                self.outcome = "ok"
        except StepError:
            self.outcome = "invalid"
            raise
        self.index += 1
        return events

    def end(self) -> None:
        """The client closed its side; refuses a stream that never sent its final message."""
        if self.finished:
            return
        self.outcome = "incomplete"
        if self.index:
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"message[{self.index - 1}].final: the stream ended without a final message")
        raise StepError(grpc.StatusCode.INVALID_ARGUMENT, "stream: ended with no messages")

    def count(self) -> None:
        """Count the request once, under its outcome."""
        metrics = self.engine.metrics
        model = self.session.model_label if self.session is not None else metrics.model_label("")
        metrics.requests.labels(model, self.outcome).inc()


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
