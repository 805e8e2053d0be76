"""A session's side effects go through the engine's sinks: built from the config, open to one more."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from canvaswatch.monitors.base import Evidence, Flag, Severity
from canvaswatch.server.config import default_config, parse_config
from canvaswatch.server.pipeline.engine import Engine
from canvaswatch.server.pipeline.sinks.audit import AuditSink
from canvaswatch.server.pipeline.sinks.log import LogSink
from canvaswatch.server.pipeline.sinks.metrics import MetricsSink
from canvaswatch.server.pipeline.sinks.report import ReportSink
from canvaswatch.v1 import monitor_pb2 as pb
from tests.conftest import info_for, topk_step


class _OddSteps:
    """Flags every odd step and the finish."""

    name = "odd_steps"

    def start(self, request):
        return None

    def on_step(self, state, step):
        if step.step % 2:
            return [Flag(self.name, Severity.WARNING, "odd step", 0.5, (Evidence(step.block, step.step, (0,)),))]
        return []

    def on_finish(self, state, final):
        return [Flag(self.name, Severity.INFO, "finished")]


class _Broken:
    """Fails on its first step: under fail_closed that is a CRITICAL flag too."""

    name = "broken"

    def start(self, request):
        return None

    def on_step(self, state, step):
        raise RuntimeError("boom")

    def on_finish(self, state, final):
        return []


class _Recorder:
    def __init__(self) -> None:
        self.flags: list[tuple[str, Flag]] = []
        self.verdicts: list[tuple[str, object]] = []
        self.closed = False

    def on_flag(self, request, flag):
        self.flags.append((request.meta.request_id, flag))

    def on_verdict(self, request, verdict):
        self.verdicts.append((request.meta.request_id, verdict))

    def close(self):
        self.closed = True


def _trace(request_id: str, steps: int = 4) -> pb.Trace:
    ids = torch.arange(16 * 4).reshape(16, 4) + 10
    probs = torch.tensor([0.6, 0.2, 0.1, 0.05]).repeat(16, 1)
    messages = [topk_step(ids, probs, step=number) for number in range(steps)]
    messages.append(pb.StepState(final=True, output_ids=list(range(10, 26))))
    return pb.Trace(info=info_for(request_id, 16), steps=messages)


def test_the_engine_builds_its_sinks_from_the_config(vocab, tmp_path: Path):
    assert [type(s) for s in Engine(default_config(), vocab, monitors=[]).sinks] == [MetricsSink, LogSink]
    config = parse_config({"logging": {"audit_log": str(tmp_path / "audit.jsonl"), "report_dir": str(tmp_path / "r")}})
    engine = Engine(config, vocab, monitors=[])
    assert [type(s) for s in engine.sinks] == [MetricsSink, AuditSink, ReportSink, LogSink]
    engine.close()


def test_a_sink_added_to_the_list_receives_every_flag_and_the_verdict(vocab, tmp_path: Path):
    config = parse_config({"server": {"monitor_policy": "fail_closed"},
                           "logging": {"audit_log": str(tmp_path / "audit.jsonl"), "report_dir": str(tmp_path / "r")}})
    engine = Engine(config, vocab, monitors=[_OddSteps(), _Broken()])
    recorder = _Recorder()
    engine.sinks.append(recorder)

    verdict = engine.check_trace(_trace("sunk-1"))
    engine.close()

    # two odd steps, the broken monitor's fail_closed flag, the finish: all of them, in order
    assert len(verdict.flags) == 4
    assert recorder.flags == [("sunk-1", flag) for flag in verdict.flags]
    assert recorder.verdicts == [("sunk-1", verdict)]
    assert recorder.closed
    # the built-in sinks next to it did their part
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [line["monitor"] for line in audit] == [flag.monitor for flag in verdict.flags]
    assert audit[0]["report"] == str(tmp_path / "r" / "sunk-1.html") and Path(audit[0]["report"]).exists()
    counted = engine.metrics.registry.get_sample_value(
        "canvaswatch_flags_total", {"monitor": "odd_steps", "severity": "WARNING", "model": "test-model"})
    assert counted == 2
