"""Isolation from slow work (issue 14 item 1): enforced monitor budgets, no per-step work on the
event loop, and runaway monitors in both modes.

Timing is never asserted: slow monitors sleep or block far past small budgets, and what is checked
is behaviour (who is stopped, named, counted; who still gets a verdict; what health says).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from canvaswatch.client import simulate
from canvaswatch.client.replay import replay
from canvaswatch.client.stream import WatchError
from canvaswatch.monitors.base import Monitor, RequestMeta, Severity
from canvaswatch.server.config import ConfigError, parse_config
from canvaswatch.server.ops.metrics import Metrics
from canvaswatch.server.pipeline.session import Session, SessionSettings
from canvaswatch.v1 import monitor_pb2_grpc as pb_grpc
from tests.conftest import install_entry_point, start_sidecar
from tests.server import slow_monitors

SERVICE = "canvaswatch.v1.CanvasMonitor"


# --- the strike policy, on a session ------------------------------------------------------------

class Scripted(Monitor):
    """Sleeps the next number of seconds from `script` on each step (0: returns at once)."""

    name = "scripted"

    def __init__(self, script: list[float]) -> None:
        super().__init__()
        self.script = list(script)
        self.calls = 0

    def start(self, request):
        return {"mine": True}

    def on_step(self, state, step):
        assert state == {"mine": True}
        self.calls += 1
        seconds = self.script.pop(0) if self.script else 0.0
        if seconds:
            time.sleep(seconds)
        return [self.flag("info", "still here")]


def _session(monitor: Monitor, policy: str = "fail_open", strikes: int = 3, hard_s: float = 5.0) -> Session:
    meta = RequestMeta(request_id="budget-1", model="m", tenant="", prompt_ids=(), canvas_length=4, total_steps=0)
    settings = SessionSettings(policy=policy, budget_s=0.02, budget_strikes=strikes, hard_budget_s=hard_s)
    return Session(meta=meta, monitors=[monitor], settings=settings, metrics=Metrics(), sinks=[])


def _steps(session: Session, count: int) -> None:
    for _ in range(count):
        session.on_step(types.SimpleNamespace(residual_mean=None))


def _stopped(session: Session, reason: str) -> float:
    return session.metrics.registry.get_sample_value("canvaswatch_monitors_stopped_total",
                                                     {"monitor": "scripted", "reason": reason}) or 0.0


def test_overruns_in_a_row_stop_the_monitor_for_the_request_and_the_verdict_names_it():
    monitor = Scripted([0.06, 0.06, 0.06])
    session = _session(monitor)
    _steps(session, 6)
    assert monitor.calls == 3  # stopped after its third overrun in a row; never called again
    assert "scripted" not in session.states  # its state dropped
    verdict = session.verdict()
    [error] = verdict.monitor_errors
    assert error.startswith("scripted: stopped for this request (over_budget)")
    assert "server.monitor_budget_strikes = 3" in error
    assert _stopped(session, "over_budget") == 1
    assert session.metrics.registry.get_sample_value(
        "canvaswatch_monitor_errors_total", {"monitor": "scripted", "kind": "overrun"}) == 3
    assert len(verdict.flags) == 3  # the flags of the calls that did complete still count
    assert session.finish((), "")[1].monitor_errors == verdict.monitor_errors  # on_finish skips it


def test_an_overrun_now_and_then_never_stops_a_monitor():
    monitor = Scripted([0.06, 0.06, 0.0, 0.06, 0.06, 0.0, 0.06, 0.06])
    session = _session(monitor)
    _steps(session, 10)
    assert monitor.calls == 10
    assert session.verdict().monitor_errors == ()
    assert _stopped(session, "over_budget") == 0


def test_one_call_past_the_hard_limit_stops_at_once_and_fail_closed_makes_it_critical():
    monitor = Scripted([0.12])
    session = _session(monitor, policy="fail_closed", hard_s=0.1)
    _steps(session, 3)
    assert monitor.calls == 1
    verdict = session.verdict()
    assert "(hard_budget)" in verdict.monitor_errors[0] and "server.monitor_budget_hard_ms = 100" in verdict.monitor_errors[0]
    assert verdict.max_severity == Severity.CRITICAL
    assert [f.attributes.get("stopped") for f in verdict.flags if f.severity == Severity.CRITICAL] == ["hard_budget"]
    assert _stopped(session, "hard_budget") == 1


def test_strikes_zero_only_counts_overruns():
    monitor = Scripted([0.06] * 5)
    session = _session(monitor, strikes=0)
    _steps(session, 5)
    assert monitor.calls == 5 and session.verdict().monitor_errors == ()


class Exits(Monitor):
    """Calls sys.exit in `phase` (what a plugin using argparse or click internally can do)."""

    name = "exits"

    def __init__(self, phase: str) -> None:
        super().__init__()
        self.phase = phase

    def start(self, request):
        if self.phase == "start":
            sys.exit(2)
        return None

    def on_step(self, state, step):
        if self.phase == "on_step":
            sys.exit(2)
        return []

    def on_finish(self, state, final):
        if self.phase == "on_finish":
            sys.exit(2)
        return []


@pytest.mark.parametrize("phase", ["start", "on_step", "on_finish"])
def test_a_monitor_calling_sys_exit_is_a_monitor_error_not_the_end_of_the_thread(phase):
    # SystemExit is no Exception: caught as one, it killed the step thread (the stream hung to the hard
    # deadline and readiness stayed NOT_SERVING for good).
    session = _session(Exits(phase), policy="fail_closed")
    _steps(session, 2)
    _, verdict = session.finish((), "")
    assert verdict.monitor_errors == (f"exits: {phase} raised SystemExit: 2",)
    assert verdict.max_severity == Severity.CRITICAL  # fail_closed: a monitor that did not run is no clean verdict


def test_ctrl_c_in_a_monitor_still_stops_an_offline_command():
    class Interrupted(Exits):
        def on_step(self, state, step):
            raise KeyboardInterrupt

    session = _session(Interrupted("none"))
    with pytest.raises(KeyboardInterrupt):
        _steps(session, 1)


@pytest.mark.parametrize("server, key", [
    ({"monitor_budget_strikes": -1}, "monitor_budget_strikes"),
    ({"monitor_budget_hard_ms": 10.0}, "monitor_budget_hard_ms"),  # under monitor_budget_ms = 50
    ({"monitor_hard_deadline_s": 5.0}, "monitor_hard_deadline_s"),  # not longer than the hard limit (10 s)
    ({"monitor_hard_deadline_s": 0}, "monitor_hard_deadline_s"),
])
def test_bad_budget_settings_are_refused_naming_the_key(server, key):
    with pytest.raises(ConfigError, match=f"^server.{key}: "):
        parse_config({"server": server})


# --- over gRPC ---------------------------------------------------------------------------------

@pytest.fixture
def slow_plugins(tmp_path: Path, monkeypatch):
    for name, cls in (("sleepy", "Sleepy"), ("blocking", "Blocking"), ("runaway", "Runaway")):
        (tmp_path / name).mkdir()
        install_entry_point(tmp_path / name, monkeypatch, name, f"tests.server.slow_monitors:{cls}")
    slow_monitors.RELEASE.clear()
    yield
    slow_monitors.RELEASE.set()  # no thread of this test stays blocked or spinning


def _trace(vocab, request_id: str, seed: int = 0):
    return simulate.scenario("clean", vocab.encode, vocab.size, request_id=request_id, seed=seed)


def _health(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10).status


def _wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


@pytest.mark.parametrize("call", ["watch", "check"])
def test_a_slow_monitor_is_stopped_named_and_counted_and_the_others_keep_flagging(vocab, tmp_path, slow_plugins, call):
    # Watch streams the trace; Check runs it whole on one step thread, under the same budgets and strikes.
    running = start_sidecar(vocab, tmp_path, {
        "server": {"monitor_budget_ms": 20.0, "monitor_budget_strikes": 2, "monitor_budget_hard_ms": 5000.0},
        "monitors": {"sleepy": {"request_prefix": "slow", "seconds": 0.1}, "lexicon": {}},
    })
    send = replay if call == "watch" else _check
    try:
        with running.channel() as channel:
            slow = send(_trace(vocab, "slow-1"), channel)
            fast = send(_trace(vocab, "fast-1"), channel)
        [error] = slow.monitor_errors
        assert error.startswith("sleepy: stopped for this request (over_budget)")
        assert list(fast.monitor_errors) == []
        assert 'canvaswatch_monitors_stopped_total{monitor="sleepy",reason="over_budget"} 1.0' in running.metrics_text()
    finally:
        running.thread.stop()


def test_a_stream_stuck_in_a_monitor_holds_up_neither_other_streams_nor_health(vocab, tmp_path, slow_plugins):
    """In-process, the blocked call is on the stream's own step thread, not on the event loop. (In worker
    mode one worker is one thread; its isolation is the hard-deadline kill, tested below.)"""
    running = start_sidecar(vocab, tmp_path, {"monitors": {"blocking": {"request_prefix": "block"}, "lexicon": {}}})
    try:
        with running.channel() as channel, ThreadPoolExecutor(1) as pool:
            blocked = pool.submit(replay, _trace(vocab, "block-1"), channel, timeout=120)
            time.sleep(0.5)  # its first step is in the monitor by now (or soon; nothing below depends on it)
            others = [replay(_trace(vocab, f"other-{i}", seed=i), channel) for i in range(3)]
            assert [v.steps_seen > 0 for v in others] == [True] * 3
            assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
            assert not blocked.done()
            slow_monitors.RELEASE.set()
            assert blocked.result(timeout=60).steps_seen > 0
    finally:
        running.thread.stop()


def test_a_runaway_monitor_in_process_ends_its_stream_and_health_says_so_until_it_returns(vocab, tmp_path, slow_plugins):
    running = start_sidecar(vocab, tmp_path, {
        "server": {"monitor_budget_hard_ms": 200.0, "monitor_hard_deadline_s": 1.0},
        "monitors": {"runaway": {"request_prefix": "loop"}, "lexicon": {}},
    })
    try:
        with running.channel() as channel:
            with pytest.raises(WatchError) as refused:
                replay(_trace(vocab, "loop-1"), channel, timeout=60)
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE
            assert "monitor 'runaway' ran" in str(refused.value) and "server.monitor_hard_deadline_s = 1" in str(refused.value)
            assert _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING  # a thread is stuck
            assert replay(_trace(vocab, "meanwhile"), channel).steps_seen > 0  # the rest still serve
            metrics = running.metrics_text()
            assert 'canvaswatch_monitors_stopped_total{monitor="runaway",reason="hard_deadline"} 1.0' in metrics
            assert "canvaswatch_stuck_step_threads 1.0" in metrics
            assert 'outcome="error"' in metrics
            slow_monitors.RELEASE.set()  # the call returns after all: the thread leaves, health recovers
            _wait_until(lambda: _health(channel) == health_pb2.HealthCheckResponse.SERVING)
            assert "canvaswatch_stuck_step_threads 0.0" in running.metrics_text()
    finally:
        running.thread.stop()


def test_a_runaway_monitor_in_a_worker_gets_the_worker_killed_and_replaced(vocab, tmp_path, slow_plugins):
    running = start_sidecar(vocab, tmp_path, {
        "server": {"monitor_processes": 1, "monitor_budget_hard_ms": 200.0, "monitor_hard_deadline_s": 1.5},
        "monitors": {"runaway": {"request_prefix": "loop"}, "lexicon": {}},
    })
    try:
        with running.channel() as channel:
            with pytest.raises(WatchError) as refused:
                replay(_trace(vocab, "loop-1"), channel, timeout=60)  # RELEASE is never set in the worker
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE
            assert "made no progress" in str(refused.value) and "server.monitor_hard_deadline_s = 1.5" in str(refused.value)
            # no worker until the replacement has started: readiness says so, liveness does not
            assert _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
            _wait_until(lambda: _health(channel) == health_pb2.HealthCheckResponse.SERVING, timeout=180)
            assert replay(_trace(vocab, "after"), channel).steps_seen > 0
            assert "canvaswatch_monitor_workers_killed_total 1.0" in running.metrics_text()
    finally:
        running.thread.stop()


def test_a_worker_whose_calls_are_each_in_time_is_not_killed_however_many_arrive_at_once(vocab, tmp_path, slow_plugins):
    """The hard deadline is for one call: steps that arrive together and are each under the hard budget
    (0.6 s against 1 s) but together past the deadline (1.5 s) leave the worker alone."""
    running = start_sidecar(vocab, tmp_path, {
        "server": {"monitor_processes": 1, "monitor_budget_hard_ms": 1000.0, "monitor_hard_deadline_s": 1.5,
                   "monitor_budget_strikes": 0},
        "monitors": {"sleepy": {"request_prefix": "slow", "seconds": 0.6}, "lexicon": {}},
    })
    try:
        trace = _trace(vocab, "slow-batch")
        del trace.steps[6:-1]  # six steps and the final one: ~4 s of monitoring, sent at once
        with running.channel() as channel:
            assert replay(trace, channel, timeout=60).steps_seen == 6  # (the final message carries no step)
            assert "canvaswatch_monitor_workers_killed_total 0.0" in running.metrics_text()
    finally:
        running.thread.stop()


# --- Check: a whole trace on one step thread, under the same budgets and hard deadline ------------

def _check(trace, channel, timeout: float = 60.0):
    return pb_grpc.CanvasMonitorStub(channel).Check(trace, timeout=timeout)


@pytest.mark.parametrize("processes", [0, 1], ids=["in_process", "worker_mode"])
def test_a_runaway_monitor_in_check_ends_the_call_and_health_says_so_until_it_returns(vocab, tmp_path, slow_plugins,
                                                                                    processes):
    """Check runs on a step thread of the gRPC process in both modes (with monitor_processes > 0 too): past
    server.monitor_hard_deadline_s it ends UNAVAILABLE naming the monitor, the thread is left behind as stuck
    (counted; readiness NOT_SERVING), and Watch and other Checks go on (in worker mode Watch is the workers')."""
    running = start_sidecar(vocab, tmp_path, {
        "server": {"monitor_processes": processes, "monitor_budget_hard_ms": 200.0, "monitor_hard_deadline_s": 1.0},
        "monitors": {"runaway": {"request_prefix": "loop"}, "lexicon": {}},
    })
    try:
        with running.channel() as channel:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as refused:
                _check(_trace(vocab, "loop-c"), channel)
            assert time.monotonic() - started < 30  # the watchdog, not the client's deadline, ended it
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            details = refused.value.details()
            assert details.startswith("Check: monitor 'runaway' ran ") and "server.monitor_hard_deadline_s = 1:" in details
            assert _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING  # a thread is stuck
            assert _check(_trace(vocab, "meanwhile-c"), channel).steps_seen > 0  # the rest still serve
            assert replay(_trace(vocab, "meanwhile-w"), channel).steps_seen > 0
            metrics = running.metrics_text()
            assert 'canvaswatch_monitors_stopped_total{monitor="runaway",reason="hard_deadline"} 1.0' in metrics
            assert "canvaswatch_stuck_step_threads 1.0" in metrics
            assert 'outcome="error"} 1.0' in metrics
            slow_monitors.RELEASE.set()  # the call returns after all: the thread leaves, health recovers
            _wait_until(lambda: _health(channel) == health_pb2.HealthCheckResponse.SERVING)
            assert "canvaswatch_stuck_step_threads 0.0" in running.metrics_text()
            assert _check(_trace(vocab, "after-c"), channel).steps_seen > 0
    finally:
        running.thread.stop()


def test_check_calls_hold_stream_slots_like_watch(vocab, tmp_path, slow_plugins):
    """Each Check in flight holds a step thread and its trace: it counts against the stream limits (a
    client could otherwise start threads without bound), and gives its slot back when it ends."""
    running = start_sidecar(vocab, tmp_path, {
        "server": {"max_streams_per_peer": 1},
        "monitors": {"blocking": {"request_prefix": "held"}, "lexicon": {}},
    })
    try:
        with running.channel() as channel, ThreadPoolExecutor(1) as pool:
            held = pool.submit(_check, _trace(vocab, "held-c"), channel)
            _wait_until(lambda: "canvaswatch_active_streams 1.0" in running.metrics_text())
            for call in (lambda: _check(_trace(vocab, "second-c"), channel),
                         lambda: replay(_trace(vocab, "second-w"), channel)):
                with pytest.raises((grpc.RpcError, WatchError)) as refused:
                    call()
                err = refused.value
                code, details = (err.code, str(err)) if isinstance(err, WatchError) else (err.code(), err.details())
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "server.max_streams_per_peer" in details
            slow_monitors.RELEASE.set()
            assert held.result(timeout=60).steps_seen > 0
            assert _check(_trace(vocab, "after-c"), channel).steps_seen > 0  # the slot came back
    finally:
        running.thread.stop()


def test_sigterm_ends_the_process_with_a_runaway_monitor_in_process_and_the_audit_log_whole(vocab, tmp_path):
    """The stuck thread cannot be stopped, but it cannot keep the process either: the drain cuts its
    stream at server.drain_grace_s, the audit log is closed, and the process exits 0 (daemon threads)."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    dist = plugins / "cw_entry_runaway-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cw-entry-runaway\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[canvaswatch.monitors]\nrunaway = tests.server.slow_monitors:Runaway\n")
    audit = tmp_path / "audit.jsonl"
    config = tmp_path / "sidecar.toml"
    config.write_text(f'[server]\ndrain_grace_s = 1.0\nmonitor_budget_hard_ms = 200.0\nmonitor_hard_deadline_s = 30.0\n'
                      f'[dense]\nembeddings = ""\n[logging]\naudit_log = "{audit}"\n'
                      '[monitors.runaway]\nrequest_prefix = "loop"\n[monitors.lexicon]\n')
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugins), str(root), os.environ.get("PYTHONPATH", "")])}
    with ThreadPoolExecutor(1) as pool:
        port = _free_port()
        server = subprocess.Popen([sys.executable, "-m", "canvaswatch.server.cli", "serve", "--config", str(config),
                                   "--grpc-port", str(port), "--metrics-port", "-1"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            grpc.channel_ready_future(channel).result(timeout=180)
            flagged = simulate.scenario("surviving_phrase", vocab.encode, vocab.size, request_id="flagged-before", seed=2)
            assert replay(flagged, channel).flags
            stuck = pool.submit(replay, _trace(vocab, "loop-1"), channel, timeout=120)
            time.sleep(1.0)  # the runaway call has started on its step thread
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=60) == 0
            with pytest.raises(WatchError) as cut:
                stuck.result(timeout=30)
            assert cut.value.code == grpc.StatusCode.UNAVAILABLE
            channel.close()
        finally:
            if server.poll() is None:
                server.kill()
            stderr = server.stderr.read()
    assert "drained" in stderr and "sidecar_stopped" in stderr
    lines = audit.read_text().splitlines()
    assert lines and all(line.endswith("}") for line in lines)  # flushed, every line whole


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- item 5 leftovers: the metrics address, an unwritable audit log ------------------------------

def test_metrics_bind_to_their_own_address(vocab, tmp_path):
    running = start_sidecar(vocab, tmp_path, {"server": {"metrics_host": "127.0.0.2"}})
    try:
        import urllib.request

        port = running.thread.sidecar.metrics_port
        assert "canvaswatch_steps_total" in urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=5).read().decode()
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    finally:
        running.thread.stop()


def test_a_metrics_address_not_of_this_machine_fails_start_naming_the_key(vocab, tmp_path):
    with pytest.raises(OSError, match=r"^server.metrics_host: cannot bind 192.0.2.1:0"):
        start_sidecar(vocab, tmp_path, {"server": {"metrics_host": "192.0.2.1"}})


def test_an_unwritable_audit_log_fails_start_with_one_line_naming_the_key(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a directory should be")
    config = tmp_path / "sidecar.toml"
    config.write_text(f'[logging]\naudit_log = "{blocker}/audit.jsonl"\n[dense]\nembeddings = ""\n')
    done = subprocess.run([sys.executable, "-m", "canvaswatch.server.cli", "serve", "--config", str(config),
                           "--grpc-port", "0", "--metrics-port", "-1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    [line] = [line for line in done.stderr.splitlines() if line.startswith("canvaswatch:")]
    assert line == f"canvaswatch: logging.audit_log: cannot write '{blocker}/audit.jsonl': '{blocker}' is a file, not a folder"
    assert "Traceback" not in done.stderr


def test_the_read_ahead_window_bounds_bytes_as_well_as_messages():
    import asyncio

    from canvaswatch.server.workers.pool import WINDOW, WINDOW_BYTES, RelayStream

    worker = types.SimpleNamespace(send=lambda *frame: None)

    async def run() -> None:
        stream = RelayStream(1, worker)
        stream.send(b"x" * (WINDOW_BYTES + 1))  # one message always goes, however large
        assert stream.full()
        stream.deliver([], None)
        assert not stream.full() and stream.in_flight_bytes == 0 and stream.results.empty()  # nothing to wake Watch for
        for _ in range(WINDOW - 1):
            stream.send(b"y")
        assert not stream.full()
        stream.send(b"y")
        assert stream.full()

    asyncio.run(run())
