"""server.monitor_processes = N: the gRPC process relays bytes to N worker processes.

The same traces must give the same verdicts as in-process monitoring, bad
input the same statuses, and the metrics endpoint one merged view; a worker
that dies fails only its own streams and is replaced.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from canvaswatch.client import simulate
from canvaswatch.client.replay import replay
from canvaswatch.server.config import ConfigError, parse_config
from canvaswatch.v1 import monitor_pb2 as pb
from canvaswatch.v1 import monitor_pb2_grpc as pb_grpc
from tests.conftest import info_for, start_sidecar, topk_step
from tests.server.test_bad_input import CASES, _good, assert_refused
from tests.server.test_watch import _trace, check_embeddings_form

WORKERS = 2
TOPK_CASES = [name for name, (messages, _, _) in CASES.items()
              if all(m.WhichOneof("state") in (None, "topk") for m in messages)]


@pytest.fixture(scope="module")
def relayed(vocab, tmp_path_factory):
    running = start_sidecar(vocab, tmp_path_factory.mktemp("relayed"), extra={"server": {"monitor_processes": WORKERS}})
    yield running
    running.thread.stop()


def _summary(verdict: pb.Verdict) -> list[tuple]:
    return [(f.monitor, f.severity, f.reason, tuple((e.block, e.step, tuple(e.positions), e.snippet) for e in f.evidence))
            for f in verdict.flags]


def _wait_until(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def _pool(running):
    return running.thread.sidecar.workers


def test_every_scenario_gets_the_verdict_that_in_process_monitoring_gives(relayed, sidecar, vocab):
    traces = [_trace(vocab, kind, f"same-{kind}", seed=11) for kind in simulate.SCENARIOS]
    with relayed.channel() as far, sidecar.channel() as near:
        for trace in traces:
            events: list[pb.MonitorEvent] = []
            by_workers = replay(trace, far, on_event=events.append)
            in_process = replay(trace, near)
            assert _summary(by_workers) == _summary(in_process), trace.info.request_id
            assert by_workers.steps_seen == in_process.steps_seen == len(trace.steps) - 1
            streamed = [e.flag for e in events if e.HasField("flag")]
            assert len(streamed) == len(by_workers.flags)  # every flag was also streamed as it was raised


def test_concurrent_streams_spread_over_the_workers_and_metrics_merge(relayed, vocab):
    before = relayed.metrics_text()
    kinds = list(simulate.SCENARIOS) * 2
    traces = [_trace(vocab, kind, f"spread-{i}-{kind}", seed=i) for i, kind in enumerate(kinds)]
    with relayed.channel() as channel, ThreadPoolExecutor(8) as pool:
        verdicts = list(pool.map(lambda t: replay(t, channel), traces))
    assert [v.request_id for v in verdicts] == [t.info.request_id for t in traces]
    # both workers did part of the work (each one's own registry counted steps)
    per_worker = [sum(value for name, _, _, _, samples in w.metrics if name == "canvaswatch_steps"
                      for sample_name, _, value in samples if sample_name == "canvaswatch_steps_total")
                  for w in _pool(relayed).workers]
    assert len(per_worker) == WORKERS and all(count > 0 for count in per_worker), per_worker
    after = relayed.metrics_text()
    steps = sum(len(t.steps) - 1 for t in traces)

    def total(text: str, pattern: str) -> float:
        return sum(float(v) for v in re.findall(pattern + r" ([0-9.e+]+)", text))

    step_line = r'canvaswatch_steps_total\{model="simulated/diffusion"\}'
    ok_line = r'canvaswatch_requests_total\{model="simulated/diffusion",outcome="ok"\}'
    assert total(after, step_line) - total(before, step_line) == steps
    assert total(after, ok_line) - total(before, ok_line) == len(traces)
    flags = sum(len(v.flags) for v in verdicts)
    assert total(after, r"canvaswatch_flags_total\{[^}]*\}") - total(before, r"canvaswatch_flags_total\{[^}]*\}") == flags
    assert "canvaswatch_active_streams 0.0" in after
    assert len(re.findall(r"^# TYPE canvaswatch_steps_total counter$|^# TYPE canvaswatch_steps counter$", after, re.M)) == 1


@pytest.mark.parametrize("case", TOPK_CASES)
def test_bad_stream_is_refused_with_the_field_named(relayed, case):
    assert_refused(relayed, case)


def test_bytes_that_are_no_step_state_are_refused(relayed):
    with relayed.channel() as channel:
        raw = channel.stream_stream("/canvaswatch.v1.CanvasMonitor/Watch")
        with pytest.raises(grpc.RpcError) as caught:
            list(raw(iter([b"\xff\xff\xff"]), timeout=20))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "message[0]: 3 bytes that are not a valid canvaswatch.v1.StepState (protobuf)"


def test_audit_lines_from_several_processes_stay_whole(relayed, vocab):
    traces = [_trace(vocab, "transient_phrase", f"audit-w-{i}", seed=i) for i in range(8)]
    with relayed.channel() as channel, ThreadPoolExecutor(8) as pool:
        verdicts = list(pool.map(lambda t: replay(t, channel), traces))
    lines = [json.loads(line) for line in relayed.audit_path.read_text().splitlines()]  # each line parses
    for verdict in verdicts:
        assert len([line for line in lines if line["request_id"] == verdict.request_id]) == len(verdict.flags) >= 2


@pytest.mark.parametrize("mode", ["relayed", "sidecar"])  # with workers, and in-process
def test_a_cancelled_stream_is_counted_as_cancelled(mode, request):
    running = request.getfixturevalue(mode)
    release = threading.Event()

    def messages():
        yield _good(info=True)
        release.wait(20)

    def steps(text: str) -> float:
        return sum(float(v) for v in re.findall(r'canvaswatch_steps_total\{model="test-model"\} ([0-9.]+)', text))

    before = steps(running.metrics_text())
    with running.channel() as channel:
        call = pb_grpc.CanvasMonitorStub(channel).Watch(messages(), timeout=30)
        _wait_until(lambda: steps(running.metrics_text()) == before + 1, timeout=30)  # the worker has its step
        call.cancel()
        release.set()
    _wait_until(lambda: 'outcome="cancelled"} 1.0' in running.metrics_text(), timeout=30)
    if mode == "relayed":
        _wait_until(lambda: not any(w.streams for w in _pool(running).workers), timeout=30)


def test_a_worker_that_dies_fails_only_its_streams_and_is_replaced(vocab, tmp_path):
    running = start_sidecar(vocab, tmp_path, extra={"server": {"monitor_processes": WORKERS}})
    try:
        release = threading.Event()

        def stalled():
            yield topk_step(*_stalled_tensors(), info=info_for("doomed", 8))
            release.wait(30)

        pool = _pool(running)
        with running.channel() as channel:
            warm = replay(_trace(vocab, "clean", "before", seed=1), channel)  # counted before the crash
            assert warm.steps_seen > 0
            errors: list[grpc.RpcError] = []

            def watch() -> None:
                try:
                    list(pb_grpc.CanvasMonitorStub(channel).Watch(stalled(), timeout=60))
                except grpc.RpcError as err:
                    errors.append(err)

            thread = threading.Thread(target=watch)
            thread.start()
            _wait_until(lambda: any(w.streams for w in pool.workers))
            [doomed] = [w for w in pool.workers if w.streams]
            os.kill(doomed.process.pid, signal.SIGKILL)
            thread.join(30)
            release.set()
            assert errors and errors[0].code() == grpc.StatusCode.UNAVAILABLE
            assert f"monitor worker {doomed.index} exited" in errors[0].details()
            _wait_until(lambda: all(w.alive for w in pool.workers) and doomed not in pool.workers)
            after = replay(_trace(vocab, "self_correction", "after", seed=2), channel)
            assert any(f.monitor == "self_correction" for f in after.flags)
        metrics = running.metrics_text()
        assert 'outcome="error"} 1.0' in metrics
        # the dead worker's counts stay in the sum: the request it finished before the crash
        assert 'canvaswatch_requests_total{model="simulated/diffusion",outcome="ok"} 2.0' in metrics
    finally:
        running.thread.stop()


def test_a_replacement_worker_that_fails_to_start_is_tried_again(vocab, tmp_path, monkeypatch):
    """A replacement's start that fails (or hangs) is not the end of its slot: it is tried again."""
    from canvaswatch.server.workers.pool import MonitorWorkers, WorkerStartError

    running = start_sidecar(vocab, tmp_path, extra={"server": {"monitor_processes": 1}})
    try:
        pool = _pool(running)
        start, failed = MonitorWorkers._await_ready, []

        async def fails_once(self, worker):
            if not failed:
                failed.append(worker)
                raise WorkerStartError("server.monitor_processes: worker 0 failed to start: (the test's)")
            await start(self, worker)

        monkeypatch.setattr(MonitorWorkers, "_await_ready", fails_once)
        [first] = pool.workers
        os.kill(first.process.pid, signal.SIGKILL)
        _wait_until(lambda: failed and all(w.alive for w in pool.workers) and failed[0] not in pool.workers)
        assert not failed[0].process.is_alive()  # the failed start's process was not left behind
        with running.channel() as channel:
            assert replay(_trace(vocab, "clean", "after-retry", seed=3), channel).steps_seen > 0
    finally:
        running.thread.stop()


