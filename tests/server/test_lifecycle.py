"""Start, drain, reload, as an operator sees them: a real `canvaswatch serve` process on 127.0.0.1.

Each test starts one server process (a few seconds: vocabulary, monitors, warm-up), signals it, and
waits for it with a generous bound; nothing here asserts a timing beyond such bounds.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from canvaswatch.client import simulate
from canvaswatch.client.stream import channel_options
from canvaswatch.v1 import monitor_pb2 as pb
from canvaswatch.v1 import monitor_pb2_grpc as pb_grpc
from tests.conftest import info_for, start_sidecar, topk_step

CLI = [sys.executable, "-m", "canvaswatch.server.cli"]
START_S = 120.0  # generous: a cold machine converts the vocabulary first


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """`canvaswatch serve` in a child process, its JSON log lines collected from stderr."""

    def __init__(self, config: Path, grpc_port: int, *extra: str) -> None:
        self.port = grpc_port
        self.process = subprocess.Popen(CLI + ["serve", "--config", str(config), "--grpc-port", str(grpc_port),
                                               "--metrics-port", "-1", *extra],
                                        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)

    def events(self) -> list[dict]:
        out = []
        for line in list(self.lines):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def wait_for(self, event: str, timeout: float = START_S, count: int = 1) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.events() if e.get("event") == event]
            if len(found) >= count:
                return found[count - 1]
            assert self.process.poll() is None, "".join(self.lines)
            time.sleep(0.1)
        raise AssertionError(f"no {event!r} within {timeout} s:\n" + "".join(self.lines[-30:]))

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"127.0.0.1:{self.port}", options=channel_options())

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=10)


L = 8


def _step(step: int, request_id: str | None = None) -> pb.StepState:
    return topk_step(torch.full((L, 4), 3000) + torch.arange(4), torch.tensor([[0.6, 0.2, 0.1, 0.05]] * L),
                     step=step, info=info_for(request_id, L) if request_id else None)


class HeldStream:
    """A Watch stream whose messages the test releases one at a time."""

    def __init__(self, channel: grpc.Channel, request_id: str) -> None:
        self.queue: list[pb.StepState | None] = [_step(0, request_id)]
        self.ready = threading.Condition()
        self.result: dict[str, object] = {}
        self.events: list[pb.MonitorEvent] = []  # as they arrive
        call = self.call = pb_grpc.CanvasMonitorStub(channel).Watch(self._messages(), timeout=120)
        self.thread = threading.Thread(target=self._collect, args=(call,), daemon=True)
        self.thread.start()

    def _messages(self):
        while True:
            with self.ready:
                self.ready.wait_for(lambda: self.queue)
                message = self.queue.pop(0)
            if message is None:
                return
            yield message

    def send(self, *messages: pb.StepState | None) -> None:
        with self.ready:
            self.queue.extend(messages)
            self.ready.notify_all()

    def _collect(self, call) -> None:
        events = self.events
        try:
            for event in call:
                events.append(event)
            self.result["events"] = events
        except grpc.RpcError as err:
            self.result.update(events=events, code=err.code(), details=err.details())

    def join(self) -> dict[str, object]:
        self.thread.join(timeout=120)
        return self.result


def _final() -> pb.StepState:
    return pb.StepState(final=True, output_ids=[3000])


def _wait_active(serve: Serve, channel: grpc.Channel, request_id: str) -> None:
    """Until the server logged the request's start (its first message was handled; a debug line)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(e.get("event") == "request_started" and e.get("request_id") == request_id for e in serve.events()):
            return
        time.sleep(0.05)
    raise AssertionError(f"{request_id} never started")


def test_a_second_serve_on_a_port_in_use_refuses_with_one_line(vocab, tmp_path):
    running = start_sidecar(vocab, tmp_path)
    try:
        port = running.thread.sidecar.grpc_port
        done = subprocess.run(CLI + ["serve", "--grpc-port", str(port), "--metrics-port", "-1"],
                              capture_output=True, text=True, timeout=START_S)
    finally:
        running.thread.stop()
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("canvaswatch:")]
    assert errors == [f"canvaswatch: server.grpc_port: cannot bind 127.0.0.1:{port} (in use?)"], done.stderr
    assert "Traceback" not in done.stderr
    assert "Failed to add port" not in done.stderr, "found before gRPC binds: no C-core line of its own"


