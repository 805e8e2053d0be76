"""Third-party monitors via entry points, and isolation of a monitor that fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from canvaswatch.client import simulate
from canvaswatch.client.replay import replay
from canvaswatch.monitors import registry
from canvaswatch.server.config import ConfigError, parse_config
from canvaswatch.v1 import monitor_pb2 as pb
from tests.conftest import install_plugin_source, start_sidecar

PLUGIN = '''
from dataclasses import dataclass
from canvaswatch.monitors.base import Flag, Severity

@dataclass(frozen=True)
class Params:
    fail_at_step: int = 2
    flag_every: int = 0

class Exploding:
    name = "exploding"
    description = "raises at a chosen step (test plugin)"
    Params = Params

    def __init__(self, params):
        self.params = params

    def start(self, request):
        return {"seen": 0}

    def on_step(self, state, step):
        state["seen"] += 1
        if step.step == self.params.fail_at_step:
            raise RuntimeError("boom at step %d" % step.step)
        return []

    def on_finish(self, state, final):
        return [Flag(monitor=self.name, severity=Severity.INFO, reason="finished", score=0.0)]
'''


@pytest.fixture
def plugin_on_path(tmp_path: Path, monkeypatch):
    yield from install_plugin_source(tmp_path, monkeypatch, "cw_test_plugin", PLUGIN, {"exploding": "Exploding"})


def test_entry_point_plugin_is_discovered_and_configured(plugin_on_path):
    assert "exploding" in registry.available()
    config = parse_config({"monitors": {"exploding": {"fail_at_step": 5}}})
    [monitor] = config.build_monitors()
    assert monitor.params.fail_at_step == 5
    with pytest.raises(ConfigError, match="monitors.exploding.fail_at_step: expected int"):
        parse_config({"monitors": {"exploding": {"fail_at_step": "five"}}})


def _run(vocab, tmp_path, policy: str) -> tuple[pb.Verdict, str]:
    running = start_sidecar(vocab, tmp_path, {
        "server": {"monitor_policy": policy},
        "monitors": {"exploding": {"fail_at_step": 2}, "lexicon": {}},
    })
    try:
        trace = simulate.scenario("surviving_phrase", vocab.encode, vocab.size, request_id=f"iso-{policy}", seed=2)
        with running.channel() as channel:
            verdict = replay(trace, channel)
        return verdict, running.metrics_text()
    finally:
        running.thread.stop()


def test_a_failing_monitor_is_isolated_counted_and_the_request_goes_on(plugin_on_path, vocab, tmp_path):
    verdict, metrics = _run(vocab, tmp_path, "fail_open")
    assert verdict.monitor_errors == ["exploding: on_step raised RuntimeError: boom at step 2"]
    assert any(f.monitor == "lexicon" and f.attributes["survived_to_output"] == "true" for f in verdict.flags)
    assert not any(f.monitor == "exploding" for f in verdict.flags)  # switched off after failing, so no finish flag
    assert verdict.max_severity == pb.CRITICAL  # from lexicon, not from the failure
    assert 'canvaswatch_monitor_errors_total{kind="exception",monitor="exploding"} 1.0' in metrics


def test_fail_closed_turns_a_monitor_failure_into_a_critical_flag(plugin_on_path, vocab, tmp_path):
    verdict, _ = _run(vocab, tmp_path, "fail_closed")
    [failure] = [f for f in verdict.flags if f.monitor == "exploding"]
    assert failure.severity == pb.CRITICAL and "fail_closed" in failure.reason
