"""server/ops/histograms.py: FastHistogram exposes what prometheus_client.Histogram does, sample for sample."""

from __future__ import annotations

import random
import threading

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from canvaswatch.server.ops.histograms import FastHistogram
from canvaswatch.server.ops.merged_metrics import snapshot

BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _without_created(text: str) -> list[str]:
    return [line for line in text.splitlines() if "_created" not in line]


@pytest.mark.parametrize("labelnames", [(), ("monitor",)])
def test_the_exposition_is_prometheus_clients_for_the_same_observations(labelnames):
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = FastHistogram("cw_test_seconds", "Time per step.", labelnames, buckets=BUCKETS, registry=ours)
    reference = Histogram("cw_test_seconds", "Time per step.", labelnames, buckets=BUCKETS, registry=theirs)
    rng = random.Random(3)
    # values on the bucket bounds (le: a value equal to a bound counts in it), between them, past the last
    values = list(BUCKETS) + [rng.uniform(0, 3) for _ in range(500)] + [0.0, 7.5]
    for value in values:
        for label in (("lexicon",), ("self_correction",))[: 2 if labelnames else 1]:
            if labelnames:
                fast.labels(*label).observe(value)
                reference.labels(*label).observe(value)
            else:
                fast.observe(value)
                reference.observe(value)
    ours_text, theirs_text = generate_latest(ours).decode(), generate_latest(theirs).decode()
    assert _without_created(ours_text) == _without_created(theirs_text)
    # _created is there too, per child, with its own HELP/TYPE block, as prometheus_client writes it
    assert [line.split(" ")[0] for line in ours_text.splitlines() if "_created" in line] == \
           [line.split(" ")[0] for line in theirs_text.splitlines() if "_created" in line]


def test_observations_from_many_threads_are_all_counted():
    registry = CollectorRegistry()
    fast = FastHistogram("cw_threads_seconds", "t", ("monitor",), buckets=BUCKETS, registry=registry)
    child = fast.labels("lexicon")

    def work():
        for _ in range(20_000):
            child.observe(0.0003)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert registry.get_sample_value("cw_threads_seconds_count", {"monitor": "lexicon"}) == 80_000
    assert registry.get_sample_value("cw_threads_seconds_bucket", {"monitor": "lexicon", "le": "0.0005"}) == 80_000
    assert registry.get_sample_value("cw_threads_seconds_bucket", {"monitor": "lexicon", "le": "0.00025"}) == 0


def test_worker_snapshots_read_it_like_any_collector():
    registry = CollectorRegistry()
    FastHistogram("cw_snap_mass", "m", buckets=(0.1, 0.5), registry=registry).observe(0.3)
    [(name, _, kind, _, samples)] = snapshot(registry)
    assert (name, kind) == ("cw_snap_mass", "histogram")
    assert ("cw_snap_mass_bucket", {"le": "0.5"}, 1.0) in samples and ("cw_snap_mass_sum", {}, 0.3) in samples


def test_bad_buckets_and_wrong_labels_are_refused():
    with pytest.raises(ValueError, match="ascending"):
        FastHistogram("cw_bad", "b", buckets=(0.5, 0.1))
    fast = FastHistogram("cw_labels", "b", ("monitor",), buckets=(0.1,))
    with pytest.raises(ValueError, match="expected labels"):
        fast.labels("a", "b")
    with pytest.raises(ValueError, match="has labels"):
        fast.observe(0.2)
