"""Bounded per request: client strings and prompt ids, the flags a verdict keeps, audit lines and files, labels."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from canvaswatch.monitors.base import Evidence, Flag, RequestMeta, Severity
from canvaswatch.server.config import ConfigError, parse_config
from canvaswatch.server.ops.audit import MAX_LINE_BYTES, AuditLog
from canvaswatch.server.ops.metrics import OTHER, Metrics
from canvaswatch.server.pipeline.wire import request_meta
from canvaswatch.v1 import monitor_pb2 as pb
from canvaswatch.v1 import monitor_pb2_grpc as pb_grpc
from tests.conftest import install_plugin_source, start_sidecar, topk_step

L, K = 8, 4


def _step(step: int, info: pb.RequestInfo | None = None) -> pb.StepState:
    return topk_step(torch.full((L, K), 3000) + torch.arange(K), torch.tensor([[0.6, 0.2, 0.1, 0.05]] * L),
                     step=step, info=info)


def _info(**fields) -> pb.RequestInfo:
    return pb.RequestInfo(**{"request_id": "bounded", "model": "test-model", "canvas_length": L, **fields})


def _watch(running, messages: list[pb.StepState]) -> tuple[list[pb.MonitorEvent], grpc.RpcError | None]:
    events: list[pb.MonitorEvent] = []
    with running.channel() as channel:
        try:
            for event in pb_grpc.CanvasMonitorStub(channel).Watch(iter(messages), timeout=30):
                events.append(event)
        except grpc.RpcError as err:
            return events, err
    return events, None


@pytest.fixture(scope="module")
def bounded(vocab, tmp_path_factory):
    running = start_sidecar(vocab, tmp_path_factory.mktemp("bounded"), {"server": {"max_prompt_ids": 100}})
    yield running
    running.thread.stop()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tenant": "t" * 1_000_000}, "message[0].info.tenant: 1000000 characters, longer than 256"),
        ({"model": "m" * 100_000}, "message[0].info.model: 100000 characters, longer than 256"),
        ({"prompt_ids": list(range(101))}, "message[0].info.prompt_ids: 101 ids, more than server.max_prompt_ids = 100"),
        ({"attributes": {f"k{i}": "v" for i in range(65)}}, "message[0].info.attributes: 65 entries, more than 64"),
        ({"attributes": {"k": "v" * 20_000}}, "message[0].info.attributes['k']: keys are at most 128 characters and values at most 16384"),
    ],
)
def test_request_fields_beyond_their_bounds_are_refused_naming_the_bound(bounded, fields, message):
    _, error = _watch(bounded, [_step(0, _info(**fields)), pb.StepState(final=True, output_ids=[3000])])
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == message


def test_prompt_ids_at_the_bound_are_taken(bounded):
    events, error = _watch(bounded, [_step(0, _info(prompt_ids=list(range(100)))), pb.StepState(final=True, output_ids=[3000])])
    assert error is None and events[-1].HasField("verdict")


FLOODING = '''
from dataclasses import dataclass
from canvaswatch.monitors.base import Evidence, Flag, Severity

@dataclass(frozen=True)
class Params:
    per_step: int = 40

class Flooding:
    name = "flooding"
    description = "raises per_step 2 KB flags every step, the last one CRITICAL (test plugin)"
    Params = Params

    def __init__(self, params):
        self.params = params

    def start(self, request):
        return None

    def on_step(self, state, step):
        return [Flag(monitor=self.name, severity=Severity.CRITICAL if step.step == 9 and i == 0 else Severity.INFO,
                     reason="r" * 2000, evidence=(Evidence(step.block, step.step, tuple(range(8))),))
                for i in range(self.params.per_step)]

    def on_finish(self, state, final):
        return []
'''


@pytest.fixture
def flooding_plugin(tmp_path: Path, monkeypatch):
    yield from install_plugin_source(tmp_path, monkeypatch, "cw_flood_plugin", FLOODING, {"flooding": "Flooding"})


@pytest.mark.parametrize(("mode", "stream_all"), [("in_process", False), ("workers", False), ("in_process", True)])
def test_a_flood_of_flags_gets_a_verdict_that_fits_and_says_what_it_left_out(vocab, tmp_path, flooding_plugin, mode,
                                                                               stream_all):
    server = {"max_verdict_bytes": 65536, "max_flags_per_monitor": 100, "stream_flags_past_bounds": stream_all}
    if mode == "workers":
        server["monitor_processes"] = 1
    running = start_sidecar(vocab, tmp_path, {"server": server, "monitors": {"flooding": {}}})
    try:
        steps = [_step(i, _info() if i == 0 else None) for i in range(10)]  # 10 steps x 40 flags of ~2 KB
        events, error = _watch(running, [*steps, pb.StepState(final=True, output_ids=[3000])])
        metrics = running.metrics_text()
        if mode == "workers":  # the worker's count arrives with its snapshot
            import time
            deadline = time.monotonic() + 20
            while 'outcome="truncated"' not in metrics and time.monotonic() < deadline:
                time.sleep(0.1)
                metrics = running.metrics_text()
    finally:
        running.thread.stop()
    assert error is None
    verdict = events[-1].verdict
    streamed = [e.flag for e in events if e.HasField("flag")]
    assert verdict.ByteSize() <= 65536 + 4096  # the kept flags' budget plus the summary
    *kept, summary = verdict.flags
    assert 20 <= len(kept) < 40 and all(f.monitor == "flooding" for f in kept)
    if stream_all:
        assert len(streamed) == 400 and summary.attributes["flags_not_streamed"] == "0"
    else:  # the kept ones, then past the bounds only the escalation to CRITICAL (step 9's first flag)
        assert streamed[:len(kept)] == kept and len(streamed) == len(kept) + 1
        assert streamed[-1].severity == pb.CRITICAL and streamed[-1].evidence[0].step == 9
        assert summary.attributes["flags_not_streamed"] == str(400 - len(kept) - 1)
    assert summary.monitor == "canvaswatch"
    assert summary.attributes["flags_dropped"] == str(400 - len(kept)) == summary.attributes["dropped.flooding"]
    assert "server.max_verdict_bytes = 65536" in summary.reason
    assert summary.severity == pb.CRITICAL and verdict.max_severity == pb.CRITICAL  # a dropped CRITICAL still counts
    assert 'canvaswatch_requests_total{model="test-model",outcome="truncated"} 1.0' in metrics
    audit = running.audit_path.read_text().splitlines()
    assert len(audit) == 400 and all(len(line.encode()) < MAX_LINE_BYTES for line in audit)


def test_flags_per_monitor_are_capped_before_the_byte_budget():
    from canvaswatch.server.pipeline.session import Session, SessionSettings

    session = Session(meta=RequestMeta("r", "m", "", (), 8, 0, {}), monitors=[], metrics=Metrics(), sinks=[],
                      settings=SessionSettings(max_flags_per_monitor=3))
    session._record([Flag("a", Severity.WARNING, "x") for _ in range(5)] + [Flag("b", Severity.INFO, "y")])
    verdict = session.verdict()
    assert [f.monitor for f in verdict.flags] == ["a", "a", "a", "b", "canvaswatch"]
    assert verdict.flags_dropped == 2
    assert verdict.flags[-1].attributes == {"flags_dropped": "2", "flags_not_streamed": "2", "dropped.a": "2"}
    assert verdict.flags[-1].severity == Severity.WARNING


def test_past_the_bounds_only_a_monitors_escalations_are_streamed():
    from canvaswatch.server.pipeline.session import Session, SessionSettings

    session = Session(meta=RequestMeta("r", "m", "", (), 8, 0, {}), monitors=[], metrics=Metrics(), sinks=[],
                      settings=SessionSettings(max_flags_per_monitor=2))
    info, warning, critical = Severity.INFO, Severity.WARNING, Severity.CRITICAL

    def streamed(*raised: tuple[str, Severity]) -> list[tuple[str, Severity]]:
        return [(f.monitor, f.severity) for f in session._record([Flag(m, s, "x") for m, s in raised])]

    assert streamed(("a", info), ("a", info), ("a", info)) == [("a", info), ("a", info)]  # the third is past the bound
    assert streamed(("a", warning), ("b", info), ("a", info), ("a", warning)) == [("a", warning), ("b", info)]
    assert streamed(("a", critical), ("a", critical), ("a", warning)) == [("a", critical)]
    summary = session.verdict().flags[-1]
    assert summary.attributes == {"flags_dropped": "7", "flags_not_streamed": "5", "dropped.a": "7"}
    assert "2 of them were streamed" in summary.reason and summary.severity == critical


class _FloodsThenFails:
    """Raises `per_step` INFO flags a step and fails on step `fails_at` (-1: in start, 99: in on_finish)."""

    name = "floods"

    def __init__(self, per_step: int, fails_at: int) -> None:
        self.per_step, self.fails_at, self.calls = per_step, fails_at, 0

    def start(self, request):
        if self.fails_at == -1:
            raise RuntimeError("no start")
        return None

    def on_step(self, state, step):
        self.calls += 1
        if self.calls == self.fails_at:
            raise RuntimeError("broken")
        return [Flag(self.name, Severity.INFO, "x") for _ in range(self.per_step)]

    def on_finish(self, state, final):
        if self.fails_at == 99:
            raise RuntimeError("no finish")
        return []


@pytest.mark.parametrize("fails_at", [-1, 3, 99])
def test_fail_closed_flags_are_streamed_even_past_the_bounds(fails_at):
    """A monitor failing under fail_closed makes a CRITICAL flag: it goes out as an event with the next
    step's events (or the finish's), past the bounds too, exactly once."""
    import types

    from canvaswatch.server.pipeline.session import Session, SessionSettings

    monitor = _FloodsThenFails(per_step=5, fails_at=fails_at)
    session = Session(meta=RequestMeta("r", "m", "", (), 8, 0, {}), monitors=[monitor], metrics=Metrics(), sinks=[],
                      settings=SessionSettings(policy="fail_closed", max_flags_per_monitor=4))
    events = [session.on_step(types.SimpleNamespace(residual_mean=None)) for _ in range(4)]
    finish_events, verdict = session.finish((), "")
    events.append(finish_events)
    critical = [(i, f) for i, step in enumerate(events) for f in step if f.severity == Severity.CRITICAL]
    assert len(critical) == 1 and "fail_closed" in critical[0][1].reason
    assert critical[0][0] == {-1: 0, 3: 2, 99: 4}[fails_at]  # the step (or the finish) it failed in
    assert verdict.max_severity == Severity.CRITICAL
    streamed_info = sum(f.severity == Severity.INFO for step in events for f in step)
    assert streamed_info == (0 if fails_at == -1 else 4)  # the kept four; the rest past the bound stay unsent


@settings(max_examples=300, deadline=None)
@given(bound=st.integers(1, 4), budget_flags=st.integers(1, 12),
       raised=st.lists(st.lists(st.tuples(st.sampled_from("ab"), st.sampled_from(list(Severity))), max_size=6),
                       max_size=8))
def test_a_client_acting_on_events_sees_each_monitors_first_flag_at_each_severity(bound, budget_flags, raised):
    """Whatever the bounds drop (flags per monitor, or the verdict's bytes, which one monitor's flags can
    spend for the other), when a monitor first raises a flag at severity >= s, a flag of its at severity
    >= s is among the events of that same step."""
    from canvaswatch.server.pipeline.session import Session, SessionSettings, wire_size

    size = wire_size(Flag("a", Severity.INFO, "x"))
    session = Session(meta=RequestMeta("r", "m", "", (), 8, 0, {}), monitors=[], metrics=Metrics(), sinks=[],
                      settings=SessionSettings(max_flags_per_monitor=bound, max_verdict_bytes=budget_flags * size))
    seen_raised: set[tuple[str, Severity]] = set()
    seen_streamed: set[tuple[str, Severity]] = set()
    for step in raised:
        out = session._record([Flag(m, s, "x") for m, s in step])
        assert len(out) <= len(step)
        for m, s in step:
            for level in Severity:
                if s >= level:
                    seen_raised.add((m, level))
        for f in out:
            for level in Severity:
                if f.severity >= level:
                    seen_streamed.add((f.monitor, level))
        assert seen_raised == seen_streamed
    counts: collections.Counter = collections.Counter()
    expected_kept = []
    for m, s in (flag for step in raised for flag in step):
        if counts[m] < bound and len(expected_kept) < budget_flags:
            counts[m] += 1
            expected_kept.append((m, s))
    kept = [(f.monitor, f.severity) for f in session.verdict().flags if f.monitor != "canvaswatch"]
    # each monitor's first `bound` flags while the bytes last, events or not; the last of them may have made
    # room for the rest of the verdict (its id, the summary), which these tiny budgets cannot hold anyway
    assert kept == expected_kept[:len(kept)]


def _flag(reason: str = "r", positions: int = 3, attributes: int = 1) -> Flag:
    return Flag("lexicon", Severity.WARNING, reason, evidence=(Evidence(0, 1, tuple(range(positions)), "snip"),) * 2,
                attributes={f"a{i}": "v" * 50 for i in range(attributes)})


def test_an_audit_line_is_bounded_and_says_it_was_shortened(tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl", include_content=True)
    meta = RequestMeta("req", "model", "t" * 256, (), 8, 0, {})
    audit.record(meta, _flag(reason="x" * 500_000, positions=100_000, attributes=5_000))
    audit.record(meta, _flag())
    audit.close()
    huge, small = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert len(huge.encode()) <= MAX_LINE_BYTES
    entry = json.loads(huge)
    assert entry["truncated"] is True and entry["request_id"] == "req" and entry["monitor"] == "lexicon"
    assert entry["evidence"][0]["positions_total"] == 100_000 and len(entry["evidence"][0]["positions"]) == 64
    assert "truncated" not in json.loads(small)


def test_the_audit_log_rotates_at_its_size_and_keeps_its_backups(tmp_path):
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, include_content=False, max_bytes=20_000, backups=2)
    meta = RequestMeta("req", "model", "", (), 8, 0, {})
    for _ in range(1_000):  # ~ 300 bytes a line: 300 KB through a 20 KB file
        audit.record(meta, _flag())
    audit.close()
    files = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("audit.jsonl"))
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2", "audit.jsonl.lock"]
    for name in files[:3]:
        text = (tmp_path / name).read_text()
        assert 0 < len(text.encode()) <= 20_000
        assert all(json.loads(line)["monitor"] == "lexicon" for line in text.splitlines())  # whole lines only


def test_model_labels_are_bounded_in_length_and_number():
    metrics = Metrics()
    assert metrics.model_label("m" * 100_000) == OTHER
    assert [metrics.model_label(f"model-{i}") for i in range(40)][-1] == OTHER
    assert metrics.model_label("m" * 128) == OTHER  # the 32 labels are taken by now
    assert Metrics().model_label("m" * 128) == "m" * 128


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"server": {"max_prompt_ids": -1}}, "server.max_prompt_ids: must be in [0, 16777216]"),
        ({"server": {"max_flags_per_monitor": 0}}, "server.max_flags_per_monitor: must be in [1, 100000]"),
        ({"server": {"max_verdict_bytes": 100}}, "server.max_verdict_bytes: must be in [4096, max_message_bytes - 65536"),
        ({"server": {"max_message_bytes": 1048576, "max_verdict_bytes": 1048576}}, "server.max_verdict_bytes"),
        ({"server": {"stream_flags_past_bounds": "yes"}}, "server.stream_flags_past_bounds: expected bool, got str 'yes'"),
        ({"logging": {"audit_max_bytes": 10}}, "logging.audit_max_bytes: must be 0 (never rotate) or >= 1048576"),
        ({"logging": {"audit_backups": 0}}, "logging.audit_backups: must be in [1, 1000]"),
    ],
)
def test_bound_keys_are_validated_naming_the_key(raw, message):
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    assert message in str(caught.value)


def test_prompt_ids_off_the_wire_reach_monitors_as_the_ids_sent():
    ids = [0, 1, 2**31 - 1, 262143] * 1000
    meta = request_meta(_info(prompt_ids=ids), "message[0].info")
    assert meta.prompt_ids.dtype == np.int32 and meta.prompt_ids.tolist() == ids
    assert not meta.prompt_ids.flags.writeable


def test_the_whole_verdict_fits_max_verdict_bytes_with_errors_and_the_summary():
    """Only the kept flags were charged against server.max_verdict_bytes: the summary flag, monitor_errors
    and the request id came on top (a review measured 7,482 bytes under a 4,096 limit)."""
    import types

    from canvaswatch.server.pipeline.session import Session, SessionSettings
    from canvaswatch.server.pipeline.wire import verdict_to_pb

    failing = [_FloodsThenFails(per_step=0, fails_at=1) for _ in range(3)]
    for index, monitor in enumerate(failing):
        monitor.name = f"fails_{index}"
    monitors = [_FloodsThenFails(per_step=100, fails_at=0), *failing]
    session = Session(meta=RequestMeta("r" * 256, "m", "", (), 8, 0, {}), monitors=monitors, metrics=Metrics(),
                      sinks=[], settings=SessionSettings(max_flags_per_monitor=1000, max_verdict_bytes=4096))
    for _ in range(3):
        session.on_step(types.SimpleNamespace(residual_mean=None))
    _, verdict = session.finish((), "")
    message = verdict_to_pb(verdict)
    assert message.ByteSize() <= 4096
    assert len(message.monitor_errors) == 3 and verdict.flags_dropped > 0
    assert message.flags[-1].monitor == "canvaswatch"  # the summary is there, counting what was left out
    assert int(message.flags[-1].attributes["flags_dropped"]) == verdict.flags_dropped == 300 - (len(message.flags) - 1)
