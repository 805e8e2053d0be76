"""The gRPC face of the engine: canvaswatch.v1.CanvasMonitor on grpc.aio.

The event loop serves every stream, health and signals, so it does no per-step work: Watch
relays each stream's raw bytes to a step thread (in-process, workers/threads.py) or a monitor
worker process (workers/pool.py), which parses, decodes, monitors and serialises
(transport/relay.py); Check runs on a step thread; ListMonitors is a lookup; GetVerdict answers
from the recent verdicts Watch sent (transport/verdicts.py). Errors end only
their own stream, with a status that fits and a message naming the field.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import grpc
import structlog

from canvaswatch.server.pipeline.engine import Engine
from canvaswatch.server.pipeline.wire import verdict_to_pb
from canvaswatch.server.transport.lifecycle import StreamSlots, watch_call
from canvaswatch.server.transport.messages import Undecodable, tolerant
from canvaswatch.server.transport.status import SERVICE_NAME
from canvaswatch.server.transport.verdicts import RecentVerdicts
from canvaswatch.v1 import monitor_pb2 as pb
from canvaswatch.v1 import monitor_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from canvaswatch.server.workers.threads import StepThreads

log = structlog.get_logger(__name__)


class CanvasMonitorServicer(pb_grpc.CanvasMonitorServicer):
    def __init__(self, engine: Engine, executor: ThreadPoolExecutor, slots: StreamSlots) -> None:
        self.engine = engine  # new streams' engine; a reload (SIGHUP) swaps it with use()
        self.executor = executor  # engine closes only: every step and Check runs on a step thread
        self.slots = slots
        self.threads: StepThreads | None = None  # set by the sidecar once built (they borrow engines from here)
        self._users: dict[Engine, int] = {}  # calls running on each engine
        self._retired: list[Engine] = []  # replaced engines that calls still use; closed when the last ends
        self.verdicts = RecentVerdicts()  # every Watch verdict, for GetVerdict (transport/verdicts.py)

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

    def borrow(self) -> Engine:
        engine = self.engine
        self._users[engine] = self._users.get(engine, 0) + 1
        return engine

    def give_back(self, engine: Engine) -> None:
        self._users[engine] -= 1
        if self._users[engine] == 0:
            del self._users[engine]
            if engine in self._retired:
                self._retired.remove(engine)
                self.executor.submit(engine.close)

    async def Check(self, request: pb.Trace, context: grpc.aio.ServicerContext) -> pb.Verdict:
        # A Check holds a stream slot while it runs, under the same limits (total, per peer, per token), the
        # drain and its deadline as a Watch: each one in flight holds a step thread and its decoded trace.
        async with watch_call(self.slots, context, request_id=lambda: _request_id(request)):
            engine = self.borrow()
            try:
                if isinstance(request, Undecodable):
                    raise request.refusal("request")
                verdict = await self.threads.check(engine, request)  # under server.monitor_hard_deadline_s
            finally:
                self.give_back(engine)
        return verdict_to_pb(verdict)

    async def ListMonitors(self, request: pb.ListMonitorsRequest, context: grpc.aio.ServicerContext) -> pb.ListMonitorsResponse:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.refusal("request").message)
        return self.engine.list_monitors()


def _request_id(request: pb.Trace | Undecodable) -> str | None:
    return None if isinstance(request, Undecodable) else request.info.request_id or None


def service_handler(servicer: CanvasMonitorServicer, relayed_watch) -> grpc.GenericRpcHandler:
    """The CanvasMonitor service, its requests parsed by us (transport/messages.py) so that bytes which are
    not the message get INVALID_ARGUMENT, not UNKNOWN. `relayed_watch`: Watch on raw bytes, which a step
    thread or a monitor worker process parses (transport/relay.py); the verdicts it sends are kept for
    GetVerdict (transport/verdicts.py)."""
    watch = grpc.stream_stream_rpc_method_handler(servicer.verdicts.recording(relayed_watch))
    return grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "Watch": watch,
        "Check": grpc.unary_unary_rpc_method_handler(
            servicer.Check, request_deserializer=tolerant(pb.Trace), response_serializer=pb.Verdict.SerializeToString),
        "ListMonitors": grpc.unary_unary_rpc_method_handler(
            servicer.ListMonitors, request_deserializer=tolerant(pb.ListMonitorsRequest),
            response_serializer=pb.ListMonitorsResponse.SerializeToString),
        "GetVerdict": grpc.unary_unary_rpc_method_handler(
            servicer.verdicts.GetVerdict, request_deserializer=tolerant(pb.VerdictRequest),
            response_serializer=pb.VerdictReply.SerializeToString),
    })