def test_sigterm_drains_open_streams_refuses_new_ones_and_exits_0(tmp_path):
    audit = tmp_path / "audit.jsonl"
    config = tmp_path / "sidecar.toml"
    config.write_text(f'[server]\ndrain_grace_s = 30.0\n[logging]\naudit_log = "{audit}"\nlevel = "debug"\n'
                      '[monitors.lexicon]\npatterns = ["ignore previous instructions"]\n')
    serve = Serve(config, _free_port())
    try:
        serve.wait_for("sidecar_started")
        with serve.channel() as channel:
            held = HeldStream(channel, "in-flight")
            _wait_active(serve, channel, "in-flight")
            serve.process.send_signal(signal.SIGTERM)
            serve.wait_for("draining")
            with pytest.raises(grpc.RpcError) as refused:  # a new stream after the signal
                list(pb_grpc.CanvasMonitorStub(channel).Watch(iter([_step(0, "late"), _final()]), timeout=30))
            held.send(_step(1), _final(), None)  # the open stream finishes after the signal
            result = held.join()
        code = serve.process.wait(timeout=60)
    finally:
        serve.stop()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in refused.value.details()
    assert "code" not in result, result
    assert result["events"][-1].verdict.request_id == "in-flight"
    assert code == 0
    events = [e["event"] for e in serve.events()]
    assert events.index("draining") < events.index("drained") < events.index("sidecar_stopped")
    assert serve.wait_for("drained")["cut"] == 0


def test_sigterm_cuts_a_stream_past_the_drain_deadline_with_unavailable(tmp_path):
    config = tmp_path / "sidecar.toml"
    config.write_text('[server]\ndrain_grace_s = 1.0\n[logging]\nlevel = "debug"\n[monitors.lexicon]\n')
    serve = Serve(config, _free_port())
    try:
        serve.wait_for("sidecar_started")
        with serve.channel() as channel:
            held = HeldStream(channel, "never-finishes")
            _wait_active(serve, channel, "never-finishes")
            serve.process.send_signal(signal.SIGTERM)
            result = held.join()
            held.send(None)
        code = serve.process.wait(timeout=60)
    finally:
        serve.stop()
    assert result.get("code") == grpc.StatusCode.UNAVAILABLE, result
    assert "server.drain_grace_s = 1 s" in result["details"]
    assert code == 0
    assert serve.wait_for("drained")["cut"] == 1


def test_sighup_reloads_monitors_for_new_streams_and_refuses_a_bad_config(tmp_path):
    config = tmp_path / "sidecar.toml"
    config.write_text('[logging]\nlevel = "debug"\n[monitors.lexicon]\n[monitors.self_correction]\n')
    serve = Serve(config, _free_port())
    try:
        serve.wait_for("sidecar_started")
        with serve.channel() as channel:
            stub = pb_grpc.CanvasMonitorStub(channel)
            before = [m.name for m in stub.ListMonitors(pb.ListMonitorsRequest(), timeout=30).monitors]
            held = HeldStream(channel, "opened-before")
            _wait_active(serve, channel, "opened-before")

            config.write_text('[monitors.token_smearing]\n')
            serve.process.send_signal(signal.SIGHUP)
            serve.wait_for("config_reloaded")
            after = [m.name for m in stub.ListMonitors(pb.ListMonitorsRequest(), timeout=30).monitors]
            held.send(_step(1), _final(), None)  # finishes on the engine it started on
            old = held.join()

            config.write_text('[server]\nmax_streams = "many"\n[monitors.self_correction]\n')
            serve.process.send_signal(signal.SIGHUP)
            refused = serve.wait_for("config_reload_refused")
            still = [m.name for m in stub.ListMonitors(pb.ListMonitorsRequest(), timeout=30).monitors]
            trace = simulate.scenario("clean", lambda text: [3000] * len(text.split()), 262144, request_id="after")
            verdict = list(stub.Watch(iter(trace.steps), timeout=60))[-1].verdict
        assert serve.process.poll() is None  # SIGHUP never ends the process
    finally:
        code = serve.stop()
    assert before == ["lexicon", "self_correction"] and after == ["token_smearing"] and still == after
    assert "code" not in old and old["events"][-1].verdict.request_id == "opened-before"
    assert refused["error"].startswith("server.max_streams: expected int")
    assert verdict.request_id == "after"
    assert code == 0


