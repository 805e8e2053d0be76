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

import collections
import threading

import structlog

from canvaswatch.monitors.base import Flag
from canvaswatch.server.pipeline.sinks.base import RequestRecord
from canvaswatch.server.pipeline.verdict import SessionVerdict

log = structlog.get_logger(__name__)

# Requests whose counts are kept; one that never finishes (cancelled, refused) is forgotten once this
# many newer ones have flagged, so the table stays bounded.
MAX_TRACKED_REQUESTS = 4096


class LogSink:
    def __init__(self, log_content: bool, max_per_monitor: int = 100) -> None:
        self.log_content = log_content
        self.max_per_monitor = max_per_monitor  # server.max_flags_per_monitor
        self._counts: dict[str, collections.Counter[str]] = {}  # request id -> flags raised, per monitor
        self._lock = threading.Lock()  # sessions run on their own threads

    def on_flag(self, request: RequestRecord, flag: Flag) -> None:
        request_id = request.meta.request_id
        with self._lock:
            counts = self._counts.get(request_id)
            if counts is None:
                if len(self._counts) >= MAX_TRACKED_REQUESTS:
                    del self._counts[next(iter(self._counts))]  # the oldest
                counts = self._counts[request_id] = collections.Counter()
            counts[flag.monitor] += 1
            if counts[flag.monitor] > self.max_per_monitor:
                return
        log.info(
            "flag_raised", request_id=request_id, monitor=flag.monitor,
            severity=flag.severity.name, reason=flag.reason,
            **({"snippets": [e.snippet for e in flag.evidence]} if self.log_content else {}),
        )

    def on_verdict(self, request: RequestRecord, verdict: SessionVerdict) -> None:
        with self._lock:
            counts = self._counts.pop(verdict.request_id, None)
        unlogged = sum(max(0, n - self.max_per_monitor) for n in counts.values()) if counts else 0
        log.info("request_finished", request_id=verdict.request_id, model=request.meta.model,
                 canvas_length=request.meta.canvas_length, flags=len(verdict.flags),
                 max_severity=verdict.max_severity.name if verdict.max_severity else "none",
                 steps_seen=verdict.steps_seen, steps_dropped=verdict.steps_dropped,
                 **({"flags_not_logged": unlogged} if unlogged else {}))

    def close(self) -> None:
        pass