def _stalled_tensors():
    import torch

    return torch.full((8, 4), 3000) + torch.arange(4), torch.tensor([[0.6, 0.2, 0.1, 0.05]] * 8)


@pytest.mark.parametrize("value", [-1, 257])
def test_monitor_processes_out_of_range_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match="monitor_processes"):
        parse_config({"server": {"monitor_processes": value}})


def test_check_list_monitors_and_health_answer_beside_the_relay(relayed, vocab):
    from canvaswatch.server.config import DEFAULT_MONITORS

    with relayed.channel() as channel:
        stub = pb_grpc.CanvasMonitorStub(channel)
        listed = stub.ListMonitors(pb.ListMonitorsRequest())
        verdict = stub.Check(_trace(vocab, "surviving_phrase", "check-w", seed=1))
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="canvaswatch.v1.CanvasMonitor"))
    assert [m.name for m in listed.monitors] == list(DEFAULT_MONITORS)
    assert verdict.request_id == "check-w" and any(f.monitor == "lexicon" for f in verdict.flags)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_auth_and_the_stream_limit_hold_for_relayed_streams(vocab, tmp_path):
    running = start_sidecar(vocab, tmp_path, extra={"server": {"monitor_processes": 1, "auth_tokens": ["s3cret"],
                                                               "max_streams": 1}})
    token = [("authorization", "Bearer s3cret")]
    try:
        with running.channel() as channel:
            stub = pb_grpc.CanvasMonitorStub(channel)
            with pytest.raises(grpc.RpcError) as denied:
                list(stub.Watch(iter([_good(info=True), pb.StepState(final=True)]), timeout=20))
            assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
            release = threading.Event()

            def held():
                yield _good(info=True)
                release.wait(20)

            first = stub.Watch(held(), timeout=30, metadata=token)
            _wait_until(lambda: running.thread.sidecar.engine.metrics.active_streams._value.get() == 1, timeout=20)
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.Watch(iter([_good(info=True), pb.StepState(final=True)]), timeout=20, metadata=token))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit is 1" in refused.value.details()
            first.cancel()
            release.set()
            _wait_until(lambda: running.thread.sidecar.engine.metrics.active_streams._value.get() == 0, timeout=20)
            verdict = replay(_trace(vocab, "clean", "authorised", seed=3), channel, metadata=token)
            assert verdict.request_id == "authorised" and verdict.steps_seen > 0
    finally:
        running.thread.stop()


