"""The Watch RPC: the gRPC process's event loop relays raw bytes to whoever does the work.

Registered with no deserialiser, so the loop never parses a StepState or builds a MonitorEvent:
it forwards each message's bytes to the stream's step runner (an in-process step thread,
workers/threads.py, or a monitor worker process, workers/pool.py) and writes back the event
bytes the runner produced. Stream limits, deadlines, the active-streams gauge and cancellation
stay here; everything about the messages themselves (order, validation, the verdict, the
outcome label) is the runner's StreamHandler. Reading runs ahead of the runner by up to WINDOW
messages and WINDOW_BYTES (workers/pool.py), so receiving overlaps the monitors, and a slow
runner slows its own stream's reads (gRPC flow control then pushes back on the client) instead
of queueing without bound.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import grpc
import structlog

from canvaswatch.server.errors import StepError
from canvaswatch.server.ops.metrics import Metrics
from canvaswatch.server.pipeline.stream_handler import Outcome
from canvaswatch.server.transport.lifecycle import StreamSlots, await_cancellation, watch_call
from canvaswatch.server.transport.servicer import CanvasMonitorServicer, service_handler
from canvaswatch.server.workers.pool import MonitorWorkers, RelayStream
from canvaswatch.server.workers.protocol import StreamEnd, StreamStatus
from canvaswatch.server.workers.threads import StepThreads

log = structlog.get_logger(__name__)


class RelayWatch:
    def __init__(self, workers: "MonitorWorkers | StepThreads", metrics: Metrics, slots: StreamSlots) -> None:
        self.workers = workers
        self.metrics = metrics
        self.slots = slots  # the in-process servicer's: one limit for the server, whoever serves Watch

    async def Watch(self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        # The worker counts the request and logs a refusal (it knows the request id); the front only
        # relays, except for a stream whose worker died, which nobody else can count.
        async with watch_call(self.slots, context, log_refusal=False):
            stream = self.workers.open_stream()
            pump = asyncio.get_running_loop().create_task(self._pump(request_iterator, stream))
            try:
                while True:
                    events, status = await stream.results.get()
                    for event in events:
                        yield event
                    if status is None:
                        continue
                    if status.end is StreamEnd.FINISHED:  # the worker has the final message; the verdict came with it
                        stream.finished = True
                    elif status.end is StreamEnd.INPUT_ENDED:
                        await await_cancellation(stream.finished)
                        self.workers.end_input(stream)
                    elif status.end is StreamEnd.OK:
                        break
                    else:
                        if status.end is StreamEnd.LOST:
                            self.metrics.requests.labels(self.metrics.model_label(""), Outcome.ERROR.value).inc()
                        raise status.error()
            finally:
                pump.cancel()
                # cancels it in the worker unless it already ended there
                self.workers.release(stream, cut=self.slots.cut_message is not None)

    async def _pump(self, request_iterator: AsyncIterator[bytes], stream: RelayStream) -> None:
        try:
            async for raw in self.slots.reads(request_iterator):
                if stream.full():
                    await stream.wait_for_room()
                if stream.done:
                    return
                stream.send(raw)
            # Only once every message is answered, so Watch knows whether the final one was among them.
            await stream.wait_for_room(limit=1)
            if not stream.done:
                stream.results.put_nowait(([], StreamStatus(StreamEnd.INPUT_ENDED)))  # Watch decides: half-close or cancellation
        except StepError as err:  # silent past a deadline: the worker ends the stream as a half-close would
            if not stream.done:
                self.workers.end_input(stream)
                stream.results.put_nowait(([], StreamStatus.refused(err)))
        except asyncio.CancelledError:
            raise
        except Exception as err:  # the call is ending (cancelled, too large a message); Watch sees it too
            log.debug("relay_read_ended", error=f"{type(err).__name__}: {err}")


def relay_handler(relay: RelayWatch, servicer: CanvasMonitorServicer) -> grpc.GenericRpcHandler:
    """The CanvasMonitor service with Watch relayed as bytes and the other methods in-process."""
    return service_handler(servicer, relayed_watch=relay.Watch)
