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
