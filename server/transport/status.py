"""The one place where transport-free refusals become gRPC statuses, and the service's name."""

from __future__ import annotations

import grpc

from canvaswatch.server.errors import Refusal
from canvaswatch.v1 import monitor_pb2 as pb

# canvaswatch.v1.CanvasMonitor, read from the generated descriptor so it cannot drift from proto/.
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CanvasMonitor"].full_name

_STATUS = {
    Refusal.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Refusal.UNSUPPORTED: grpc.StatusCode.UNIMPLEMENTED,
    Refusal.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Refusal.EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Refusal.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
    Refusal.INTERNAL: grpc.StatusCode.INTERNAL,
}


def grpc_status(refusal: Refusal) -> grpc.StatusCode:
    return _STATUS[refusal]
