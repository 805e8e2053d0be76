"""structlog events: flag_raised per flag, request_finished per verdict.

Evidence snippets are decoded text, so they are logged only when logging.log_content allows.
"""

from __future__ import annotations

import structlog

from canvaswatch.monitors.base import Flag
from canvaswatch.server.pipeline.sinks.base import RequestRecord
from canvaswatch.server.pipeline.verdict import SessionVerdict

log = structlog.get_logger(__name__)


class LogSink:
    def __init__(self, log_content: bool) -> None:
        self.log_content = log_content

    def on_flag(self, request: RequestRecord, flag: Flag) -> None:
        log.info(
            "flag_raised", request_id=request.meta.request_id, monitor=flag.monitor,
            severity=flag.severity.name, reason=flag.reason,
            **({"snippets": [e.snippet for e in flag.evidence]} if self.log_content else {}),
        )

    def on_verdict(self, request: RequestRecord, verdict: SessionVerdict) -> None:
        log.info("request_finished", request_id=verdict.request_id, flags=len(verdict.flags),
                 max_severity=verdict.max_severity.name if verdict.max_severity else "none",
                 steps_seen=verdict.steps_seen, steps_dropped=verdict.steps_dropped)

    def close(self) -> None:
        pass
