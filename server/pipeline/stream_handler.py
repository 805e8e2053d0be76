"""One Watch stream's message sequence over an Engine, transport-free.

The rules every transport shares: the first message carries the request's
info, states follow in order, one final message ends the stream and nothing
may come after it, and a stream that ends without its final message is
incomplete. The in-process servicer and the monitor worker processes both
drive this class, so the two modes cannot drift apart. Errors are StepError
(a refusal and a message naming the field); after one, the stream is over
and the transport aborts it with the status the refusal maps to.
"""

from __future__ import annotations

import enum

from canvaswatch.server.pipeline.wire import flag_to_pb, verdict_to_pb
from canvaswatch.server.errors import StepError, invalid
from canvaswatch.server.pipeline.engine import Engine
from canvaswatch.server.pipeline.session import Session
from canvaswatch.v1 import monitor_pb2 as pb

_DENSE_FORMS = ("logits", "embeddings")


class Outcome(str, enum.Enum):
    """How a request ended: the `outcome` label of canvaswatch_requests_total (values are the contract)."""

    OK = "ok"
    TRUNCATED = "truncated"  # ok, but the verdict left out flags past the per-request bounds (it says how many)
    INVALID = "invalid"  # refused: bad input, or a step the sidecar is not configured for
    INCOMPLETE = "incomplete"  # input ended without the final message
    CANCELLED = "cancelled"  # the client went away
    ERROR = "error"  # the sidecar failed (a bug, a monitor worker that died)


def is_dense(message: pb.StepState) -> bool:
    """A dense step (logits or embeddings): a [L, V] matrix in memory while it is decoded."""
    return message.WhichOneof("state") in _DENSE_FORMS


class StreamHandler:
    """Feed messages in arrival order; read `outcome` when the stream is over."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.session: Session | None = None
        self.index = 0
        self.finished = False
        self.outcome = Outcome.ERROR

    @property
    def request_id(self) -> str | None:
        return self.session.meta.request_id if self.session is not None else None

    def feed(self, message: pb.StepState) -> list[pb.MonitorEvent]:
        """The events this message raises (flags, and the verdict after the final one)."""
        where = f"message[{self.index}]"
        try:
            if self.finished:
                raise invalid(f"{where}: message after the final one")
            if self.session is None:
                if not message.HasField("info"):
                    raise invalid(f"{where}.info: required on the first message of a stream")
                self.session = self.engine.open(message.info, f"{where}.info")
            request_id = self.session.meta.request_id
            events = [pb.MonitorEvent(request_id=request_id, flag=flag_to_pb(flag))
                      for flag in self.engine.step(self.session, message, where)]
            if message.final:
                flags, verdict = self.engine.finish(self.session, message, where)
                events.extend(pb.MonitorEvent(request_id=request_id, flag=flag_to_pb(flag)) for flag in flags)
                events.append(pb.MonitorEvent(request_id=request_id, verdict=verdict_to_pb(verdict)))
                self.finished = True
                self.outcome = Outcome.TRUNCATED if verdict.flags_dropped else Outcome.OK
        except StepError:
            self.outcome = Outcome.INVALID
            raise
        self.index += 1
        return events

    def end(self) -> None:
        """The client closed its side; refuses a stream that never sent its final message."""
        if self.finished:
            return
        self.outcome = Outcome.INCOMPLETE
        if self.index:
            raise invalid(f"message[{self.index - 1}].final: the stream ended without a final message")
        raise invalid("stream: ended with no messages")

    def count(self) -> None:
        """Count the request once, under its outcome."""
        metrics = self.engine.metrics
        model = self.session.model_label if self.session is not None else metrics.model_label("")
        metrics.requests.labels(model, self.outcome.value).inc()
