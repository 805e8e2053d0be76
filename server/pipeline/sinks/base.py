"""The sink contract: what a session tells each destination of its side effects."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from canvaswatch.monitors.base import Flag, RequestMeta
from canvaswatch.server.ops.report import RequestHistory
from canvaswatch.server.pipeline.verdict import SessionVerdict


@dataclass(frozen=True)
class RequestRecord:
    """The request a flag or verdict belongs to, as the session opened it."""

    meta: RequestMeta
    model_label: str  # the bounded metrics label for meta.model (Metrics.model_label)
    history: RequestHistory | None = None  # steps kept for a report, when one is wanted
    report_path: Path | None = None  # where the report goes if the request is flagged (logging.report_dir)
    # flags raised so far per monitor, for the process log's bound (sinks/log.py): with the request, so a
    # request that never finishes leaves nothing behind and another with the same id starts from zero
    flags_by_monitor: collections.Counter = field(default_factory=collections.Counter, compare=False)


class Sink(Protocol):
    """Called from the request's own thread: a sink that blocks delays that request's next step."""

    def on_flag(self, request: RequestRecord, flag: Flag) -> None:
        """Every flag, as it is raised (fail_closed's flags for failed monitors included)."""
        ...

    def on_verdict(self, request: RequestRecord, verdict: SessionVerdict) -> None:
        """Once per finished request, after its last flag; history.output_ids is set by then."""
        ...

    def close(self) -> None:
        """The engine is closing: release files, flush buffers."""
        ...
