"""Gate mode: a severe flag stops generation at the next step; the output waits for its verdict."""

from __future__ import annotations

import pytest
import torch

from canvaswatch.client.diffusion_gemma import CanvasWatchStreamer
from canvaswatch.client.gate import Gate, GatePolicy, GenerationBlocked
from canvaswatch.v1 import monitor_pb2 as pb
from tests.conftest import install_entry_point, start_sidecar, tiny_diffusion_gemma


def _flag(severity) -> pb.MonitorEvent:
    return pb.MonitorEvent(request_id="r", flag=pb.Flag(monitor="m", severity=severity, reason="x"))


class _Stream:
    def __init__(self, request_id: str, verdict: pb.Verdict | None) -> None:
        self.request_id, self.verdict = request_id, verdict

    def result(self, timeout=None):
        if self.verdict is None:
            raise TimeoutError("no verdict")
        return self.verdict


def test_a_flag_at_the_abort_severity_trips_the_gate_and_one_below_does_not():
    gate = Gate(GatePolicy(abort_at="critical"))
    gate.on_event(_flag(pb.WARNING))
    gate.check()  # nothing to stop
    assert not gate.tripped
    gate.on_event(_flag(pb.CRITICAL))
    with pytest.raises(GenerationBlocked) as blocked:
        gate.check()
    assert blocked.value.reason == "flag" and blocked.value.request_ids == ["r"]
    assert gate.decisions["blocked_flag"] == 1


def test_release_blocks_a_severe_verdict_and_fails_open_or_closed_on_timeout():
    clean = pb.Verdict(request_id="a")
    severe = pb.Verdict(request_id="b", flags=[pb.Flag(monitor="m", severity=pb.CRITICAL)])
    gate = Gate(GatePolicy(budget_s=0.1))
    assert gate.release([_Stream("a", clean)]) == [clean]
    with pytest.raises(GenerationBlocked) as blocked:
        gate.release([_Stream("a", clean), _Stream("b", severe)])
    assert blocked.value.reason == "verdict"
    assert gate.release([_Stream("c", None)]) == []  # fail-open: released, counted
    closed = Gate(GatePolicy(budget_s=0.1, on_timeout="closed"))
    with pytest.raises(GenerationBlocked, match="timeout"):
        closed.release([_Stream("c", None)])
    assert (gate.decisions["released"], gate.decisions["blocked_verdict"], gate.decisions["released_on_timeout"],
            closed.decisions["blocked_on_timeout"]) == (1, 1, 1, 1)


@pytest.mark.parametrize("bad, key", [({"abort_at": "severe"}, "gate.abort_at"), ({"budget_s": 0}, "gate.budget_s"),
                                      # an infinite wait overflowed and the output went out unjudged at once
                                      ({"budget_s": float("inf")}, "gate.budget_s"),
                                      ({"budget_s": float("nan")}, "gate.budget_s"),
                                      ({"on_timeout": "maybe"}, "gate.on_timeout")])
def test_a_bad_policy_names_its_key(bad, key):
    with pytest.raises(ValueError, match=key):
        GatePolicy(**bad)


def test_release_refuses_asyncio_streams_with_a_clear_error():
    class _AsyncStream(_Stream):
        async def result(self, timeout=None):
            return self.verdict

    with pytest.raises(TypeError, match="coroutine.*Gate.decide"):
        Gate(GatePolicy()).release([_AsyncStream("a", pb.Verdict(request_id="a"))])


def test_an_async_stream_whose_loop_has_closed_drops_and_counts_instead_of_raising():
    import asyncio

    import grpc

    from canvaswatch.client.stream import AsyncWatchStream
    from tests.conftest import free_port, info_for

    async def open_one():
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}")
        return AsyncWatchStream(channel, info_for("orphan", 4))  # left open: asyncio.run ends its tasks

    stream = asyncio.run(open_one())  # the loop is closed once this returns
    assert stream.send(pb.StepState(step=0)) is False and stream.dropped >= 1


class _Watched(CanvasWatchStreamer):
    """Counts the denoising steps that reached the streamer after the gate had already tripped."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0
        self.calls_after_trip = 0

    def put_draft(self, value=None, logits=None, **kwargs) -> None:
        if logits is not None:
            self.calls += 1
            self.calls_after_trip += self.gate.tripped
        super().put_draft(value=value, logits=logits, **kwargs)


@pytest.mark.slow
def test_a_planted_critical_flag_stops_generate_before_the_canvas_is_committed(vocab, tmp_path, monkeypatch):
    install_entry_point(tmp_path, monkeypatch, "trigger", "tests.trigger_monitor:Trigger")
    running = start_sidecar(vocab, tmp_path, {"monitors": {"trigger": {"at_step": 1}}})
    model = tiny_diffusion_gemma()
    canvas = model.config.canvas_length
    prompt = torch.tensor([[2, 9259, 1902]])
    steps = 12
    try:
        bad = _Watched(running.target, request_id="gate-bad-1", gate=GatePolicy(budget_s=30))
        with pytest.raises(GenerationBlocked) as blocked:
            model.generate(prompt, max_new_tokens=canvas, max_denoising_steps=steps, streamer=bad)
        bad.close()
        assert blocked.value.reason == "flag" and [f.monitor for f in blocked.value.flags] == ["trigger"]
        # The flag came from step 1; generation stopped at the first step that saw it, long before the
        # block's last step, and no canvas was committed (put() got none).
        assert bad.calls_after_trip == 1 and bad.calls < steps and bad.outputs == []

        clean = _Watched(running.target, request_id="gate-ok-1", gate=GatePolicy(budget_s=30))
        output = model.generate(prompt, max_new_tokens=canvas, max_denoising_steps=steps, streamer=clean)
        clean.close()
        [verdict] = clean.gate_verdicts
        assert verdict.request_id == "gate-ok-1" and verdict.max_severity == pb.SEVERITY_UNSPECIFIED
        assert clean.gate.decisions["released"] == 1 and output.sequences.shape[1] > prompt.shape[1]
    finally:
        running.thread.stop()
