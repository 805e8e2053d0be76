"""The gRPC face of the engine: canvaswatch.v1.CanvasMonitor on grpc.aio.

Per stream, messages are handled in order, the next one read while this one is
handled. A `topk` step costs ~0.1-0.2 ms (decode and monitors, measured in
BENCHMARKS.md) and is handled on the event loop: a hop to a worker thread costs more than the work,
and with the GIL a thread would not run it in parallel anyway. Dense steps
(`logits`, `embeddings`: large torch ops that release the GIL) go to the
worker pool so the loop keeps serving other streams. Errors end only their
own stream, with a status that fits and a message naming the field.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

import grpc
import structlog

from canvaswatch.server.errors import Refusal, StepError
from canvaswatch.server.pipeline.engine import Engine
from canvaswatch.server.pipeline.stream_handler import Outcome, StreamHandler, is_heavy
from canvaswatch.server.pipeline.wire import verdict_to_pb
from canvaswatch.server.transport.lifecycle import StreamSlots, await_cancellation, watch_call
from canvaswatch.server.transport.messages import Undecodable, tolerant
from canvaswatch.server.transport.status import SERVICE_NAME, grpc_status
from canvaswatch.v1 import monitor_pb2 as pb
from canvaswatch.v1 import monitor_pb2_grpc as pb_grpc

log = structlog.get_logger(__name__)


class CanvasMonitorServicer(pb_grpc.CanvasMonitorServicer):
    def __init__(self, engine: Engine, executor: ThreadPoolExecutor, slots: StreamSlots) -> None:
        self.engine = engine  # new streams' engine; a reload (SIGHUP) swaps it with use()
        self.executor = executor
        self.slots = slots
        self._users: dict[Engine, int] = {}  # calls running on each engine
        self._retired: list[Engine] = []  # replaced engines that calls still use; closed when the last ends

    def use(self, engine: Engine) -> None:
        """New calls go to `engine`; calls already open finish on the old one, which is closed after them."""
        old, self.engine = self.engine, engine
        if old in self._users:
            self._retired.append(old)
        else:
            self.executor.submit(old.close)

    def close_retired(self) -> None:
        for engine in self._retired:
            engine.close()
        self._retired.clear()

    def _borrow(self) -> Engine:
        engine = self.engine
        self._users[engine] = self._users.get(engine, 0) + 1
        return engine

    def _give_back(self, engine: Engine) -> None:
        self._users[engine] -= 1
        if self._users[engine] == 0:
            del self._users[engine]
            if engine in self._retired:
                self._retired.remove(engine)
                self.executor.submit(engine.close)

    async def Watch(self, request_iterator: AsyncIterator[pb.StepState], context: grpc.aio.ServicerContext) -> AsyncIterator[pb.MonitorEvent]:
        engine = self._borrow()  # the stream stays on this engine even if a reload swaps self.engine
        handler = StreamHandler(engine)
        loop = asyncio.get_running_loop()

        def cancelled() -> None:
            handler.outcome = Outcome.CANCELLED

        try:
            async with watch_call(self.slots, context, request_id=lambda: handler.request_id,
                                  on_cancel=cancelled, on_end=handler.count):
                async with contextlib.aclosing(_read_ahead(request_iterator, self.slots)) as messages:
                    try:
                        async for message in messages:
                            if isinstance(message, Undecodable):
                                handler.outcome = Outcome.INVALID
                                raise message.refusal(f"message[{handler.index}]")
                            if is_heavy(message):
                                events = await loop.run_in_executor(self.executor, handler.feed, message)
                            else:
                                events = handler.feed(message)
                            for event in events:
                                yield event
                    except StepError as err:
                        if err.refusal is Refusal.DEADLINE and not handler.finished:
                            handler.outcome = Outcome.INCOMPLETE  # the client went silent before its final message
                        raise
                await await_cancellation(handler.finished)
                handler.end()
        finally:
            self._give_back(engine)

    async def Check(self, request: pb.Trace, context: grpc.aio.ServicerContext) -> pb.Verdict:
        loop = asyncio.get_running_loop()
        engine = self._borrow()
        try:
            if isinstance(request, Undecodable):
                raise request.refusal("request")
            verdict = await loop.run_in_executor(self.executor, engine.check_trace, request)
        except StepError as err:
            await context.abort(grpc_status(err.refusal), err.message)
        finally:
            self._give_back(engine)
        return verdict_to_pb(verdict)

    async def ListMonitors(self, request: pb.ListMonitorsRequest, context: grpc.aio.ServicerContext) -> pb.ListMonitorsResponse:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.refusal("request").message)
        return self.engine.list_monitors()


def service_handler(servicer: CanvasMonitorServicer, relayed_watch=None) -> grpc.GenericRpcHandler:
    """The CanvasMonitor service, its requests parsed by us (transport/messages.py) so that bytes which are
    not the message get INVALID_ARGUMENT, not UNKNOWN. `relayed_watch`: a Watch on raw bytes (monitor
    worker processes parse them) instead of the in-process one."""
    if relayed_watch is None:
        watch = grpc.stream_stream_rpc_method_handler(servicer.Watch, request_deserializer=tolerant(pb.StepState),
                                                      response_serializer=pb.MonitorEvent.SerializeToString)
    else:
        watch = grpc.stream_stream_rpc_method_handler(relayed_watch)
    return grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "Watch": watch,
        "Check": grpc.unary_unary_rpc_method_handler(
            servicer.Check, request_deserializer=tolerant(pb.Trace), response_serializer=pb.Verdict.SerializeToString),
        "ListMonitors": grpc.unary_unary_rpc_method_handler(
            servicer.ListMonitors, request_deserializer=tolerant(pb.ListMonitorsRequest),
            response_serializer=pb.ListMonitorsResponse.SerializeToString),
    })


async def _read_ahead(messages: AsyncIterator[pb.StepState], slots: StreamSlots | None = None) -> AsyncIterator[pb.StepState]:
    """The stream's messages in order, the read of the next one already under way while this one is handled.

    A top-k step is handled on the loop without yielding, so a read asked for after it would wait
    its whole trip through gRPC's completion queue and the poller thread with the loop idle; asked
    for before, that wait overlaps the monitors (1 stream at L = 1,024: 0.48 -> 0.53x the echo,
    BENCHMARKS.md). With `slots`, a client silent past the stream deadlines ends the stream (StepError).
    """
    iterator = messages.__aiter__()
    pending = asyncio.ensure_future(iterator.__anext__())
    index = 0
    try:
        while True:
            try:
                message = await (slots.receive(pending, index) if slots is not None else pending)
            except StopAsyncIteration:
                return
            index += 1
            pending = asyncio.ensure_future(iterator.__anext__())
            await asyncio.sleep(0)  # one loop turn: the read is submitted before the handler takes the loop
            yield message
    finally:
        if not pending.done():
            pending.cancel()
