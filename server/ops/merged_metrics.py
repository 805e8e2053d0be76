"""One /metrics view over several processes' registries.

With monitor worker processes (server.monitor_processes), each worker counts
what its sessions do in its own registry and ships a snapshot to the front
process; this collector adds the snapshots to the front's own registry
sample by sample, so a scrape sees one sidecar with the usual names and
labels. Counters, gauges and histogram buckets add; `_created` timestamps
take the earliest. A worker that exited keeps its last snapshot in the sum
(all exited workers' snapshots added into one: `add`), so counters never go
back when it is replaced. The `model` label stays bounded across processes as
within one (MAX_MODEL_LABELS values; each process keeps its own set, so the
collector admits the first MAX_MODEL_LABELS it sees, for good, and reports any
other as "other").

Prometheus's own multiprocess mode was the alternative: it needs an
environment variable set before prometheus_client is imported in every
process, and process-global values, which the per-Metrics registry here
(tests run several sidecars in one process) does not allow.
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from canvaswatch.server.ops.metrics import MAX_MODEL_LABELS, OTHER

# (family name, documentation, type, unit, [(sample name, labels, value)])
Family = tuple[str, str, str, str, list[tuple[str, dict[str, str], float]]]


def snapshot(registry: CollectorRegistry) -> list[Family]:
    """The registry's current samples as plain, picklable tuples."""
    return [
        (family.name, family.documentation, family.type, family.unit,
         [(sample.name, dict(sample.labels), float(sample.value)) for sample in family.samples])
        for family in registry.collect()
    ]


Summed = dict[str, tuple[str, str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]]


def _sum(sources: Iterable[list[Family]], relabel: Callable[[dict[str, str]], dict[str, str]] = lambda x: x) -> Summed:
    families: Summed = {}
    for source in sources:
        for name, documentation, kind, unit, samples in source:
            entry = families.setdefault(name, (documentation, kind, unit, {}))
            values = entry[3]
            for sample_name, labels, value in samples:
                key = (sample_name, tuple(sorted(relabel(labels).items())))
                if key not in values:
                    values[key] = value
                elif sample_name.endswith("_created"):
                    values[key] = min(values[key], value)
                else:
                    values[key] += value
    return families


def add(*sources: list[Family]) -> list[Family]:
    """Several snapshots as one (what a scrape would show of them together)."""
    return [(name, documentation, kind, unit, [(sample, dict(labels), value) for (sample, labels), value in values.items()])
            for name, (documentation, kind, unit, values) in _sum(sources).items()]


class MergedCollector:
    """Collects `own` plus whatever snapshots `others()` returns at scrape time."""

    def __init__(self, own: CollectorRegistry, others: Callable[[], Iterable[list[Family]]]) -> None:
        self.own = own
        self.others = others
        self.models: set[str] = set()  # the model label values admitted, for good (scrapes run one at a time)

    def _bounded(self, labels: dict[str, str]) -> dict[str, str]:
        model = labels.get("model")
        if model is None or model in self.models:
            return labels
        if len(self.models) < MAX_MODEL_LABELS and model != OTHER:
            self.models.add(model)
            return labels
        return labels if model == OTHER else {**labels, "model": OTHER}

    def collect(self) -> Iterable[Metric]:
        for name, (documentation, kind, unit, values) in _sum((snapshot(self.own), *self.others()), self._bounded).items():
            metric = Metric(name, documentation, kind, unit)
            for (sample_name, labels), value in values.items():
                metric.add_sample(sample_name, dict(labels), value)
            yield metric


def merged_registry(own: CollectorRegistry, others: Callable[[], Iterable[list[Family]]]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MergedCollector(own, others))
    return registry
