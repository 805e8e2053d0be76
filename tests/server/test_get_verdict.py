"""GetVerdict (wire v1.2): the verdict of a recent Watch stream by request id, over real gRPC on loopback.

A serving frontend that holds a finished request's output until its verdict (the vLLM plugin's
gate = "hold") asks for it here: known verdicts come back at once, a verdict still being judged
when it arrives, an unknown id after the wait (never past the call's deadline); the cache is
bounded and scoped to the bearer token of the Watch call that produced the verdict.
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from canvaswatch.client import simulate
from canvaswatch.client.replay import replay
from canvaswatch.server.transport.verdicts import RecentVerdicts
from canvaswatch.v1 import monitor_pb2 as pb
from canvaswatch.v1 import monitor_pb2_grpc as pb_grpc
from tests.conftest import start_sidecar


def _trace(vocab, kind: str, request_id: str) -> pb.Trace:
    return simulate.scenario(kind, vocab.encode, vocab.size, request_id=request_id, seed=1)


def test_a_finished_streams_verdict_is_answered_by_request_id(sidecar, vocab):
    with sidecar.channel() as channel:
        stub = pb_grpc.CanvasMonitorStub(channel)
        streamed = replay(_trace(vocab, "surviving_phrase", "held-1"), channel)
        reply = stub.GetVerdict(pb.VerdictRequest(request_id="held-1"), timeout=5)
        assert reply.found and reply.verdict == streamed
        assert reply.verdict.max_severity == pb.CRITICAL  # the phrase survived to the output
        # an id never streamed: answered at once without a wait, after the wait with one
        started = time.monotonic()
        assert not stub.GetVerdict(pb.VerdictRequest(request_id="never"), timeout=5).found
        assert not stub.GetVerdict(pb.VerdictRequest(request_id="never", wait_s=0.3), timeout=5).found
        assert 0.3 <= time.monotonic() - started < 3.0


def test_a_call_waiting_for_a_verdict_gets_it_when_the_stream_ends(sidecar, vocab):
    with sidecar.channel() as channel:
        stub = pb_grpc.CanvasMonitorStub(channel)
        answer: dict = {}

        def ask() -> None:
            started = time.monotonic()
            answer["reply"] = stub.GetVerdict(pb.VerdictRequest(request_id="later-1", wait_s=20), timeout=25)
            answer["seconds"] = time.monotonic() - started

        waiting = threading.Thread(target=ask)
        waiting.start()
        time.sleep(0.2)  # the call waits before the stream has even opened
        streamed = replay(_trace(vocab, "clean", "later-1"), channel)
        waiting.join(25)
        assert answer["reply"].found and answer["reply"].verdict == streamed
        assert answer["seconds"] < 15  # woken by the verdict, not by the 20 s wait
        assert sidecar.thread.sidecar.servicer.verdicts.waiting == 0


def test_the_wait_ends_before_the_calls_deadline(sidecar):
    with sidecar.channel() as channel:
        stub = pb_grpc.CanvasMonitorStub(channel)
        started = time.monotonic()
        try:
            reply = stub.GetVerdict(pb.VerdictRequest(request_id="nobody", wait_s=30), timeout=0.5)
            assert not reply.found
        except grpc.RpcError as err:  # a loaded machine may miss the 5 ms margin: the client's deadline then
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 3.0


def test_bad_requests_are_refused_naming_the_field(sidecar):
    with sidecar.channel() as channel:
        stub = pb_grpc.CanvasMonitorStub(channel)
        for request, field in ((pb.VerdictRequest(), "request_id"),
                               (pb.VerdictRequest(request_id="x", wait_s=-1), "wait_s"),
                               (pb.VerdictRequest(request_id="x", wait_s=float("nan")), "wait_s")):
            with pytest.raises(grpc.RpcError) as refused:
                stub.GetVerdict(request, timeout=5)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in refused.value.details()
        raw = channel.unary_unary("/canvaswatch.v1.CanvasMonitor/GetVerdict")
        with pytest.raises(grpc.RpcError) as garbage:
            raw(b"\xff\xff\xff", timeout=5)
        assert garbage.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_auth_is_watchs_and_a_verdict_is_answered_only_to_its_own_token(vocab, tmp_path):
    running = start_sidecar(vocab, tmp_path, {"server": {"auth_tokens": ["tenant-a", "tenant-b"]}})
    a, b = [("authorization", "Bearer tenant-a")], [("authorization", "Bearer tenant-b")]
    try:
        with running.channel() as channel:
            stub = pb_grpc.CanvasMonitorStub(channel)
            with pytest.raises(grpc.RpcError) as denied:
                stub.GetVerdict(pb.VerdictRequest(request_id="mine"), timeout=5)
            assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as wrong:
                stub.GetVerdict(pb.VerdictRequest(request_id="mine"), timeout=5,
                                metadata=[("authorization", "Bearer nope")])
            assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
            streamed = replay(_trace(vocab, "clean", "mine"), channel, metadata=a)
            assert not stub.GetVerdict(pb.VerdictRequest(request_id="mine"), timeout=5, metadata=b).found
            mine = stub.GetVerdict(pb.VerdictRequest(request_id="mine"), timeout=5, metadata=a)
            assert mine.found and mine.verdict == streamed
    finally:
        running.thread.stop()


def test_the_cache_keeps_only_the_newest_verdicts_and_no_stale_waiters():
    async def scenario() -> None:
        cache = RecentVerdicts(capacity=3, max_wait_s=0.2, max_waiters=2)
        for n in range(5):
            cache.record("", pb.Verdict(request_id=f"r{n}", steps_seen=n))
        assert len(cache) == 3 and cache.counts["evicted"] == 2
        assert cache.get("", "r0") is None and cache.get("", "r1") is None
        assert cache.get("", "r4").steps_seen == 4 and cache.get("other-caller", "r4") is None
        # a verdict recorded again (a stream id reused) replaces the old one and counts as newest
        cache.record("", pb.Verdict(request_id="r2", steps_seen=20))
        cache.record("", pb.Verdict(request_id="r5"))
        assert cache.get("", "r2").steps_seen == 20 and cache.get("", "r3") is None
        # waiting: capped by max_wait_s; a timed-out waiter leaves nothing behind
        started = time.monotonic()
        assert await cache.wait("", "unknown", 60) is None
        assert 0.15 < time.monotonic() - started < 2.0
        assert cache.waiting == 0 and not cache._waiters
        pending = asyncio.ensure_future(cache.wait("", "soon", 5))
        await asyncio.sleep(0.01)
        assert cache.waiting == 1
        cache.record("", pb.Verdict(request_id="soon", steps_seen=7))
        assert (await pending).steps_seen == 7 and cache.waiting == 0 and not cache._waiters

    asyncio.run(scenario())


def test_the_cache_is_bounded_by_bytes_too_and_always_keeps_the_newest():
    # 4,096 verdicts of server.max_verdict_bytes each would be 4 GiB: bytes bound the cache as well.
    big = "x" * 1000
    cache = RecentVerdicts(capacity=100, max_bytes=3500)
    for n in range(5):
        cache.record("", pb.Verdict(request_id=f"r{n}", monitor_errors=[big]))
    assert len(cache) == 3 and cache.bytes <= 3500 and cache.counts["evicted"] == 2
    assert cache.get("", "r1") is None and cache.get("", "r2") is not None
    assert cache.bytes == sum(cache.get("", f"r{n}").ByteSize() for n in (2, 3, 4))
    cache.record("", pb.Verdict(request_id="huge", monitor_errors=["y" * 10_000]))  # alone past the budget
    assert len(cache) == 1 and cache.get("", "huge") is not None  # the frontend asking for it still gets it
    cache.record("", pb.Verdict(request_id="huge", steps_seen=1))  # recorded again: its old size leaves
    assert cache.bytes == cache.get("", "huge").ByteSize()
