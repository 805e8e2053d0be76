"""`python -m canvaswatch.server.ops.healthcheck HOST:PORT`: exit 0 when the sidecar reports SERVING (grpc.health.v1).

Used by the container's HEALTHCHECK; Kubernetes uses its native gRPC probes instead.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from canvaswatch.server.transport.status import SERVICE_NAME as SERVICE


def status(target: str, timeout: float = 2.0) -> str:
    """The service's health status name (SERVING, NOT_SERVING, ...), or why there is none."""
    with grpc.insecure_channel(target) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=timeout)
        except grpc.RpcError as err:
            return f"no answer ({err.code().name})"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def check(target: str, timeout: float = 2.0) -> bool:
    return status(target, timeout) == "SERVING"


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when SERVING; else 1, with one line saying what the sidecar answered (a container's health log)."""
    args = sys.argv[1:] if argv is None else argv
    target = args[0] if args else "127.0.0.1:50051"
    found = status(target)
    if found == "SERVING":
        return 0
    print(f"canvaswatch healthcheck: {target}: {found}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
