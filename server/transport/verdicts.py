"""Recent verdicts by request id: GetVerdict (wire v1.2), for a serving frontend that holds output until judged.

A frontend that withholds a finished request's output until its verdict (the vLLM plugin's
`gate = "hold"`, docs/serving.md) runs in another process than the worker that streams the
request's steps, so it cannot read the verdict off the Watch stream. It asks here by request id:
every verdict the Watch RPC sends is also kept, and GetVerdict answers at once when the verdict is
known, or waits for it (at most `wait_s`, MAX_WAIT_S and the call's deadline).

Bounded: CAPACITY verdicts and MAX_BYTES of them (the oldest are forgotten first; the newest is
always kept, whatever its size: server.max_verdict_bytes bounds it), and MAX_WAITERS calls waiting
at once (beyond: RESOURCE_EXHAUSTED). Scoped: a verdict is kept under the bearer token of the Watch call
that produced it (a hash of it; "" without one) and is answered only to a call with the same token,
so with auth_tokens one tenant cannot read another's verdicts (their flags carry decoded snippets).
Authorization itself is the service's (transport/auth.py), as for Watch.

Only the event loop touches this (the relayed Watch yields every event there, GetVerdict runs there),
so it needs no lock; recording costs one parse of each event the stream sends (a flag or the
verdict: a few per request, never one per step).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import math
from typing import Any, AsyncIterator, Callable

import grpc
import structlog

from canvaswatch.server.transport.messages import Undecodable
from canvaswatch.v1 import monitor_pb2 as pb

log = structlog.get_logger(__name__)

CAPACITY = 4096     # verdicts kept: minutes of traffic at hundreds of requests a second; a frontend asks within seconds
# and at most this many bytes of them: a verdict is a few KB, but flag-heavy requests can send ones of up to
# server.max_verdict_bytes (1 MiB by default), which at CAPACITY would be 4 GiB
MAX_BYTES = 256 * 1024 * 1024
MAX_WAIT_S = 30.0   # the longest one GetVerdict call waits for a verdict not yet known
MAX_WAITERS = 4096  # GetVerdict calls waiting at once

Key = tuple[str, str]  # (caller: hash of its bearer token or "", request id)


def caller_of(context: grpc.aio.ServicerContext) -> str:
    """Who is asking: a hash of the call's bearer token ("" without one). Never the token itself."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return hashlib.sha256(value.encode()).hexdigest()[:32]
    return ""


class RecentVerdicts:
    """The last `capacity` verdicts by (caller, request id), and the GetVerdict calls waiting for one."""

    def __init__(self, capacity: int = CAPACITY, max_wait_s: float = MAX_WAIT_S, max_waiters: int = MAX_WAITERS,
                 max_bytes: int = MAX_BYTES) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.bytes = 0  # of the verdicts kept (their serialised size)
        self.max_wait_s = max_wait_s
        self.max_waiters = max_waiters
        self._verdicts: collections.OrderedDict[Key, tuple[pb.Verdict, int]] = collections.OrderedDict()
        self._waiters: dict[Key, list[asyncio.Future]] = {}
        self.waiting = 0
        self.counts: collections.Counter[str] = collections.Counter()  # recorded, evicted, found, not_found, refused

    def __len__(self) -> int:
        return len(self._verdicts)

    def record(self, caller: str, verdict: pb.Verdict, size: int | None = None) -> None:
        """Keep `verdict` (`size`: its serialised bytes, if known) and wake the calls waiting for it."""
        key = (caller, verdict.request_id)
        size = verdict.ByteSize() if size is None else size
        replaced = self._verdicts.pop(key, None)
        if replaced is not None:
            self.bytes -= replaced[1]
        self._verdicts[key] = (verdict, size)
        self.bytes += size
        self.counts["recorded"] += 1
        while len(self._verdicts) > 1 and (len(self._verdicts) > self.capacity or self.bytes > self.max_bytes):
            _, (_, evicted) = self._verdicts.popitem(last=False)
            self.bytes -= evicted
            self.counts["evicted"] += 1
        for waiter in self._waiters.pop(key, ()):
            if not waiter.done():
                waiter.set_result(verdict)

    def get(self, caller: str, request_id: str) -> pb.Verdict | None:
        kept = self._verdicts.get((caller, request_id))
        return None if kept is None else kept[0]

    async def wait(self, caller: str, request_id: str, wait_s: float) -> pb.Verdict | None:
        """The verdict, at once if known, else when it is recorded within `wait_s` (capped); None if not."""
        known = self.get(caller, request_id)
        if known is not None or wait_s <= 0:
            return known
        key = (caller, request_id)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, []).append(waiter)
        self.waiting += 1
        try:
            return await asyncio.wait_for(waiter, min(wait_s, self.max_wait_s))
        except TimeoutError:
            return None
        finally:
            self.waiting -= 1
            waiters = self._waiters.get(key)
            if waiters is not None:
                with contextlib.suppress(ValueError):
                    waiters.remove(waiter)
                if not waiters:
                    del self._waiters[key]

    # -- the RPC side ---------------------------------------------------------------------------

    def recording(self, watch: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
        """Wrap a Watch handler (events as bytes, or as messages): every verdict it sends is also kept here."""

        async def Watch(request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            caller = caller_of(context)
            # aclosing: when the call ends early, the inner handler's own cleanup runs now, not at garbage collection
            async with contextlib.aclosing(watch(request_iterator, context)) as events:
                async for event in events:
                    self._note(caller, event)
                    yield event

        return Watch

    def _note(self, caller: str, event: Any) -> None:
        try:
            message = pb.MonitorEvent.FromString(event) if isinstance(event, (bytes, bytearray)) else event
        except Exception:  # our own worker wrote these bytes; never let bookkeeping break the stream
            log.warning("verdict_cache_unparsed_event", size=len(event))
            return
        if message.WhichOneof("event") == "verdict":
            self.record(caller, message.verdict, len(event) if isinstance(event, (bytes, bytearray)) else None)

    async def GetVerdict(self, request: Any, context: grpc.aio.ServicerContext) -> pb.VerdictReply:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.refusal("request").message)
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: required (the Watch stream's request id)")
        if not (math.isfinite(request.wait_s) and request.wait_s >= 0):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"wait_s: must be a finite number >= 0, got {request.wait_s}")
        caller = caller_of(context)
        wait_s = request.wait_s
        remaining = context.time_remaining()
        if remaining is not None:
            wait_s = min(wait_s, max(0.0, remaining - 0.005))  # answer "not found" just before the client gives up
        if self.get(caller, request.request_id) is None and wait_s > 0 and self.waiting >= self.max_waiters:
            self.counts["refused"] += 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"GetVerdict: {self.waiting} calls already waiting for verdicts; limit is {self.max_waiters}")
        verdict = await self.wait(caller, request.request_id, wait_s)
        self.counts["found" if verdict is not None else "not_found"] += 1
        return pb.VerdictReply(found=True, verdict=verdict) if verdict is not None else pb.VerdictReply(found=False)


__all__ = ["CAPACITY", "MAX_BYTES", "MAX_WAITERS", "MAX_WAIT_S", "RecentVerdicts", "caller_of"]
