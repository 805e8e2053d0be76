"""A finished request's verdict: what the Watch stream's last event, `Check` and the sinks report."""

from __future__ import annotations

from dataclasses import dataclass

from canvaswatch.monitors.base import Flag, Severity


@dataclass(frozen=True)
class SessionVerdict:
    request_id: str
    flags: tuple[Flag, ...]
    max_severity: Severity | None
    steps_seen: int
    steps_dropped: int
    monitor_errors: tuple[str, ...]
    # Flags raised but left out of `flags` by the per-request bounds (server.max_flags_per_monitor,
    # server.max_verdict_bytes); `flags` then ends with one summary flag from monitor "canvaswatch".
    flags_dropped: int = 0
