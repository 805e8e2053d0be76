"""The streams one step runner holds: frames in, serialised events and a typed status out.

Shared by the monitor worker processes (workers/child.py) and the in-process step threads
(workers/threads.py), so both modes parse, order, finish and count a stream the same way: each
stream's messages go through the same StreamHandler as everywhere, the protobuf parsing and the
events' serialisation happen here (off the gRPC event loop), and a stream's outcome is counted
once, when it is over.
"""

from __future__ import annotations

import threading
from typing import Callable

import structlog

from canvaswatch.monitors.compiled import LARGE_CANVAS
from canvaswatch.server.errors import Refusal, StepError
from canvaswatch.server.pipeline.engine import Engine
from canvaswatch.server.pipeline.stream_handler import Outcome, StreamHandler, is_dense
from canvaswatch.server.transport.messages import Undecodable
from canvaswatch.server.workers.protocol import CUT, Frame, StreamEnd, StreamStatus
from canvaswatch.v1 import monitor_pb2 as pb

log = structlog.get_logger(__name__)


class StreamTable:
    """Open streams' handlers on one engine, by stream id."""

    def __init__(self, engine: Engine, dense_slots: threading.Semaphore | None = None) -> None:
        self.engine = engine
        self.handlers: dict[int, StreamHandler] = {}
        # In-process, many step threads share the process: dense steps (a [L, V] logits matrix each)
        # take one of these slots, so at most server.workers of them are in memory at once.
        self.dense_slots = dense_slots
        # In-process: called (on the step thread, before the work) when a stream opens with a canvas of
        # LARGE_CANVAS positions or more, so its thread can step back in the OS's queue (StepRunner).
        self.on_large_canvas: Callable[[], None] | None = None

    def handle(self, kind: int, stream_id: int, body: bytes) -> tuple[int, list[bytes], StreamStatus | None] | None:
        """(stream id, serialised events, status or None) for a message or an end; None for an open, a
        cancel, or a frame of a stream that already ended here."""
        if kind == Frame.OPEN:
            self.handlers[stream_id] = StreamHandler(self.engine)
            return None
        handler = self.handlers.get(stream_id)
        if handler is None:
            return None  # the stream already ended here (an error) or was cancelled
        status: StreamStatus | None = None
        events: list[bytes] = []
        try:
            if kind == Frame.MESSAGE:
                try:
                    message = pb.StepState.FromString(body)
                except Exception:
                    handler.outcome = Outcome.INVALID
                    raise Undecodable(pb.StepState.DESCRIPTOR.full_name, len(body)).refusal(f"message[{handler.index}]") from None
                if (self.on_large_canvas is not None and handler.session is None and message.HasField("info")
                        and message.info.canvas_length >= LARGE_CANVAS):
                    self.on_large_canvas()
                # The stream stays open after its final message: a message after it is an error.
                # FINISHED tells the front not to wait for a cancellation when input ends.
                if self.dense_slots is not None and is_dense(message):
                    with self.dense_slots:
                        fed = handler.feed(message)
                else:
                    fed = handler.feed(message)
                events = [event.SerializeToString() for event in fed]
                if handler.finished:
                    status = StreamStatus(StreamEnd.FINISHED)
            elif kind == Frame.END:
                handler.end()
                status = StreamStatus(StreamEnd.OK)
            else:  # CANCEL: the front is gone; count it, answer nobody
                if not handler.finished:  # a client leaving after its verdict was served: that request is ok
                    handler.outcome = Outcome.INCOMPLETE if body == CUT else Outcome.CANCELLED
                handler.count()
                del self.handlers[stream_id]
                return None
        except StepError as err:
            log.warning("stream_rejected", request_id=handler.request_id, refusal=err.refusal.value, error=err.message)
            status = StreamStatus.refused(err)
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # a bug (or a SystemExit): end this stream, keep the runner and its other streams
            log.exception("stream_failed", request_id=handler.request_id)
            handler.outcome = Outcome.ERROR
            status = StreamStatus(StreamEnd.REFUSED, Refusal.INTERNAL, f"step runner: {type(err).__name__}: {err}")
        if status is not None and status.over:
            handler.count()
            del self.handlers[stream_id]
        return stream_id, events, status
