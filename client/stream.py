"""Stream one request's steps to a canvaswatch sidecar without ever blocking the serving loop.

    stream = WatchStream("127.0.0.1:50051", info)       # one per generation request
    stream.send(step)                                   # in the denoising loop: never blocks
    stream.send(step, signals=SamplerSignals(...))      # with the sampler's accepted mask, entropy, ...
    stream.finish(output_ids)                           # the final message is never dropped
    verdict = stream.result(timeout=5)                  # flags arrive earlier in stream.flags

A sender thread (grpc's request iterator) takes queued steps, builds any lazy
ones, stamps how many were dropped so far, and sends; a receiver thread
collects events. If the sidecar is slow or gone, steps are dropped by the
queue's policy and counted; the serving loop never waits. AsyncWatchStream is
the same for asyncio serving stacks.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import uuid
from typing import Any, AsyncIterator, Callable, Iterator, Sequence

import grpc

from canvaswatch.client.queueing import StepQueue
from canvaswatch.client.sampler_signals import SamplerSignals
from canvaswatch.v1 import monitor_pb2 as pb
from canvaswatch.v1 import monitor_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
StepPayload = pb.StepState | Callable[[], pb.StepState]


log = logging.getLogger("canvaswatch.client")
CHANNEL_CLOSE_S = 5.0  # how long closing a channel may take before the caller goes on without it


def close_channel(channel: grpc.Channel, timeout_s: float = CHANNEL_CLOSE_S) -> bool:
    """Close `channel`, waiting at most `timeout_s`; whether it closed in that time.

    grpc's Channel.close() returns only once every call on the channel has ended, and a call whose
    message is part-way out to a frozen peer (a SIGSTOPped sidecar, full flow-control windows) does
    not end while the peer stays frozen: seen with a shared channel and 4 MB steps. A serving
    stack's shutdown must not wait on that, so the close runs on a daemon thread and is left to
    finish, or not, once the timeout has passed (logged).
    """
    closer = threading.Thread(target=channel.close, name="canvaswatch-channel-close", daemon=True)
    closer.start()
    closer.join(timeout_s)
    if closer.is_alive():
        log.warning("canvaswatch: the gRPC channel to the sidecar did not close within %.1f s (calls still "
                    "in flight to a peer that does not read); left closing in the background", timeout_s)
        return False
    return True


class WatchError(RuntimeError):
    """The stream ended without a verdict; `code` is the gRPC status when there was one."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


def new_request_id() -> str:
    return uuid.uuid4().hex


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes)]


