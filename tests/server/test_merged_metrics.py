"""One /metrics over several processes (server/ops/merged_metrics.py): sums, and the bounds that hold
within one process holding across them."""

from __future__ import annotations

from canvaswatch.server.ops.merged_metrics import add, merged_registry, snapshot
from canvaswatch.server.ops.metrics import MAX_MODEL_LABELS, OTHER, Metrics


def _requests(registry, model: str) -> float:
    return registry.get_sample_value("canvaswatch_requests_total", {"model": model, "outcome": "ok"}) or 0.0


def _worker(models: list[str]) -> Metrics:
    metrics = Metrics()
    for model in models:
        metrics.requests.labels(metrics.model_label(model), "ok").inc()
    return metrics


def test_the_model_label_stays_bounded_across_worker_processes():
    # Each process admits its own MAX_MODEL_LABELS models: two workers with different ones would
    # expose twice as many series, and every replaced worker more.
    first = _worker([f"a{n}" for n in range(MAX_MODEL_LABELS)])
    second = _worker([f"b{n}" for n in range(MAX_MODEL_LABELS)] + ["a0"])
    merged = merged_registry(Metrics().registry, lambda: [snapshot(first.registry), snapshot(second.registry)])
    for _ in range(2):  # the same answer on every scrape: admitted names stay admitted
        models = {s.labels["model"] for family in merged.collect() for s in family.samples if "model" in s.labels}
        assert len(models) == MAX_MODEL_LABELS + 1 and OTHER in models
        assert _requests(merged, "a0") == 1.0  # (the second worker had no room left for it: its "other")
        assert _requests(merged, OTHER) == MAX_MODEL_LABELS + 1  # the second worker's models, folded
        assert _requests(merged, "b0") == 0.0


def test_snapshots_of_exited_workers_add_into_one():
    one, two = _worker(["m", "m"]), _worker(["m", "n"])
    total = add(snapshot(one.registry), snapshot(two.registry))
    merged = merged_registry(Metrics().registry, lambda: [total])
    assert _requests(merged, "m") == 3.0 and _requests(merged, "n") == 1.0
    assert add(total) == total  # adding nothing more changes nothing
