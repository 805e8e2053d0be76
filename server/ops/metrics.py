"""Prometheus metrics. The names and label sets are a contract: the Grafana dashboard and the alert
rules in deploy/ query them (tests/deploy checks that every name they use exists).

Labels stay bounded: `model` comes from clients, so only the first
MAX_MODEL_LABELS distinct values of at most MAX_MODEL_LABEL_CHARS characters
are kept and the rest are reported as "other". Request ids, tenants and token text never become labels.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from canvaswatch.server.ops.histograms import FastHistogram

MAX_MODEL_LABELS = 32
MAX_MODEL_LABEL_CHARS = 128  # a longer model name is reported as "other": 32 labels stay a few KB a scrape
OTHER = "other"

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_MASS_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


class Metrics:
    """Every metric the sidecar exports, in its own registry (no process-global state)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.steps = Counter("canvaswatch_steps", "Denoising steps received and decoded.", ["model"], registry=r)
        self.requests = Counter(
            "canvaswatch_requests", "Requests finished, by outcome (ok, truncated, invalid, incomplete, cancelled, error).",
            ["model", "outcome"], registry=r,
        )
        self.flags = Counter("canvaswatch_flags", "Flags raised by monitors.", ["monitor", "severity", "model"], registry=r)
        # Observed every step (FastHistogram: same exposition, a cheaper observe; server/ops/histograms.py).
        self.monitor_seconds = FastHistogram(
            "canvaswatch_monitor_seconds", "Time a monitor spent on one step or finish.", ["monitor"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.decode_seconds = FastHistogram(
            "canvaswatch_decode_seconds", "Time to decode one step's state into a canvas, by wire form.", ["form"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.monitor_errors = Counter(
            "canvaswatch_monitor_errors", "Monitor failures by kind (exception, overrun).", ["monitor", "kind"], registry=r
        )
        # A monitor switched off for the rest of one request by the budget policy (docs/operations.md):
        # over_budget (server.monitor_budget_strikes overruns in a row), hard_budget (one call past
        # server.monitor_budget_hard_ms), hard_deadline (a step still running past server.monitor_hard_deadline_s).
        self.monitors_stopped = Counter(
            "canvaswatch_monitors_stopped",
            "Monitors stopped for one request by the budget policy, by reason (over_budget, hard_budget, hard_deadline).",
            ["monitor", "reason"], registry=r,
        )
        self.workers_killed = Counter(
            "canvaswatch_monitor_workers_killed",
            "Monitor worker processes killed and replaced because they made no progress within "
            "server.monitor_hard_deadline_s (a runaway monitor).", registry=r,
        )
        self.stuck_threads = Gauge(
            "canvaswatch_stuck_step_threads",
            "In-process step threads still running a step past server.monitor_hard_deadline_s (their streams were "
            "ended; a Python thread cannot be killed). Non-zero: health says NOT_SERVING; restart, or use worker mode.",
            registry=r,
        )
        self.streams_refused = Counter(
            "canvaswatch_streams_refused",
            "Watch streams the server refused or ended on its own: limits (server_limit, peer_limit, token_limit), "
            "deadlines (first_message_timeout, idle_timeout), shutdown (draining, drain_deadline).",
            ["reason"], registry=r,
        )
        self.active_streams = Gauge("canvaswatch_active_streams", "Watch streams open now.", registry=r)
        self.residual_mass = FastHistogram(
            "canvaswatch_bottleneck_residual_mass",
            "Probability mass outside the kept top-k/top-p per position: when it grows, the bottleneck stops being a faithful view.",
            buckets=_MASS_BUCKETS, registry=r,
        )
        # Only the int8-screened CPU decoder (dense.backend = "screened") estimates the residual
        # instead of computing it exactly; this says how far residual_mass may be off for it.
        self.residual_error = Histogram(
            "canvaswatch_bottleneck_residual_error",
            "Bound on the error of the estimated residual mass, per step (max over positions); "
            "only the screened dense decoder reports it.",
            buckets=_MASS_BUCKETS, registry=r,
        )
        self.steps_dropped = Counter(
            "canvaswatch_steps_dropped", "Steps the client dropped before they reached the sidecar.", ["model"], registry=r
        )
        self._models: set[str] = set()
        self._monitor_children: dict[str, object] = {}
        self._lock = threading.Lock()

    def monitor_timer(self, monitor: str):
        """The monitor's histogram child, cached: `labels()` costs a lock and a dict build per call."""
        child = self._monitor_children.get(monitor)
        if child is None:
            child = self._monitor_children.setdefault(monitor, self.monitor_seconds.labels(monitor))
        return child

    def model_label(self, model: str) -> str:
        model = model or "unknown"
        if len(model) > MAX_MODEL_LABEL_CHARS:
            return OTHER
        with self._lock:
            if model in self._models:
                return model
            if len(self._models) < MAX_MODEL_LABELS:
                self._models.add(model)
                return model
        return OTHER

    def serve(self, host: str, port: int, registry: CollectorRegistry | None = None) -> tuple[object, object]:
        """Start the /metrics HTTP endpoint in a thread; returns (server, thread).

        `registry`: what to expose instead of this registry alone (with monitor workers, a merged view).
        """
        return start_http_server(port, addr=host, registry=registry or self.registry)