def test_embeddings_form_is_decoded_in_a_worker_with_the_shared_matrix(vocab, tmp_path, dense, gemma_embeddings):
    from canvaswatch.server.workers.shared_memory import fits_in_shared_memory

    if not dense.embeddings.is_shared() and not fits_in_shared_memory(dense.embeddings):
        pytest.skip("/dev/shm is too small here to share the 0.7 GB matrix with a worker")
    running = start_sidecar(vocab, tmp_path, extra={"server": {"monitor_processes": 1}}, dense=dense)
    try:
        assert running.thread.sidecar.workers.embeddings is not None  # handed over, not reloaded
        check_embeddings_form(running, vocab, gemma_embeddings)
    finally:
        running.thread.stop()


@pytest.mark.parametrize("mode", ["relayed", "sidecar"])
def test_a_stream_that_sent_its_final_never_waits_for_a_cancellation(mode, request, vocab, monkeypatch):
    # The grace that tells a cancellation from an incomplete stream must not touch finished
    # streams: with it stretched past the call's deadline, a finished stream still completes.
    import canvaswatch.server.transport.lifecycle as lifecycle

    monkeypatch.setattr(lifecycle, "CANCEL_GRACE_S", 60.0)  # one lifecycle serves both modes
    running = request.getfixturevalue(mode)
    with running.channel() as channel:
        for seed in range(3):
            verdict = replay(_trace(vocab, "clean", f"prompt-end-{mode}-{seed}", seed=seed), channel, timeout=20)
            assert verdict.steps_seen > 0


