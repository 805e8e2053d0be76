"""One audit-log line per flag (logging.audit_log), linking the request's report when there is one."""

from __future__ import annotations

from canvaswatch.monitors.base import Flag
from canvaswatch.server.ops.audit import AuditLog
from canvaswatch.server.pipeline.sinks.base import RequestRecord
from canvaswatch.server.pipeline.verdict import SessionVerdict


class AuditSink:
    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit

    def on_flag(self, request: RequestRecord, flag: Flag) -> None:
        self.audit.record(request.meta, flag, report=str(request.report_path) if request.report_path else None)

    def on_verdict(self, request: RequestRecord, verdict: SessionVerdict) -> None:
        pass  # the audit log is per flag; a clean request leaves no line

    def close(self) -> None:
        self.audit.close()
