"""One /metrics view over several processes' registries.

With monitor worker processes (server.monitor_processes), each worker counts
what its sessions do in its own registry and ships a snapshot to the front
process; this collector adds the snapshots to the front's own registry
sample by sample, so a scrape sees one sidecar with the usual names and
labels. Counters, gauges and histogram buckets add; `_created` timestamps
take the earliest. A worker that exited keeps its last snapshot in the sum,
so counters never go back when it is replaced.

Prometheus's own multiprocess mode was the alternative: it needs an
environment variable set before prometheus_client is imported in every
process, and process-global values, which the per-Metrics registry here
(tests run several sidecars in one process) does not allow.
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

# (family name, documentation, type, unit, [(sample name, labels, value)])
Family = tuple[str, str, str, str, list[tuple[str, dict[str, str], float]]]


def snapshot(registry: CollectorRegistry) -> list[Family]:
    """The registry's current samples as plain, picklable tuples."""
    return [
        (family.name, family.documentation, family.type, family.unit,
         [(sample.name, dict(sample.labels), float(sample.value)) for sample in family.samples])
        for family in registry.collect()
    ]


class MergedCollector:
    """Collects `own` plus whatever snapshots `others()` returns at scrape time."""

    def __init__(self, own: CollectorRegistry, others: Callable[[], Iterable[list[Family]]]) -> None:
        self.own = own
        self.others = others

    def collect(self) -> Iterable[Metric]:
        families: dict[str, tuple[str, str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
        for source in (snapshot(self.own), *self.others()):
            for name, documentation, kind, unit, samples in source:
                entry = families.setdefault(name, (documentation, kind, unit, {}))
                values = entry[3]
                for sample_name, labels, value in samples:
                    key = (sample_name, tuple(sorted(labels.items())))
                    if key not in values:
                        values[key] = value
                    elif sample_name.endswith("_created"):
                        values[key] = min(values[key], value)
                    else:
                        values[key] += value
        for name, (documentation, kind, unit, values) in families.items():
            metric = Metric(name, documentation, kind, unit)
            for (sample_name, labels), value in values.items():
                metric.add_sample(sample_name, dict(labels), value)
            yield metric


def merged_registry(own: CollectorRegistry, others: Callable[[], Iterable[list[Family]]]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MergedCollector(own, others))
    return registry
