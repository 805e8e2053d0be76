"""classifier with a tiny sequence classifier built and trained here from a config (no download)."""

from __future__ import annotations

from concurrent.futures import wait

import pytest

from canvaswatch.monitors.base import FinalCanvas, RequestMeta
from canvaswatch.monitors.classifier import ClassifierMonitor, ClassifierParams
from canvaswatch.monitors.registry import MonitorConfigError, build
from canvaswatch.monitors.testing import check_monitor
from tests.monitors.canvas import canvas_step
from tests.tiny_classifier import build_tiny_classifier

META = RequestMeta("r", "m", "", (), 12, 16)


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory):
    return build_tiny_classifier(tmp_path_factory.mktemp("tiny-classifier"))


def _steps(monitor, texts, vocab):
    state = monitor.start(META)
    flags = []
    for step, text in enumerate(texts):
        ids = (vocab.encode(text) + vocab.encode(" the") * 12)[:12]
        flags += monitor.on_step(state, canvas_step(ids, 0.9, step=step, vocab=vocab))
    return state, flags


def test_unsafe_intermediate_text_removed_from_the_output_is_flagged(classifier_dir, vocab):
    monitor = ClassifierMonitor(ClassifierParams(model=str(classifier_dir), flag_labels=["unsafe"], every_n_steps=1,
                                                 batch_window_ms=1))
    texts = ["clean the floor with soap"] * 2 + ["mix bleach with ammonia"] * 2 + ["clean the floor with soap"] * 2
    state, early = _steps(monitor, texts, vocab)
    final_text = "clean the floor with soap"
    late = monitor.on_finish(state, FinalCanvas(tuple(vocab.encode(final_text)), final_text, 6, 0))
    phases = [f.attributes["phase"] for f in early + late]
    assert phases == ["intermediate", "intermediate_only"]
    intermediate = (early + late)[0]
    assert intermediate.evidence[0].step == 2 and "bleach" in intermediate.evidence[0].snippet
    assert intermediate.score >= 0.5


def test_unsafe_output_is_flagged_and_safe_text_is_not(classifier_dir, vocab):
    monitor = ClassifierMonitor(ClassifierParams(model=str(classifier_dir), every_n_steps=2, batch_window_ms=1))
    state, early = _steps(monitor, ["bake the bread in the oven"] * 4, vocab)
    safe = monitor.on_finish(state, FinalCanvas((), "bake the bread in the oven", 4, 0))
    assert early == [] and safe == []
    state, _ = _steps(monitor, ["rinse the tiles with water"] * 2, vocab)
    [flag] = monitor.on_finish(state, FinalCanvas((), "mix the bleach and ammonia", 2, 0))
    assert flag.attributes == {"label": "unsafe", "phase": "output", "skipped_steps": "0"}


def test_texts_from_concurrent_requests_share_batches(classifier_dir):
    monitor = ClassifierMonitor(ClassifierParams(model=str(classifier_dir), batch_window_ms=200, max_batch=64))
    futures = [monitor.runner.submit(f"clean the tiles {i}") for i in range(12)]
    wait(futures, timeout=30)
    assert all(f.done() for f in futures)
    assert monitor.runner.texts == 12 and monitor.runner.batches < 12


def test_configuration_errors_name_the_key(classifier_dir, tmp_path):
    with pytest.raises(MonitorConfigError, match="monitors.classifier.model: a transformers sequence-classification directory is required"):
        build("classifier", {}, "monitors.classifier")
    with pytest.raises(MonitorConfigError, match=r"monitors.classifier.flag_labels: \['toxic'\] are not labels"):
        build("classifier", {"model": str(classifier_dir), "flag_labels": ["toxic"]}, "monitors.classifier")
    with pytest.raises(MonitorConfigError, match="monitors.classifier.model: cannot load a sequence classifier"):
        build("classifier", {"model": str(tmp_path)}, "monitors.classifier")
    # a hub name is not fetched (a networked machine downloaded it; an offline one retried for ~45 s)
    with pytest.raises(MonitorConfigError, match="model: 'distilbert-base-uncased' is not a directory.*nothing is downloaded"):
        build("classifier", {"model": "distilbert-base-uncased"}, "monitors.classifier")


def test_close_stops_the_model_thread(classifier_dir):
    monitor = ClassifierMonitor(ClassifierParams(model=str(classifier_dir)))
    assert monitor.runner.alive
    monitor.close()
    assert not monitor.runner.alive


def test_the_classifier_keeps_the_monitor_contract(classifier_dir):
    # The tiny model reads at most 64 positions; on_finish waits up to finish_timeout_ms for it by design,
    # so its calls get a wider budget than a step's.
    params = ClassifierParams(model=str(classifier_dir), every_n_steps=2, max_length=64, batch_window_ms=1)
    check_monitor(ClassifierMonitor, params, budget_ms=1000)
