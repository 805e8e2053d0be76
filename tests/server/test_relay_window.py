"""The in-process relay's window: quiet steps are answered without waking the event loop, and a pump
waiting for room is still woken by them (a lost wake-up would hang the stream)."""

from __future__ import annotations

import torch

from canvaswatch.server.workers.pool import RelayStream
from canvaswatch.server.workers.threads import StepThreads
from canvaswatch.v1 import monitor_pb2 as pb
from canvaswatch.v1 import monitor_pb2_grpc as pb_grpc
from tests.conftest import info_for, start_sidecar, topk_step

L, K, STEPS = 16, 4, 300
SMALL_WINDOW = 3  # far below the stream's length, so the pump waits for room over and over


def _quiet_stream(request_id: str):
    # A distinct, settled token at every position, the same each step: no default monitor has anything to say.
    ids = 3000 + torch.arange(L)[:, None] * K + torch.arange(K)
    probs = torch.tensor([[0.95, 0.02, 0.01, 0.01]] * L)
    for index in range(STEPS):
        yield topk_step(ids, probs, block=0, step=index, info=info_for(request_id, L) if index == 0 else None)
    yield pb.StepState(final=True, output_ids=ids[:, 0].tolist())


def test_quiet_steps_do_not_wake_the_loop_and_a_waiting_pump_is_still_woken(vocab, tmp_path, monkeypatch):
    delivered: list[int] = []
    deliver, full = StepThreads.deliver, RelayStream.full

    def counting_deliver(self, runner, replies):
        delivered.append(len(replies))
        deliver(self, runner, replies)

    def small_window_full(self, limit=SMALL_WINDOW):
        return full(self, min(limit, SMALL_WINDOW))

    monkeypatch.setattr(StepThreads, "deliver", counting_deliver)
    monkeypatch.setattr(RelayStream, "full", small_window_full)
    running = start_sidecar(vocab, tmp_path)
    try:
        with running.channel() as channel:
            events = list(pb_grpc.CanvasMonitorStub(channel).Watch(_quiet_stream("quiet"), timeout=60))
    finally:
        running.thread.stop()
    assert [e.WhichOneof("event") for e in events] == ["verdict"]
    verdict = events[-1].verdict
    assert verdict.steps_seen == STEPS and not verdict.flags
    # Only the replies that carry something reach the loop: the final message's verdict (and the end of input).
    assert sum(delivered) <= 2, delivered