def test_with_worker_processes_a_drain_cuts_with_unavailable_and_reload_says_it_is_unsupported(vocab, tmp_path):
    import asyncio

    running = start_sidecar(vocab, tmp_path, {"server": {"monitor_processes": 1}})
    sidecar, loop = running.thread.sidecar, running.thread._loop
    try:
        reloaded = asyncio.run_coroutine_threadsafe(sidecar.reload(None), loop).result(timeout=30)
        with running.channel() as channel:
            held = HeldStream(channel, "worker-stream")
            deadline = time.monotonic() + 30
            while sidecar.slots.active == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            cut = asyncio.run_coroutine_threadsafe(sidecar.drain(0.5), loop).result(timeout=30)
            result = held.join()
            held.send(None)
            with pytest.raises(grpc.RpcError) as refused:
                list(pb_grpc.CanvasMonitorStub(channel).Watch(iter([_step(0, "late"), _final()]), timeout=30))
    finally:
        running.thread.stop()
    assert reloaded is False
    assert cut == 1 and result.get("code") == grpc.StatusCode.UNAVAILABLE, result
    assert "server.drain_grace_s = 0.5 s" in result["details"]
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def _outcomes(running) -> dict[str, float]:
    import re

    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'canvaswatch_requests_total\{[^}]*outcome="(\w+)"\} ([0-9.]+)', running.metrics_text())}


@pytest.mark.parametrize("processes", [0, 1], ids=["in_process", "worker_mode"])
def test_a_stream_cut_at_the_drain_deadline_counts_incomplete_and_one_left_after_its_verdict_ok(vocab, tmp_path,
                                                                                              processes):
    """docs/operations.md: streams cut at the drain deadline are counted as incomplete (not as a client's
    cancellation); a client that goes away once its verdict came was served: ok."""
    import asyncio

    running = start_sidecar(vocab, tmp_path, {"server": {"monitor_processes": processes}})
    sidecar, loop = running.thread.sidecar, running.thread._loop
    try:
        with running.channel() as channel:
            served = HeldStream(channel, "served")
            served.send(_step(1), _final())  # never half-closes: the client cancels once the verdict is in
            deadline = time.monotonic() + 60
            while not any(e.HasField("verdict") for e in served.events) and time.monotonic() < deadline:
                time.sleep(0.05)
            served.call.cancel()
            served.join()
            held = HeldStream(channel, "held")
            while sidecar.slots.active < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            cut = asyncio.run_coroutine_threadsafe(sidecar.drain(0.5), loop).result(timeout=30)
            held.join()
            held.send(None)
            deadline = time.monotonic() + 30
            while sum(_outcomes(running).values()) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)  # (a worker's counts reach /metrics with its next snapshot)
            outcomes = _outcomes(running)
    finally:
        running.thread.stop()
    assert cut == 1
    assert outcomes == {"ok": 1.0, "incomplete": 1.0}, outcomes


def test_two_quick_reloads_install_the_last_signalled_config(vocab, tmp_path, monkeypatch):
    """Reloads run one at a time in signal order: a slow build of the first cannot land after the second."""
    import asyncio

    from canvaswatch.server.app import Sidecar

    running = start_sidecar(vocab, tmp_path, {})
    sidecar, loop = running.thread.sidecar, running.thread._loop
    first, second = tmp_path / "first.toml", tmp_path / "second.toml"
    first.write_text("[monitors.lexicon]\n")
    second.write_text("[monitors.token_smearing]\n")
    build = Sidecar._reloaded_engine

    def slow_for_the_first(self, path, overrides):
        if path == str(first):
            time.sleep(1.0)
        return build(self, path, overrides)

    monkeypatch.setattr(Sidecar, "_reloaded_engine", slow_for_the_first)
    try:
        older = asyncio.run_coroutine_threadsafe(sidecar.reload(str(first)), loop)
        time.sleep(0.1)
        newer = asyncio.run_coroutine_threadsafe(sidecar.reload(str(second)), loop)
        assert older.result(timeout=60) and newer.result(timeout=60)
        with running.channel() as channel:
            names = [m.name for m in pb_grpc.CanvasMonitorStub(channel).ListMonitors(pb.ListMonitorsRequest(),
                                                                                     timeout=30).monitors]
    finally:
        running.thread.stop()
    assert names == ["token_smearing"]


def test_drain_grace_is_validated_naming_the_key():
    from canvaswatch.server.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=r"server.drain_grace_s: must be in \[0, 3600\] seconds"):
        parse_config({"server": {"drain_grace_s": -1}})
