"""The process log's flag_raised lines are bounded per request and monitor (the verdict's bound); the
rest are counted in request_finished. The audit log and the events still get every flag (test_bounds)."""

from __future__ import annotations

import collections
import types

from canvaswatch.monitors.base import Flag, Severity
from canvaswatch.server.pipeline.sinks import log as log_sink
from canvaswatch.server.pipeline.sinks.log import LogSink
from canvaswatch.server.pipeline.verdict import SessionVerdict


_RECORDS: dict[str, object] = {}


def _record(request_id: str, fresh: bool = False):
    """The request's one record (a session keeps one); `fresh`: a new request with the same id."""
    if fresh or request_id not in _RECORDS:
        _RECORDS[request_id] = types.SimpleNamespace(
            meta=types.SimpleNamespace(request_id=request_id, model="m", canvas_length=8),
            flags_by_monitor=collections.Counter())
    return _RECORDS[request_id]


class _Events(list):
    """Stands in for the module's structlog logger (capture_logs misses a logger that another test's
    configuration already cached on first use)."""

    def info(self, event: str, **fields) -> None:
        self.append({"event": event, **fields})


def _verdict(request_id: str) -> SessionVerdict:
    return SessionVerdict(request_id=request_id, flags=(), max_severity=None, steps_seen=1, steps_dropped=0,
                          monitor_errors=())


def test_flag_lines_stop_at_the_bound_per_monitor_and_request_finished_counts_the_rest(monkeypatch):
    events = _Events()
    monkeypatch.setattr(log_sink, "log", events)
    sink = LogSink(log_content=False, max_per_monitor=2)
    _record("r1", fresh=True), _record("r2", fresh=True)
    for i in range(5):
        sink.on_flag(_record("r1"), Flag("storm", Severity.INFO, f"flag {i}"))
    sink.on_flag(_record("r1"), Flag("lexicon", Severity.WARNING, "phrase"))
    sink.on_flag(_record("r2"), Flag("storm", Severity.INFO, "other request"))
    sink.on_verdict(_record("r1"), _verdict("r1"))
    sink.on_verdict(_record("r2"), _verdict("r2"))
    raised = [(e["request_id"], e["monitor"], e["reason"]) for e in events if e["event"] == "flag_raised"]
    assert raised == [("r1", "storm", "flag 0"), ("r1", "storm", "flag 1"), ("r1", "lexicon", "phrase"),
                      ("r2", "storm", "other request")]
    finished = {e["request_id"]: e for e in events if e["event"] == "request_finished"}
    assert finished["r1"]["flags_not_logged"] == 3
    assert finished["r1"]["model"] == "m" and finished["r1"]["canvas_length"] == 8  # the request's one info line
    assert "flags_not_logged" not in finished["r2"]


def test_a_request_that_never_finished_passes_no_count_to_a_retry_with_its_id(monkeypatch):
    # Counts were kept by request id until a verdict: a refused or cancelled request's counts went to its
    # retry, whose flag lines were then suppressed from the first step.
    events = _Events()
    monkeypatch.setattr(log_sink, "log", events)
    sink = LogSink(log_content=False, max_per_monitor=2)
    refused = _record("req-1", fresh=True)
    for _ in range(5):
        sink.on_flag(refused, Flag("storm", Severity.INFO, "refused"))  # ... then refused: no verdict
    retry = _record("req-1", fresh=True)
    sink.on_flag(retry, Flag("storm", Severity.INFO, "retry"))
    assert [e["reason"] for e in events if e["event"] == "flag_raised"] == ["refused", "refused", "retry"]
