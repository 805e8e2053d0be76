"""A monitor's life in the server: checked by the config without being built, built once per engine,
closed once, told where blocks begin; and a class with only the Protocol's members runs like any other."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from canvaswatch.server.cli import main
from canvaswatch.server.config import ConfigError, default_config, parse_config
from canvaswatch.server.pipeline.engine import Engine
from canvaswatch.v1 import monitor_pb2 as pb
from tests.conftest import info_for, install_plugin_source, topk_step

PLUGINS = '''
from dataclasses import dataclass

from canvaswatch.monitors.base import Evidence, Flag, Monitor, Severity

BUILT, CLOSED, STEPS = [], [], []


@dataclass(frozen=True)
class CountingParams:
    label: str = "counting"


class Counting(Monitor):
    """Counts how often it is built and closed, and records where blocks begin."""

    name = "counting"
    Params = CountingParams

    def __init__(self, params=None):
        super().__init__(params)
        BUILT.append(self)

    def on_step(self, state, step):
        STEPS.append((step.block, step.step, step.new_block))
        return []

    def close(self):
        CLOSED.append(self)


@dataclass(frozen=True)
class PlainParams:
    severity: str = "warning"


class Plain:
    name = "plain"
    description = "a monitor written against the Protocol alone"
    Params = PlainParams

    def __init__(self, params):
        self.params = params

    def start(self, request):
        return {"steps": 0}

    def on_step(self, state, step):
        state["steps"] += 1
        return []

    def on_finish(self, state, final):
        return [Flag(monitor=self.name, severity=Severity.parse(self.params.severity),
                     reason="%d steps" % state["steps"], score=0.5, evidence=(Evidence(0, 0, (0,)),))]
'''


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch):
    yield from install_plugin_source(tmp_path, monkeypatch, "cw_lifecycle_plugins", PLUGINS,
                                     {"counting": "Counting", "plain": "Plain"})


def _config(monitors: dict):
    return parse_config({"dense": {"embeddings": ""}, "monitors": monitors})


def _trace(blocks: int = 2, steps: int = 2) -> pb.Trace:
    ids = torch.arange(8 * 2).reshape(8, 2) + 100
    probs = torch.tensor([[0.9, 0.05]] * 8)
    messages = [topk_step(ids, probs, block=block, step=step) for block in range(blocks) for step in range(steps)]
    messages[-1].final = True
    messages[-1].output_ids.extend(range(100, 108))
    return pb.Trace(info=info_for("lifecycle", 8), steps=messages)


def test_validation_builds_no_monitor_and_an_engine_builds_and_closes_each_once(plugins, vocab):
    config = _config({"counting": {"label": "x"}, "lexicon": {}})
    default_config()
    with pytest.raises(ConfigError, match="monitors.counting.lable: unknown parameter"):
        _config({"counting": {"lable": "x"}})
    assert plugins.BUILT == []

    engine = Engine(config, vocab)
    engine.warm_up()
    engine.check_trace(_trace())
    assert len(plugins.BUILT) == 1 and plugins.BUILT[0].params.label == "x"
    engine.close()
    engine.close()
    assert plugins.CLOSED == plugins.BUILT


def test_what_only_a_constructor_finds_fails_the_engine_naming_the_key_and_closes_what_was_built(
        plugins, vocab, tmp_path, capsys):
    probes = tmp_path / "partial.safetensors"
    save_file({"x.direction": torch.ones(4)}, str(probes))
    table = {"counting": {}, "probe": {"path": str(probes)}}
    config = _config(table)  # the file exists: its contents are the constructor's to read
    assert plugins.BUILT == []
    with pytest.raises(ConfigError, match=r"monitors.probe.path: .* missing \['x.bias', 'x.threshold'\]"):
        Engine(config, vocab)
    assert len(plugins.BUILT) == 1 and plugins.CLOSED == plugins.BUILT

    toml = tmp_path / "probe.toml"
    toml.write_text(f'[dense]\nembeddings = ""\n[monitors.counting]\n[monitors.probe]\npath = "{probes}"\n')
    assert main(["check", str(tmp_path / "none.cwtrace"), "--config", str(toml)]) == 2
    assert "configuration error: monitors.probe.path" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="monitors.probe.path: no such file"):
        _config({"probe": {"path": str(tmp_path / "absent.safetensors")}})


def test_the_engine_marks_the_first_step_of_each_block(plugins, vocab):
    engine = Engine(_config({"counting": {}}), vocab)
    engine.warm_up()  # two synthetic requests of two steps: top-k only, then with the sampler's signals
    assert plugins.STEPS == [(0, 0, True), (0, 1, False)] * 2
    plugins.STEPS.clear()
    engine.check_trace(_trace(blocks=3))
    assert plugins.STEPS == [(0, 0, True), (0, 1, False), (1, 0, True), (1, 1, False), (2, 0, True), (2, 1, False)]
    engine.close()


def test_a_monitor_with_only_the_protocols_members_is_configured_run_and_listed(plugins, vocab):
    engine = Engine(_config({"plain": {"severity": "critical"}}), vocab)
    verdict = engine.check_trace(_trace(blocks=2))
    [flag] = verdict.flags
    assert (flag.monitor, flag.reason, flag.severity.name) == ("plain", "4 steps", "CRITICAL")
    [listed] = engine.list_monitors().monitors
    assert listed.description == "a monitor written against the Protocol alone"
    assert dict(listed.params) == {"severity": "critical"}
    engine.close()  # no close() of its own: nothing to call
