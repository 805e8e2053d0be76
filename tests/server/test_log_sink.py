"""The process log's flag_raised lines are bounded per request and monitor (the verdict's bound); the
rest are counted in request_finished. The audit log and the events still get every flag (test_bounds)."""

from __future__ import annotations

import types

from canvaswatch.monitors.base import Flag, Severity
from canvaswatch.server.pipeline.sinks import log as log_sink
from canvaswatch.server.pipeline.sinks.log import LogSink
from canvaswatch.server.pipeline.verdict import SessionVerdict


def _record(request_id: str):
    return types.SimpleNamespace(meta=types.SimpleNamespace(request_id=request_id, model="m", canvas_length=8))


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
    assert sink._counts == {}  # a finished request is forgotten


def test_requests_that_never_finish_do_not_grow_the_table(monkeypatch):
    monkeypatch.setattr(log_sink, "MAX_TRACKED_REQUESTS", 3)
    monkeypatch.setattr(log_sink, "log", _Events())
    sink = LogSink(log_content=False, max_per_monitor=1)
    for i in range(10):
        sink.on_flag(_record(f"cancelled-{i}"), Flag("m", Severity.INFO, "x"))
    assert list(sink._counts) == ["cancelled-7", "cancelled-8", "cancelled-9"]