class _StreamCore:
    """What the sync and async streams share: the queue, message building, event bookkeeping."""

    def __init__(self, info: pb.RequestInfo, max_pending: int, drop_policy: str,
                 on_event: Callable[[pb.MonitorEvent], None] | None, on_put: Callable[[], None] | None = None) -> None:
        if not info.request_id:
            named = pb.RequestInfo()
            named.CopyFrom(info)
            named.request_id = new_request_id()
            info = named
        self.info = info
        self.queue = StepQueue(max_pending, drop_policy, on_put=on_put)
        self.flags: list[pb.Flag] = []
        self.verdict: pb.Verdict | None = None
        self.error: WatchError | None = None
        self._on_event = on_event
        self._first = True
        self._finished = False
        self.build_errors = 0  # queued steps whose message could not be built (dropped, counted in `dropped`)
        self.build_error: str | None = None  # the first such failure

    @property
    def request_id(self) -> str:
        return self.info.request_id

    @property
    def dropped(self) -> int:
        return self.queue.dropped

    def count_dropped(self, steps: int) -> None:
        """Count steps the caller dropped before they reached the queue (an adapter's own bounded queue)."""
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self.queue.count_dropped(steps)

    def enqueue(self, step: StepPayload, signals: SamplerSignals | None = None) -> bool:
        if self._finished:
            raise RuntimeError("send() after finish()")
        if self.error is not None:
            self.queue.count_dropped(1)  # the stream is gone; count, never raise into the serving loop
            return False
        if signals is not None:
            # Encoded with the message, on the sender thread: the serving loop only queues.
            step = functools.partial(_with_signals, step, signals)
        return self.queue.put(step)

    def enqueue_final(self, output_ids: Sequence[int], step: StepPayload | None) -> None:
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        self.queue.put((step, list(output_ids)), final=True)
        self.queue.close()

    def build(self, item: Any, final: bool) -> pb.StepState:
        if final:
            payload, output_ids = item
            message = _materialise(payload) if payload is not None else pb.StepState()
            message.final = True
            message.output_ids[:] = output_ids
        else:
            message = _materialise(item)
        if self._first:
            message.info.CopyFrom(self.info)
            self._first = False
        message.client_dropped_steps = self.queue.dropped
        return message

    def message_for(self, item: Any) -> pb.StepState | None:
        """The message for a queued item, on the sender thread. A step that cannot be built (a lazy step's
        error, bad sampler signals) is dropped and counted, not the end of the stream: None. A final whose
        step cannot be built goes without that step, so the sidecar still gets the output and gives a verdict."""
        try:
            return self.build(item.payload, item.final)
        except Exception as err:  # noqa: BLE001 - one bad step must not end the request's monitoring
            self.build_errors += 1
            if self.build_error is None:
                self.build_error = f"{type(err).__name__}: {err}"
                log.warning("canvaswatch: request %s: a step could not be built and was dropped: %s",
                            self.request_id, self.build_error)
            self.queue.count_dropped(1)
            if item.final:
                return self.build((None, item.payload[1]), True)
            return None

    def receive(self, event: pb.MonitorEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "flag":
            self.flags.append(event.flag)
        elif kind == "verdict":
            self.verdict = event.verdict
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # a user callback must not kill the receiver
                pass

    def fail(self, err: BaseException) -> None:
        if isinstance(err, WatchError):
            self.error = err
        elif isinstance(err, grpc.RpcError) and hasattr(err, "code"):
            self.error = WatchError(f"{err.code().name}: {err.details()}", err.code())
        else:
            self.error = WatchError(f"{type(err).__name__}: {err}")
        self.queue.abandon()


def _with_signals(payload: StepPayload, signals: SamplerSignals) -> pb.StepState:
    return signals.fill(_materialise(payload))


def _materialise(payload: StepPayload) -> pb.StepState:
    message = payload() if callable(payload) else payload
    if not isinstance(message, pb.StepState):
        raise TypeError(f"a step must be a StepState or build one, got {type(message).__name__}")
    return message


class WatchStream:
    """A Watch stream fed from synchronous code (e.g. a transformers streamer)."""

    def __init__(self, target: str | grpc.Channel, info: pb.RequestInfo, *, max_pending: int = 64,
                 drop_policy: str = "oldest", metadata: Sequence[tuple[str, str]] = (),
                 on_event: Callable[[pb.MonitorEvent], None] | None = None) -> None:
        self._core = _StreamCore(info, max_pending, drop_policy, on_event)
        self._owns_channel = isinstance(target, str)
        self._channel = grpc.insecure_channel(target, options=channel_options()) if isinstance(target, str) else target
        stub = pb_grpc.CanvasMonitorStub(self._channel)
        self._call = stub.Watch(self._requests(), metadata=list(metadata))
        self._done = threading.Event()
        self._receiver = threading.Thread(target=self._receive, name=f"canvaswatch-recv-{self.request_id[:8]}", daemon=True)
        self._receiver.start()

    request_id = property(lambda self: self._core.request_id)
    dropped = property(lambda self: self._core.dropped,
                       doc="Steps dropped so far (queue full, stream gone, or a step that could not be built).")
    build_error = property(lambda self: self._core.build_error, doc="Why the first step that could not be built failed.")
    flags = property(lambda self: list(self._core.flags), doc="Flags received so far.")

    @property
    def done(self) -> bool:
        """The call has ended: the verdict arrived, or the stream failed or was cancelled."""
        return self._done.is_set()

    def count_dropped(self, steps: int) -> None:
        """Count `steps` the caller dropped before send(), so client_dropped_steps and the verdict include them."""
        self._core.count_dropped(steps)

    def send(self, step: StepPayload, signals: SamplerSignals | None = None) -> bool:
        """Queue a step; never blocks. Returns False if it (or nothing) was dropped by the policy.

        `signals` (one canvas [L], tensors on any device) are written into the message by
        SamplerSignals.fill on the sender thread, when the step is built: like a lazy step,
        they must not be modified in place after send().
        """
        return self._core.enqueue(step, signals)

    def finish(self, output_ids: Sequence[int], step: StepPayload | None = None) -> None:
        """Queue the final message (with an optional last state); never dropped, never blocks."""
        self._core.enqueue_final(output_ids, step)

    def result(self, timeout: float | None = None) -> pb.Verdict:
        """Wait for the verdict; raises WatchError if the stream failed or timed out."""
        if not self._done.wait(timeout):
            raise WatchError(f"no verdict within {timeout} s", grpc.StatusCode.DEADLINE_EXCEEDED)
        if self._core.verdict is None:
            raise self._core.error or WatchError("stream ended without a verdict")
        return self._core.verdict

    def cancel(self) -> None:
        self._call.cancel()
        self._core.queue.abandon()

    def close(self) -> None:
        if not self._done.is_set():
            self.cancel()
        self._receiver.join(timeout=5)
        if self._owns_channel:
            close_channel(self._channel)

    def _requests(self) -> Iterator[pb.StepState]:
        while True:
            item = self._core.queue.get()
            if item is None:
                return
            message = self._core.message_for(item)
            if message is not None:
                yield message
            if item.final:
                return

    def _receive(self) -> None:
        try:
            for event in self._call:
                self._core.receive(event)
        except grpc.RpcError as err:
            if self._core.verdict is None:
                self._core.fail(err)
        except Exception as err:
            self._core.fail(err)
        finally:
            self._done.set()

    def __enter__(self) -> "WatchStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncWatchStream:
    """The same stream for asyncio code: send() is a plain (non-async) call that never waits."""

    def __init__(self, channel: grpc.aio.Channel, info: pb.RequestInfo, *, max_pending: int = 64,
                 drop_policy: str = "oldest", metadata: Sequence[tuple[str, str]] = (),
                 on_event: Callable[[pb.MonitorEvent], None] | None = None) -> None:
        self._wakeup = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._core = _StreamCore(info, max_pending, drop_policy, on_event, on_put=self._wake)
        self._call = pb_grpc.CanvasMonitorStub(channel).Watch(self._requests(), metadata=list(metadata))
        self._receiver = asyncio.create_task(self._receive())

    request_id = property(lambda self: self._core.request_id)
    dropped = property(lambda self: self._core.dropped)
    build_error = property(lambda self: self._core.build_error)
    flags = property(lambda self: list(self._core.flags))

    def send(self, step: StepPayload, signals: SamplerSignals | None = None) -> bool:
        """Queue a step from any thread; False (counted in `dropped`) if it was dropped, or if the stream's
        event loop has closed (generation in an executor thread outliving its server's loop)."""
        if self._loop.is_closed():
            self._core.count_dropped(1)
            return False
        return self._core.enqueue(step, signals)

    def finish(self, output_ids: Sequence[int], step: StepPayload | None = None) -> None:
        self._core.enqueue_final(output_ids, step)

    def _wake(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._wakeup.set)
        except RuntimeError:  # the loop closed: nothing will send this stream's steps any more
            pass

    async def result(self, timeout: float | None = None) -> pb.Verdict:
        try:
            await asyncio.wait_for(asyncio.shield(self._receiver), timeout)
        except asyncio.TimeoutError:
            raise WatchError(f"no verdict within {timeout} s", grpc.StatusCode.DEADLINE_EXCEEDED) from None
        if self._core.verdict is None:
            raise self._core.error or WatchError("stream ended without a verdict")
        return self._core.verdict

    def cancel(self) -> None:
        self._call.cancel()
        self._core.queue.abandon()

    async def _requests(self) -> AsyncIterator[pb.StepState]:
        while True:
            item = self._core.queue.get_nowait()
            if item is None:
                if self._core.queue.closed:
                    return
                self._wakeup.clear()
                if len(self._core.queue) == 0 and not self._core.queue.closed:
                    await self._wakeup.wait()
                continue
            message = self._core.message_for(item)
            if message is not None:
                yield message
            if item.final:
                return

    async def _receive(self) -> None:
        try:
            async for event in self._call:
                self._core.receive(event)
        except grpc.RpcError as err:
            if self._core.verdict is None:
                self._core.fail(err)
        except asyncio.CancelledError:
            # grpc.aio ends a call cancelled on this side (cancel(), or its channel closing) with
            # CancelledError, not an RpcError as the sync API does. Record it like the sync stream,
            # so result() raises WatchError: a CancelledError escaping result() would read as the
            # caller's own task being cancelled, and gets past `except Exception` fail-open code.
            # A cancellation of this task itself (the loop shutting down) still propagates.
            if not self._call.cancelled() or asyncio.current_task().cancelling():
                raise
            self._core.fail(WatchError("CANCELLED: the call was cancelled on the client", grpc.StatusCode.CANCELLED))
        except Exception as err:
            self._core.fail(err)