def test_streams_one_after_another_take_turns_over_the_workers(relayed, vocab):
    before = [w.metrics for w in _pool(relayed).workers]

    def steps_of(metrics) -> float:
        return sum(value for name, _, _, _, samples in metrics if name == "canvaswatch_steps"
                   for sample_name, _, value in samples if sample_name == "canvaswatch_steps_total")

    with relayed.channel() as channel:
        for seed in range(2 * WORKERS):
            replay(_trace(vocab, "clean", f"turns-{seed}", seed=seed), channel)
    grown = [steps_of(w.metrics) - steps_of(b) for w, b in zip(_pool(relayed).workers, before)]
    assert all(g > 0 for g in grown), grown  # sequential streams did not all land on one worker


def test_a_worker_turns_dense_batching_off(vocab, dense):
    # The window batches concurrent streams' steps in one process; a worker takes one message at a
    # time, so there the window would only delay every dense step.
    from canvaswatch.server.pipeline.engine import Engine
    from canvaswatch.server.workers.child import Worker

    config = parse_config({"dense": {"embeddings": "", "batch_window_ms": 1.0}})
    in_process = Engine(config, vocab, dense=dense)
    assert in_process.batcher is not None  # in-process, the window applies
    in_process.close()
    worker = Worker(config, dense.embeddings)
    try:
        assert worker.engine.batcher is None and worker.engine.dense.embeddings is not None
    finally:
        worker.close()


def test_health_says_not_serving_while_no_worker_is_up(vocab, tmp_path):
    running = start_sidecar(vocab, tmp_path, extra={"server": {"monitor_processes": 1}})
    service = "canvaswatch.v1.CanvasMonitor"
    try:
        with running.channel() as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def status(name: str) -> int:
                return health.Check(health_pb2.HealthCheckRequest(service=name)).status

            assert status(service) == health_pb2.HealthCheckResponse.SERVING
            [only] = _pool(running).workers
            os.kill(only.process.pid, signal.SIGKILL)
            _wait_until(lambda: status(service) == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=30)
            assert status("") == health_pb2.HealthCheckResponse.SERVING  # alive: liveness must not restart it
            _wait_until(lambda: status(service) == health_pb2.HealthCheckResponse.SERVING, timeout=120)
            verdict = replay(_trace(vocab, "clean", "back", seed=4), channel)
            assert verdict.steps_seen > 0
    finally:
        running.thread.stop()
