"""Bearer-token auth for the CanvasMonitor service (health and reflection stay open for probes)."""

from __future__ import annotations

import hmac
from typing import Awaitable, Callable

import grpc

PROTECTED_PREFIX = "/canvaswatch.v1.CanvasMonitor/"


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: list[str]) -> None:
        self._tokens = [t.encode() for t in tokens]

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(PROTECTED_PREFIX) or self._allowed(details):
            return handler
        return _denied(handler)

    def _allowed(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization" and value.startswith("Bearer "):
                offered = value[len("Bearer "):].encode()
                # compare against every token in constant time, so timing says nothing about which is close
                return any(hmac.compare_digest(offered, token) for token in self._tokens)
        return False


def _denied(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    message = "authorization: a valid 'Bearer <token>' is required"

    async def deny_unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny_unary, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(deny_unary, **kwargs)
