"""The vLLM plugin's collector, without vLLM: its bounded step queue drops by policy, counts what it dropped
per request, never drops a request's end, and the verdict reports it (a real sidecar on loopback)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from canvaswatch.client.vllm import TileRecord, Watcher
from canvaswatch.client.vllm_config import PluginConfig

L, K = 8, 4


def _tile(step: int, slot: int = 0) -> TileRecord:
    ids = (torch.arange(L * K, dtype=torch.int32).view(1, L, K) + 3000)
    probs = torch.tensor([0.6, 0.2, 0.1, 0.05]).expand(1, L, K).contiguous()
    return TileRecord(
        event=None, slots=torch.tensor([slot]), denoising=torch.tensor([True]), block=torch.tensor([0], dtype=torch.int32),
        step=torch.tensor([step], dtype=torch.int32), emitted=torch.tensor([0], dtype=torch.int32),
        temperature=torch.tensor([0.8]), ids=ids, probs=probs, accepted=torch.zeros(1, L, dtype=torch.uint8),
        entropy=torch.full((1, L), 1.5, dtype=torch.float16), argmax=ids[:, :, 0].clone(), canvas=ids[:, :, 0].clone())


@pytest.mark.parametrize("policy, kept", [("oldest", [0, 4, 5]), ("newest", [0, 1, 2])])
def test_step_queue_drops_by_policy_counts_per_request_and_never_drops_the_end(sidecar, policy, kept):
    sampler = SimpleNamespace(
        diffusion_states=SimpleNamespace(max_num_reqs=4, device=torch.device("cpu"), max_denoising_steps=8,
                                         step_allowed=None),
        entropy_bound=0.5, t_min=0.4, t_max=0.8)
    config = PluginConfig(target=sidecar.target, k=K, step_queue=2, drop_policy=policy, max_pending=100)
    watcher = Watcher(config, SimpleNamespace(model_config=SimpleNamespace(served_model_name="m")), sampler)
    sent: list[int] = []
    entered, release = threading.Event(), threading.Event()
    on_step = watcher._on_step

    def slow_first(tiles):
        if not entered.is_set():
            entered.set()
            release.wait(10)  # the collector is busy: the engine keeps queueing
        sent.append(int(tiles[0].step[0]))
        on_step(tiles)

    watcher._on_step = slow_first
    try:
        watcher.on_add(0, SimpleNamespace(req_id="req-1", prompt_token_ids=[2, 5]))
        batch = SimpleNamespace(num_reqs=1, req_ids=["req-1"])
        watcher.submit([_tile(0)], batch)
        assert entered.wait(10)
        for step in range(1, 6):
            watcher.submit([_tile(step)], batch)  # never blocks: the queue holds 2, the rest is dropped
        watcher.on_remove("req-1")  # the end is never dropped
        release.set()
        assert watcher.flush(timeout=30)
        [verdict] = list(watcher.verdicts)
    finally:
        watcher.close()
    assert sent == kept
    assert verdict.request_id == "req-1" and verdict.steps_seen == 3 and verdict.steps_dropped == 3
    assert watcher.counters["steps_dropped_before_streams"] == 3 and watcher.counters["steps_sent"] == 3


def test_steps_of_slots_never_added_are_ignored(sidecar):
    """vLLM's warm-up runs the sampler with dummy requests the plugin never saw added: nothing is streamed."""
    sampler = SimpleNamespace(
        diffusion_states=SimpleNamespace(max_num_reqs=4, device=torch.device("cpu"), max_denoising_steps=8,
                                         step_allowed=None),
        entropy_bound=0.5, t_min=0.4, t_max=0.8)
    watcher = Watcher(PluginConfig(target=sidecar.target, k=K), SimpleNamespace(), sampler)
    try:
        watcher.submit([_tile(0, slot=3)], SimpleNamespace(num_reqs=1, req_ids=["req_0_dummy"]))
        watcher.on_add(1, SimpleNamespace(req_id="_warmup_0", prompt_token_ids=[]))
        assert watcher.flush(timeout=10)
    finally:
        watcher.close()
    assert watcher.counters["steps_sent"] == 0 and not watcher.verdicts
