"""Engine.warm_up: the kernels and phrase tables are ready before the first request, and nothing is counted."""

from __future__ import annotations

import dataclasses

from prometheus_client import generate_latest

from canvaswatch.server.config import default_config
from canvaswatch.server.bottleneck.dense import DenseDecoder
from canvaswatch.server.pipeline.engine import Engine


def _samples(engine: Engine) -> dict[str, float]:
    found = {}
    for line in generate_latest(engine.metrics.registry).decode().splitlines():
        if line and not line.startswith("#") and "_created" not in line:
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


def test_warm_up_builds_the_phrase_tables_and_leaves_no_trace(vocab, tmp_path):
    config = default_config()
    config = dataclasses.replace(config, logging=dataclasses.replace(config.logging, audit_log=str(tmp_path / "audit.jsonl")))
    engine = Engine(config, vocab, dense=DenseDecoder(None, vocab.size))
    before = _samples(engine)
    matcher = next(m for m in engine.monitors if m.name == "lexicon").phrases.matcher
    assert not matcher._scans
    engine.warm_up()
    assert id(vocab) in matcher._scans  # the compiled scan's table exists: no request builds it
    assert _samples(engine) == before  # no step, decode, flag or request counted
    assert not (tmp_path / "audit.jsonl").exists() or (tmp_path / "audit.jsonl").read_text() == ""
    engine.close()
