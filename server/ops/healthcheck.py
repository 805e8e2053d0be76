"""`python -m canvaswatch.server.ops.healthcheck HOST:PORT`: exit 0 when the sidecar reports SERVING (grpc.health.v1).

Used by the container's HEALTHCHECK; Kubernetes uses its native gRPC probes instead.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from canvaswatch.server.transport.status import SERVICE_NAME as SERVICE


def check(target: str, timeout: float = 2.0) -> bool:
    with grpc.insecure_channel(target) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=timeout)
        except grpc.RpcError:
            return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    return 0 if check(args[0] if args else "127.0.0.1:50051") else 1


if __name__ == "__main__":
    sys.exit(main())
