"""The Watch RPC when monitor worker processes do the work: the gRPC process relays raw bytes.

Registered with no deserialiser, so the front never parses a StepState or
builds a MonitorEvent: it forwards each message's bytes to the stream's
worker and writes back the event bytes the worker produced. Stream limits,
the active-streams gauge and cancellation stay here; everything about the
messages themselves (order, validation, the verdict, the outcome label) is
the worker's StreamHandler, as in-process. Check and ListMonitors are cheap
or rare and stay on the front's own engine.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import grpc
import structlog

from canvaswatch.server.bottleneck.step_decoder import StepError
from canvaswatch.server.ops.metrics import Metrics
from canvaswatch.server.workers.pool import MonitorWorkers, RelayStream
from canvaswatch.server.transport.servicer import CanvasMonitorServicer
from canvaswatch.server.pipeline.stream_handler import CANCEL_GRACE_S, StreamSlots
from canvaswatch.v1 import monitor_pb2 as pb

log = structlog.get_logger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CanvasMonitor"].full_name


class RelayWatch:
    def __init__(self, workers: MonitorWorkers, metrics: Metrics, slots: StreamSlots) -> None:
        self.workers = workers
        self.metrics = metrics
        self.slots = slots  # the in-process servicer's: one limit for the server, whoever serves Watch

    async def Watch(self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async with self.slots.held(context):
            try:
                stream = self.workers.open_stream()
            except StepError as err:
                await context.abort(err.code, err.message)
            pump = asyncio.get_running_loop().create_task(self._pump(request_iterator, stream))
            try:
                while True:
                    events, status = await stream.results.get()
                    for event in events:
                        yield event
                    if status is None:
                        continue
                    if status[0] == "finished":  # the worker has the final message; the verdict came with it
                        stream.finished = True
                        continue
                    if status[0] == "input_ended":
                        if not stream.finished:
                            await asyncio.sleep(CANCEL_GRACE_S)  # a cancellation lands here as CancelledError
                        self.workers.end_input(stream)
                        continue
                    if status[0] == "ok":
                        break
                    if status[0] == "lost":  # the worker died: nobody else counts this request
                        self.metrics.requests.labels(self.metrics.model_label(""), "error").inc()
                    await context.abort(grpc.StatusCode[status[1]], status[2])
            finally:
                pump.cancel()
                self.workers.release(stream)  # cancels it in the worker unless it already ended there

    async def _pump(self, request_iterator: AsyncIterator[bytes], stream: RelayStream) -> None:
        try:
            async for raw in request_iterator:
                await stream.wait_for_room()
                if stream.done:
                    return
                stream.send(raw)
            # Only once every message is answered, so Watch knows whether the final one was among them.
            await stream.wait_for_room(limit=1)
            if not stream.done:
                stream.results.put_nowait(([], ("input_ended",)))  # Watch decides: half-close or cancellation
        except asyncio.CancelledError:
            raise
        except Exception as err:  # the call is ending (cancelled, too large a message); Watch sees it too
            log.debug("relay_read_ended", error=f"{type(err).__name__}: {err}")


def relay_handler(relay: RelayWatch, servicer: CanvasMonitorServicer) -> grpc.GenericRpcHandler:
    """The CanvasMonitor service with Watch relayed as bytes and the other methods in-process."""
    return grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "Watch": grpc.stream_stream_rpc_method_handler(relay.Watch),
        "Check": grpc.unary_unary_rpc_method_handler(
            servicer.Check, request_deserializer=pb.Trace.FromString, response_serializer=pb.Verdict.SerializeToString),
        "ListMonitors": grpc.unary_unary_rpc_method_handler(
            servicer.ListMonitors, request_deserializer=pb.ListMonitorsRequest.FromString,
            response_serializer=pb.ListMonitorsResponse.SerializeToString),
    })
