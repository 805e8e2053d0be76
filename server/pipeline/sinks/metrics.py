"""Flags counted in canvaswatch_flags{monitor, severity, model}."""

from __future__ import annotations

from canvaswatch.monitors.base import Flag
from canvaswatch.server.ops.metrics import Metrics
from canvaswatch.server.pipeline.sinks.base import RequestRecord
from canvaswatch.server.pipeline.verdict import SessionVerdict


class MetricsSink:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def on_flag(self, request: RequestRecord, flag: Flag) -> None:
        self.metrics.flags.labels(flag.monitor, flag.severity.name, request.model_label).inc()

    def on_verdict(self, request: RequestRecord, verdict: SessionVerdict) -> None:
        pass  # requests are counted by outcome where the outcome is known (the stream, check_trace)

    def close(self) -> None:
        pass
