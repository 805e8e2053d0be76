"""The sampler's signals on the wire: SamplerSignals -> StepState -> bytes over gRPC -> the same values back."""

from __future__ import annotations

import math
from concurrent import futures

import grpc
import numpy as np
import pytest
import torch

from canvaswatch.client.diffusion_gemma import sampling_temperature
from canvaswatch.client.sampler_signals import SamplerSignals, entropy
from canvaswatch.client.stream import WatchStream
from canvaswatch.client.tensors import decode_array
from canvaswatch.v1 import monitor_pb2 as pb
from canvaswatch.v1 import monitor_pb2_grpc as pb_grpc
from tests.conftest import info_for, topk_step

L, K = 16, 4


def _signals(batch: int | None = None) -> SamplerSignals:
    shape = (L,) if batch is None else (batch, L)
    generator = torch.Generator().manual_seed(7)
    return SamplerSignals(
        accepted=torch.rand(shape, generator=generator) < 0.3,
        entropy=torch.rand(shape, generator=generator, dtype=torch.float64) * 12.0,
        argmax_ids=torch.randint(0, 262_144, shape, generator=generator),
        canvas_ids=torch.randint(0, 262_144, shape, generator=generator),
        temperature=0.7333333333,
    )


def _topk_step(step: int) -> pb.StepState:
    ids = torch.full((L, K), 3000) + torch.arange(K)
    return topk_step(ids, torch.tensor([[0.5, 0.2, 0.1, 0.05]] * L), step=step)


class _Capture(pb_grpc.CanvasMonitorServicer):
    """A bare Watch endpoint that keeps the raw messages, so the test reads exactly what crossed the wire."""

    def __init__(self) -> None:
        self.messages: list[pb.StepState] = []

    def Watch(self, request_iterator, context):
        request_id = ""
        for message in request_iterator:
            request_id = request_id or message.info.request_id
            self.messages.append(message)
        yield pb.MonitorEvent(request_id=request_id, verdict=pb.Verdict(request_id=request_id))


def _assert_decodes_to(message: pb.StepState, signals: SamplerSignals) -> None:
    accepted = decode_array(message.accepted, "accepted", ndim=1)
    assert message.accepted.dtype == pb.UINT8 and accepted.tolist() == signals.accepted.to(torch.uint8).tolist()
    value = decode_array(message.entropy, "entropy", ndim=1)
    assert message.entropy.dtype == pb.FLOAT16
    np.testing.assert_allclose(value, signals.entropy.numpy(), rtol=1e-3, atol=1e-3)
    argmax = decode_array(message.argmax_ids, "argmax_ids", ndim=1)
    assert message.argmax_ids.dtype == pb.INT32 and argmax.tolist() == signals.argmax_ids.tolist()
    assert list(message.canvas_ids) == signals.canvas_ids.tolist()
    assert message.HasField("temperature") and message.temperature == pytest.approx(signals.temperature, rel=1e-7)


def test_signals_survive_serialisation_in_their_wire_dtypes():
    batch = _signals(batch=3)
    message = batch.row(1).fill(_topk_step(0))
    parsed = pb.StepState.FromString(message.SerializeToString())
    _assert_decodes_to(parsed, batch.row(1))
    assert len(parsed.accepted.data) + len(parsed.entropy.data) + len(parsed.argmax_ids.data) == 7 * L


def test_absent_signals_stay_absent():
    message = SamplerSignals(entropy=torch.ones(L)).fill(_topk_step(0))
    parsed = pb.StepState.FromString(message.SerializeToString())
    assert parsed.HasField("entropy")
    assert not parsed.HasField("accepted") and not parsed.HasField("argmax_ids")
    assert not parsed.HasField("temperature") and not parsed.canvas_ids


@pytest.mark.parametrize("bad, field", [
    (SamplerSignals(accepted=torch.ones(2, L, dtype=torch.bool)), "accepted"),
    (SamplerSignals(temperature=0.0), "temperature"),
    (SamplerSignals(temperature=float("nan")), "temperature"),
])
def test_fill_refuses_what_is_not_one_canvas_or_a_temperature(bad, field):
    with pytest.raises(ValueError, match=field):
        bad.fill(pb.StepState())


def test_send_with_signals_round_trips_over_grpc():
    capture = _Capture()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_CanvasMonitorServicer_to_server(capture, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        sent = [_signals(batch=4).row(step) for step in range(4)]
        with WatchStream(f"127.0.0.1:{port}", info_for("signals", L), max_pending=100) as stream:
            for step, signals in enumerate(sent):
                stream.send(_topk_step(step), signals=signals)
            stream.send(_topk_step(4))  # a step without signals
            stream.finish([3000])
            stream.result(timeout=30)
    finally:
        server.stop(None)
    steps = [m for m in capture.messages if not m.final]
    assert [m.step for m in steps] == [0, 1, 2, 3, 4]
    for message, signals in zip(steps, sent):
        _assert_decodes_to(message, signals)
    assert not steps[4].HasField("accepted") and not steps[4].HasField("temperature")


def test_entropy_is_the_categorical_entropy_chunk_by_chunk(monkeypatch):
    from canvaswatch.client import sampler_signals

    logits = torch.randn(2, 5, 300, generator=torch.Generator().manual_seed(0)) * 4
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy(logits), expected, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(sampler_signals, "_ENTROPY_CHUNK_ELEMENTS", 3 * 300)  # 3 positions a chunk, 10 positions
    torch.testing.assert_close(entropy(logits), expected, rtol=1e-5, atol=1e-5)
    # An enforced bottleneck puts -inf on the dropped tokens: they contribute nothing, never NaN.
    masked = torch.full((1, 1, 300), float("-inf"))
    masked[0, 0, :4] = 0.0
    assert entropy(masked).item() == pytest.approx(math.log(4), rel=1e-6)
    assert entropy(logits.half()).dtype == torch.float32


class _Schedule:
    """Stands in for transformers' LinearTemperatureScheduleLogitsProcessor (same attributes)."""

    def __init__(self, t_min: float, t_max: float, max_denoising_steps: int) -> None:
        self.t_min, self.t_max, self.max_denoising_steps = t_min, t_max, max_denoising_steps


class _Warper:
    temperature = 0.5


def test_sampling_temperature_follows_the_linear_schedule_over_steps_remaining():
    schedule = [_Schedule(0.4, 0.8, 48)]
    assert sampling_temperature(schedule, 48) == pytest.approx(0.8)  # the first step: n = N
    assert sampling_temperature(schedule, 1) == pytest.approx(0.4 + 0.4 / 48)  # the last step
    assert sampling_temperature(schedule + [_Warper()], 24) == pytest.approx(0.6 * 0.5)
    assert sampling_temperature([], 10) == 1.0
    assert sampling_temperature(schedule, None) is None
    assert sampling_temperature([_Schedule(0.0, 0.0, 4)], 2) is None  # not a usable temperature
