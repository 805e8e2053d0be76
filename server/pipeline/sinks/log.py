"""structlog events: flag_raised per flag (up to a bound per request and monitor), request_finished per verdict.

Evidence snippets are decoded text, so they are logged only when logging.log_content allows.

flag_raised stops after server.max_flags_per_monitor lines for one monitor in one request (the
verdict's own bound); request_finished then says how many were not logged (`flags_not_logged`).
The audit log and the metrics still get every flag: the process log is for operators,
and a request raising thousands of flags (a flag storm: 50 a step) used to spend half of its
sidecar time rendering log lines on its step thread, time the other streams waited for the GIL
(BENCHMARKS.md, "A normal client under abuse, session 7").
"""

from __future__ import annotations

import structlog

from canvaswatch.monitors.base import Flag
from canvaswatch.server.pipeline.sinks.base import RequestRecord
from canvaswatch.server.pipeline.verdict import SessionVerdict

log = structlog.get_logger(__name__)


class LogSink:
    def __init__(self, log_content: bool, max_per_monitor: int = 100) -> None:
        self.log_content = log_content
        self.max_per_monitor = max_per_monitor  # server.max_flags_per_monitor

    def on_flag(self, request: RequestRecord, flag: Flag) -> None:
        # The counts live on the request's record: one session's thread touches it, so no lock, and they
        # end with the request (kept here by request id, a refused request's counts passed to a retry).
        counts = request.flags_by_monitor
        counts[flag.monitor] += 1
        if counts[flag.monitor] > self.max_per_monitor:
            return
        log.info(
            "flag_raised", request_id=request.meta.request_id, monitor=flag.monitor,
            severity=flag.severity.name, reason=flag.reason,
            **({"snippets": [e.snippet for e in flag.evidence]} if self.log_content else {}),
        )

    def on_verdict(self, request: RequestRecord, verdict: SessionVerdict) -> None:
        counts = request.flags_by_monitor
        unlogged = sum(max(0, n - self.max_per_monitor) for n in counts.values())
        log.info("request_finished", request_id=verdict.request_id, model=request.meta.model,
                 canvas_length=request.meta.canvas_length, flags=len(verdict.flags),
                 max_severity=verdict.max_severity.name if verdict.max_severity else "none",
                 steps_seen=verdict.steps_seen, steps_dropped=verdict.steps_dropped,
                 **({"flags_not_logged": unlogged} if unlogged else {}))

    def close(self) -> None:
        pass
