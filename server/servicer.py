"""The gRPC face of the engine: canvaswatch.v1.CanvasMonitor on grpc.aio.

Per stream, messages are handled in order. A `topk` step costs well under a
millisecond of Python (decode and monitors, measured in BENCHMARKS.md) and is
handled on the event loop: a hop to a worker thread costs more than the work,
and with the GIL a thread would not run it in parallel anyway. Dense steps
(`logits`, `embeddings`: large torch ops that release the GIL) go to the
worker pool so the loop keeps serving other streams. Errors end only their
own stream, with a status that fits and a message naming the field.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

import grpc
import structlog

from canvaswatch.server.convert import flag_to_pb, verdict_to_pb
from canvaswatch.server.decode import StepError
from canvaswatch.server.engine import Engine
from canvaswatch.v1 import monitor_pb2 as pb
from canvaswatch.v1 import monitor_pb2_grpc as pb_grpc

log = structlog.get_logger(__name__)
_DENSE_FORMS = ("logits", "embeddings")


class CanvasMonitorServicer(pb_grpc.CanvasMonitorServicer):
    def __init__(self, engine: Engine, executor: ThreadPoolExecutor, max_streams: int) -> None:
        self.engine = engine
        self.executor = executor
        self.max_streams = max_streams
        self.active = 0

    async def Watch(self, request_iterator: AsyncIterator[pb.StepState], context: grpc.aio.ServicerContext) -> AsyncIterator[pb.MonitorEvent]:
        if self.active >= self.max_streams:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.active} streams open; limit is {self.max_streams}")
        self.active += 1
        metrics = self.engine.metrics
        metrics.active_streams.inc()
        session = None
        outcome = "error"
        failure: StepError | None = None
        loop = asyncio.get_running_loop()
        try:
            index = 0
            finished = False
            async for message in request_iterator:
                where = f"message[{index}]"
                if finished:
                    failure = StepError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: message after the final one")
                    break
                try:
                    if session is None:
                        if not message.HasField("info"):
                            raise StepError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}.info: required on the first message of a stream")
                        session = self.engine.open(message.info, f"{where}.info")
                    if message.WhichOneof("state") in _DENSE_FORMS:
                        flags = await loop.run_in_executor(self.executor, self.engine.step, session, message, where)
                    else:
                        flags = self.engine.step(session, message, where)
                    for flag in flags:
                        yield pb.MonitorEvent(request_id=session.meta.request_id, flag=flag_to_pb(flag))
                    if message.final:
                        flags, verdict = await loop.run_in_executor(self.executor, self.engine.finish, session, message, where)
                        for flag in flags:
                            yield pb.MonitorEvent(request_id=session.meta.request_id, flag=flag_to_pb(flag))
                        yield pb.MonitorEvent(request_id=session.meta.request_id, verdict=verdict_to_pb(verdict))
                        finished = True
                        outcome = "ok"
                except StepError as err:
                    failure = err
                    break
                index += 1
            if failure is None and not finished:
                outcome = "incomplete"
                where = f"message[{index - 1}].final" if index else "stream"
                failure = StepError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{where}: the stream ended without a final message" if index else "stream: ended with no messages",
                )
            if failure is not None:
                if outcome != "incomplete":
                    outcome = "invalid"
                log.warning("stream_rejected", request_id=session.meta.request_id if session else None,
                            code=failure.code.name, error=failure.message)
                await context.abort(failure.code, failure.message)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self.active -= 1
            metrics.active_streams.dec()
            model = session.model_label if session is not None else metrics.model_label("")
            metrics.requests.labels(model, outcome).inc()

    async def Check(self, request: pb.Trace, context: grpc.aio.ServicerContext) -> pb.Verdict:
        loop = asyncio.get_running_loop()
        try:
            verdict = await loop.run_in_executor(self.executor, self.engine.check_trace, request)
        except StepError as err:
            await context.abort(err.code, err.message)
        return verdict_to_pb(verdict)

    async def ListMonitors(self, request: pb.ListMonitorsRequest, context: grpc.aio.ServicerContext) -> pb.ListMonitorsResponse:
        return self.engine.list_monitors()
