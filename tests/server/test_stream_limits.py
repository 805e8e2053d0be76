"""No starvation: silent streams end at a deadline, and one client cannot hold every stream slot.

Abuse here is bounded in count (at most 24 streams) and time (deadlines of 1.5 s), and every
stream is opened to 127.0.0.1; no assert depends on timing beyond generous limits.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from canvaswatch.client import simulate
from canvaswatch.client.replay import replay
from canvaswatch.server.config import ConfigError, parse_config
from canvaswatch.server.transport.lifecycle import peer_address
from canvaswatch.v1 import monitor_pb2 as pb
from canvaswatch.v1 import monitor_pb2_grpc as pb_grpc
from tests.conftest import info_for, start_sidecar, topk_step

DEADLINE_S = 1.5
# Generous: a silent stream must end within its deadline plus this (slow shared CI machines).
SLACK_S = 20.0


def _silent_streams(target: str, count: int, metadata=(), first: pb.StepState | None = None) -> list[tuple[grpc.StatusCode, str, float]]:
    """Open `count` Watch streams on one connection that send nothing (or only `first`) and never
    half-close; (status, details, seconds until the stream ended) for each."""
    release = threading.Event()

    def silent():
        if first is not None:
            yield first
        release.wait(SLACK_S + DEADLINE_S)  # never sends; let go at the end so no thread outlives the test

    def one(stub) -> tuple[grpc.StatusCode, str, float]:
        started = time.monotonic()
        try:
            for _ in stub.Watch(silent(), metadata=metadata, timeout=SLACK_S + DEADLINE_S):
                pass
            return grpc.StatusCode.OK, "", time.monotonic() - started
        except grpc.RpcError as err:
            return err.code(), err.details() or "", time.monotonic() - started

    with grpc.insecure_channel(target) as channel, ThreadPoolExecutor(count) as pool:
        stub = pb_grpc.CanvasMonitorStub(channel)
        try:
            return list(pool.map(lambda _: one(stub), range(count)))
        finally:
            release.set()


def _good_trace(vocab, request_id: str) -> pb.Trace:
    return simulate.scenario("surviving_phrase", vocab.encode, vocab.size, request_id=request_id, seed=1)


@pytest.mark.parametrize("mode", ["in_process", "workers"])
def test_silent_streams_from_one_peer_are_capped_and_end_at_the_first_message_deadline(vocab, tmp_path, mode):
    server = {"max_streams": 12, "max_streams_per_peer": 4, "first_message_timeout_s": DEADLINE_S}
    if mode == "workers":
        server["monitor_processes"] = 1
    running = start_sidecar(vocab, tmp_path, {"server": server})
    try:
        results = _silent_streams(running.target, 10)
        # the peer's slots are free again once its silent streams timed out
        with running.channel() as channel:
            verdict = replay(_good_trace(vocab, "after-silence"), channel, timeout=30)
        metrics = running.metrics_text()
    finally:
        running.thread.stop()
    codes = [code for code, _, _ in results]
    assert set(codes) <= {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}, results
    assert codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) >= 4  # the 4 the peer may hold (a few more if late)
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1
    for code, details, seconds in results:
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            assert details == f"stream: no message within server.first_message_timeout_s = {DEADLINE_S:g} s"
            assert DEADLINE_S * 0.9 <= seconds < DEADLINE_S + SLACK_S
        else:
            assert details.startswith("server.max_streams_per_peer: 4 streams open from ipv4:127.0.0.1; limit is 4")
    assert verdict.request_id == "after-silence" and verdict.flags
    assert 'canvaswatch_streams_refused_total{reason="peer_limit"}' in metrics
    assert 'canvaswatch_streams_refused_total{reason="first_message_timeout"}' in metrics
    assert "canvaswatch_active_streams 0.0" in metrics


def test_a_token_holding_many_silent_streams_cannot_lock_out_another_client(vocab, tmp_path):
    """The abuser fills its token's share; another client gets its verdict while the silent streams are still held."""
    server = {"max_streams": 8, "max_streams_per_token": 4, "auth_tokens": ["abuser-token", "good-token"],
              "first_message_timeout_s": 8.0}
    running = start_sidecar(vocab, tmp_path, {"server": server})
    found: dict[str, object] = {}
    try:
        abuse = threading.Thread(target=lambda: found.setdefault(
            "silent", _silent_streams(running.target, 24, metadata=[("authorization", "Bearer abuser-token")])))
        abuse.start()
        deadline = time.monotonic() + SLACK_S
        while time.monotonic() < deadline and 'reason="token_limit"' not in running.metrics_text():
            time.sleep(0.05)
        held = running.thread.sidecar.engine.metrics.active_streams._value.get()
        started = time.monotonic()
        with running.channel() as channel:
            verdict = replay(_good_trace(vocab, "good-client"), channel, timeout=30,
                             metadata=[("authorization", "Bearer good-token")])
        took = time.monotonic() - started
        abuse.join(timeout=SLACK_S + 10)
    finally:
        running.thread.stop()
    assert held == 4  # the abuser's silent streams were open while the good client ran
    assert took < 8.0, "the good client waited for the abuser's deadline instead of being served beside it"
    assert verdict.request_id == "good-client" and verdict.flags
    codes = [code for code, _, _ in found["silent"]]
    assert codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) == 4
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 20
    refused = [details for code, details, _ in found["silent"] if code is grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert all(d == "server.max_streams_per_token: 4 streams open with this token; limit is 4" for d in refused)


@pytest.mark.parametrize("mode", ["in_process", "workers"])
def test_a_stream_silent_after_its_first_message_ends_at_the_idle_deadline(vocab, tmp_path, mode):
    server = {"idle_timeout_s": DEADLINE_S}
    if mode == "workers":
        server["monitor_processes"] = 1
    running = start_sidecar(vocab, tmp_path, {"server": server})
    first = topk_step(torch.full((8, 4), 3000) + torch.arange(4), torch.tensor([[0.6, 0.2, 0.1, 0.05]] * 8),
                      info=info_for("goes-quiet", 8))
    try:
        [(code, details, seconds)] = _silent_streams(running.target, 1, first=first)
        deadline = time.monotonic() + SLACK_S  # the worker's count reaches /metrics with its next snapshot
        while time.monotonic() < deadline and 'outcome="incomplete"' not in running.metrics_text():
            time.sleep(0.1)
        metrics = running.metrics_text()
    finally:
        running.thread.stop()
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED, details
    assert details == f"message[1]: none within server.idle_timeout_s = {DEADLINE_S:g} s of message[0]"
    assert DEADLINE_S * 0.9 <= seconds < DEADLINE_S + SLACK_S
    assert 'canvaswatch_requests_total{model="test-model",outcome="incomplete"} 1.0' in metrics
    assert 'canvaswatch_streams_refused_total{reason="idle_timeout"} 1.0' in metrics


def test_peer_address_drops_the_port_so_new_connections_count_as_the_same_client():
    assert peer_address("ipv4:127.0.0.1:53012") == "ipv4:127.0.0.1"
    assert peer_address("ipv6:[::1]:53012") == "ipv6:[::1]"
    assert peer_address("unix:/tmp/cw.sock") == "unix:/tmp/cw.sock"


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ({"first_message_timeout_s": 0}, "server.first_message_timeout_s: must be in [0.001, 86400] seconds"),
        ({"idle_timeout_s": float("nan")}, "server.idle_timeout_s: must be in [0.001, 86400] seconds"),
        ({"keepalive_time_s": -1}, "server.keepalive_time_s"),
        ({"min_ping_interval_s": 0}, "server.min_ping_interval_s"),
        # gRPC takes milliseconds: 0.5 ms became 0, no ping-rate limit at all
        ({"min_ping_interval_s": 0.0005}, "server.min_ping_interval_s: must be in [0.001, 86400] seconds"),
        ({"keepalive_time_s": 0.0005}, "server.keepalive_time_s: must be in [0.001, 86400] seconds"),
        ({"auth_tokens": [""]}, "server.auth_tokens: every token must be a non-blank string"),
        ({"auth_tokens": ["ok", "  "]}, "server.auth_tokens: every token must be a non-blank string"),
        ({"max_streams": 8, "max_streams_per_peer": 9}, "server.max_streams_per_peer: must be in [0, max_streams = 8]"),
        ({"max_streams_per_token": 2}, "server.max_streams_per_token: needs auth_tokens"),
        ({"max_streams_per_peer": "many"}, "server.max_streams_per_peer: expected int"),
    ],
)
def test_stream_limit_keys_are_validated_naming_the_key(server, message):
    with pytest.raises(ConfigError) as caught:
        parse_config({"server": server})
    assert message in str(caught.value)


def test_keepalive_policy_comes_from_the_server_section():
    from canvaswatch.server.app import server_options

    options = dict(server_options(parse_config({"server": {"keepalive_time_s": 30, "keepalive_timeout_s": 5,
                                                           "min_ping_interval_s": 2.5}}).server))
    assert options["grpc.keepalive_time_ms"] == 30_000 and options["grpc.keepalive_timeout_ms"] == 5_000
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 2_500
    assert options["grpc.http2.max_ping_strikes"] == 2
