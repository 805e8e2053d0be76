"""WatchStream and AsyncWatchStream against a real sidecar, a lagging one, and a missing one."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from canvaswatch.client.stream import AsyncWatchStream, WatchError, WatchStream, channel_options
from tests.conftest import free_port, info_for, topk_step

L, K = 16, 4


def _step(step: int, token: int = 3000):
    ids = torch.full((L, K), token) + torch.arange(K)
    return topk_step(ids, torch.tensor([[0.5, 0.2, 0.1, 0.05]] * L), step=step)


def test_every_step_arrives_in_order_when_nothing_is_dropped(sidecar):
    with WatchStream(sidecar.target, info_for("all-steps", L), max_pending=100) as stream:
        for step in range(50):
            stream.send(_step(step))
        stream.finish([3000, 3001])
        verdict = stream.result(timeout=30)
    assert verdict.steps_seen == 50 and verdict.steps_dropped == 0 and stream.dropped == 0


def test_lazy_steps_are_built_on_the_sender_thread(sidecar):
    import threading

    built_on = []

    def lazy(step):
        def build():
            built_on.append(threading.current_thread().name)
            return _step(step)
        return build

    with WatchStream(sidecar.target, info_for("lazy", L)) as stream:
        for step in range(5):
            stream.send(lazy(step))
        stream.finish([])
        verdict = stream.result(timeout=30)
    assert verdict.steps_seen == 5
    assert threading.current_thread().name not in built_on


@pytest.mark.parametrize("bad", [0, 3, "final"])
def test_a_step_that_cannot_be_built_is_dropped_and_counted_not_the_end_of_the_request(sidecar, bad):
    # One bad step (a lazy step's error, sampler signals that do not validate) used to end the stream:
    # the sidecar answered "ended without a final message", every later step was lost, uncounted.
    def broken():
        raise ValueError("temperature: must be > 0 (the test's)")

    with WatchStream(sidecar.target, info_for(f"bad-{bad}", L), max_pending=100) as stream:
        for step in range(10):
            stream.send(broken if step == bad else _step(step))
        stream.finish([3000], step=broken if bad == "final" else None)
        verdict = stream.result(timeout=30)
    assert stream.dropped == 1 and "temperature" in stream.build_error
    assert verdict.steps_seen == (10 if bad == "final" else 9)
    assert verdict.steps_dropped == 1


def test_overflowing_client_drops_steps_counts_them_and_the_verdict_agrees(sidecar):
    sent = 400
    with WatchStream(sidecar.target, info_for("overflow", L), max_pending=2) as stream:
        for step in range(sent):
            stream.send(_step(step))
        stream.finish([3000])
        verdict = stream.result(timeout=60)
    assert stream.dropped == verdict.steps_dropped
    assert verdict.steps_seen + verdict.steps_dropped == sent


def test_send_never_raises_or_waits_when_the_sidecar_is_gone():
    stream = WatchStream(f"127.0.0.1:{free_port()}", info_for("nobody-home", L), max_pending=4)
    for step in range(1000):
        stream.send(_step(step))  # returns at once whatever happens to the stream
    stream.finish([1])
    with pytest.raises(WatchError) as caught:
        stream.result(timeout=30)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert stream.dropped >= 1000 - 4
    stream.close()


def test_request_id_is_generated_when_missing(sidecar):
    info = info_for("", L)
    with WatchStream(sidecar.target, info) as stream:
        stream.send(_step(0))
        stream.finish([])
        verdict = stream.result(timeout=30)
    assert len(verdict.request_id) == 32 and verdict.request_id == stream.request_id


def test_async_stream_end_to_end(sidecar):
    async def run():
        async with grpc.aio.insecure_channel(sidecar.target, options=channel_options()) as channel:
            stream = AsyncWatchStream(channel, info_for("async-1", L), max_pending=64)
            for step in range(20):
                stream.send(_step(step))
                await asyncio.sleep(0)
            stream.finish([3000])
            return await stream.result(timeout=30), stream.dropped

    verdict, dropped = asyncio.run(run())
    assert verdict.request_id == "async-1"
    assert verdict.steps_seen + verdict.steps_dropped == 20 and verdict.steps_dropped == dropped


def test_an_async_stream_the_sidecar_refused_leaves_no_task_waiting(sidecar):
    # The sender waited for the next step forever once the call had failed (nothing woke it): a request
    # that neither finishes nor cancels left a pending task per stream behind.
    async def run():
        async with grpc.aio.insecure_channel(sidecar.target, options=channel_options()) as channel:
            stream = AsyncWatchStream(channel, info_for("refused", L + 1), max_pending=64)  # L + 1: shapes disagree
            stream.send(_step(0))
            with pytest.raises(WatchError):
                await stream.result(timeout=30)
            for _ in range(50):
                await asyncio.sleep(0.02)
                if len(asyncio.all_tasks()) == 1:
                    break
            return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    assert asyncio.run(run()) == []


def test_many_concurrent_async_streams_each_get_their_verdict(sidecar, vocab):
    from canvaswatch.client import simulate

    traces = [simulate.scenario(simulate.SCENARIOS[i % 4], vocab.encode, vocab.size, request_id=f"many-{i}", seed=i)
              for i in range(48)]

    async def run():
        async with grpc.aio.insecure_channel(sidecar.target, options=channel_options()) as channel:
            streams = []
            for trace in traces:
                stream = AsyncWatchStream(channel, trace.info, max_pending=len(trace.steps) + 1)
                for message in trace.steps[:-1]:
                    step = type(message)()
                    step.CopyFrom(message)
                    step.ClearField("info")
                    stream.send(step)
                stream.finish(list(trace.steps[-1].output_ids))
                streams.append(stream)
            return await asyncio.wait_for(asyncio.gather(*(s.result(timeout=120) for s in streams)), 180)

    verdicts = asyncio.run(run())
    assert [v.request_id for v in verdicts] == [t.info.request_id for t in traces]
    assert all(v.steps_seen == len(t.steps) - 1 and v.steps_dropped == 0 for v, t in zip(verdicts, traces))
    flagged = {v.request_id for v in verdicts if any(f.monitor == "lexicon" for f in v.flags)}
    assert flagged == {t.info.request_id for t in traces if t.info.attributes["scenario"] in ("transient_phrase", "surviving_phrase")}
