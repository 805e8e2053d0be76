"""Refused input, transport-free: what was wrong, where (a field path), and what kind of refusal.

The pipeline and the bottleneck raise `StepError`; only the transport turns its `Refusal`
into a gRPC status (canvaswatch.server.transport.status), so the core runs the same under
gRPC, in a worker process or offline (`canvaswatch check`, `eval`).
"""

from __future__ import annotations

import enum


class Refusal(enum.Enum):
    """Why a step or stream is refused; each maps to one status of the transport."""

    INVALID = "invalid"  # the client sent something malformed or out of order
    UNSUPPORTED = "unsupported"  # well-formed, but this sidecar is not configured for it
    UNAVAILABLE = "unavailable"  # nothing wrong with the input; retry later
    EXHAUSTED = "exhausted"  # over a configured bound (a size, a count, a per-client stream limit)
    DEADLINE = "deadline"  # the client was silent longer than the stream's deadline allows
    INTERNAL = "internal"  # the sidecar failed (a monitor worker died mid-request, say)


class StepError(Exception):
    """A refused step or stream. `message` reads `FIELD: what was wrong`, e.g.
    `message[3].topk.ids: shape [256, 8] disagrees with 8000 bytes of INT32`; `field` is the part
    before the colon (the field path), `refusal` the kind."""

    def __init__(self, message: str, refusal: Refusal = Refusal.INVALID) -> None:
        super().__init__(message)
        self.message = message
        self.refusal = refusal

    @property
    def field(self) -> str:
        head, sep, _ = self.message.partition(": ")
        return head if sep else ""


def invalid(message: str) -> StepError:
    return StepError(message, Refusal.INVALID)
