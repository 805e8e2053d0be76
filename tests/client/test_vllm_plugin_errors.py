"""The vLLM plugin under its own errors, without vLLM: an error costs the step it happened in, not the
request or the engine; errors in a row switch the plugin off, ending the streams it had open (and, under
gate_fail = "closed", the requests it can no longer judge); its memory of request ids stays bounded."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

import torch

from canvaswatch.client import vllm
from canvaswatch.client.vllm import WatchingSampler
from canvaswatch.client.vllm_config import load_config
from tests.client.test_vllm_gate_parts import _watcher
from tests.client.test_vllm_watcher import _tile

BATCH = SimpleNamespace(num_reqs=1, req_ids=["req-1"], num_draft_tokens=8)


def _errors(watcher, count: int) -> None:
    for _ in range(count):
        try:
            raise RuntimeError("a plugin bug")
        except RuntimeError:
            watcher.fail("in a test")


def _open_stream(watcher) -> None:
    watcher.on_add(0, SimpleNamespace(req_id="req-1", prompt_token_ids=[2, 5]))
    watcher.submit([_tile(0)], BATCH)  # its first step opens its stream


def test_an_error_in_the_plugin_returns_vllms_own_output_and_is_counted(sidecar):
    watcher = _watcher(sidecar.target)
    output = object()

    def sampler(logits, batch):  # vLLM's sampler: its compiled step records a tile through the patched hook
        vllm._local.tiles.append(_tile(0))
        return output

    def broken_submit(tiles, input_batch):
        raise RuntimeError("queueing failed")

    watcher.submit = broken_submit
    try:
        assert WatchingSampler(sampler, watcher)(torch.zeros(1), BATCH) is output
        assert watcher.counters["errors"] == 1 and watcher.enabled  # one error: counted, the plugin goes on
    finally:
        watcher.close()


def test_errors_in_a_row_switch_the_plugin_off_and_end_its_open_streams(sidecar, monkeypatch):
    monkeypatch.setattr(vllm, "MAX_CONSECUTIVE_ERRORS", 3)
    watcher = _watcher(sidecar.target)
    try:
        _open_stream(watcher)
        _errors(watcher, 2)
        assert watcher.enabled
        watcher.consecutive_errors = 0  # a step recorded in between: the count starts again
        _errors(watcher, 3)
        assert not watcher.enabled and watcher.counters["errors"] == 5
        assert watcher.flush(timeout=30)
        [verdict] = list(watcher.verdicts)  # the open stream was finished, not left to the sidecar's idle deadline
        assert verdict.request_id == "req-1" and verdict.steps_seen == 1
        watcher.submit([_tile(1)], BATCH)  # steps after the switch-off are not sent to the ended stream
        watcher.on_remove("req-1")
        assert watcher.flush(timeout=10) and watcher.counters["steps_sent"] == 1
    finally:
        watcher.close()


def test_switched_off_under_gate_fail_closed_ends_the_requests_it_cannot_judge(sidecar, monkeypatch):
    monkeypatch.setattr(vllm, "MAX_CONSECUTIVE_ERRORS", 2)
    watcher = _watcher(sidecar.target, gate="abort", gate_fail="closed")
    try:
        _open_stream(watcher)
        _errors(watcher, 2)
        assert watcher.flush(timeout=30)
        assert watcher.gated_rows(BATCH) == [0]  # the open request ends at the next step
        watcher.on_add(1, SimpleNamespace(req_id="req-2", prompt_token_ids=[2]))  # a new one: ended at once
        assert watcher.gates.tripped["req-2"].endswith("(the plugin switched itself off after errors)")
        for req_id in ("req-1", "req-2"):
            watcher.on_remove(req_id)
        assert watcher.flush(timeout=10) and watcher.gates.tripped == {}  # removed requests release their gates
    finally:
        watcher.close()


def test_the_request_ids_remembered_for_preemptions_are_bounded(sidecar, monkeypatch):
    monkeypatch.setattr(vllm, "SEEN_IDS", 4)
    watcher = _watcher(sidecar.target)
    try:
        for number in range(10):
            watcher._on_open(f"req-{number}", 0, [])
        watcher._on_open("req-9", 0, [])  # preempted and resumed: a new stream id
        assert watcher._by_slot[0].stream_id == "req-9#2"
        assert len(watcher._seen_ids) == 4 and "req-0" not in watcher._seen_ids
    finally:
        watcher._by_slot.clear()
        watcher.close()


def test_a_misspelt_setting_is_named_with_the_one_meant(caplog):
    with caplog.at_level(logging.WARNING, logger="canvaswatch.vllm"):
        config = load_config({"CANVASWATCH_VLLM_TARGET": "127.0.0.1:5", "CANVASWATCH_VLLM_GATE_ONTIMEOUT": "closed",
                              "CANVASWATCH_VLLM_VENV": "/cache/venv"})
    assert config.gate_on_timeout == "open"
    [record] = [r for r in caplog.records if "is no setting" in r.getMessage()]
    assert "CANVASWATCH_VLLM_GATE_ONTIMEOUT" in record.getMessage()
    assert "did you mean CANVASWATCH_VLLM_GATE_ON_TIMEOUT?" in record.getMessage()


def _commit_tile(step: int, emitted: int = 3) -> "vllm.TileRecord":
    tile = _tile(step)
    tile.denoising = torch.tensor([False])  # the block's commit step: it emits the canvas
    tile.emitted = torch.tensor([emitted], dtype=torch.int32)
    tile.argmax = torch.full_like(tile.argmax, 7000 + step)
    return tile


@pytest.mark.parametrize("policy", ["oldest", "newest"])
def test_a_dropped_step_keeps_what_it_committed_in_the_requests_output(sidecar, policy):
    import threading

    watcher = _watcher(sidecar.target, step_queue=1, drop_policy=policy)
    outputs: list[list[int]] = []
    end_stream = watcher._end_stream
    watcher._end_stream = lambda request: (outputs.append(list(request.outputs)), end_stream(request))
    entered, release = threading.Event(), threading.Event()
    on_step = watcher._on_step

    def slow_first(tiles, send=True):
        if not entered.is_set():
            entered.set()
            release.wait(10)  # the collector is busy: the engine keeps queueing, and steps are dropped
        on_step(tiles, send)

    watcher._on_step = slow_first
    try:
        watcher.on_add(0, SimpleNamespace(req_id="req-1", prompt_token_ids=[2]))
        watcher.submit([_tile(0)], BATCH)
        assert entered.wait(10)
        for step in (1, 2, 3):  # three commits while the queue holds one step: two are dropped
            watcher.submit([_commit_tile(step)], BATCH)
        watcher.on_remove("req-1")
        release.set()
        assert watcher.flush(timeout=30)
    finally:
        watcher.close()
    assert watcher.counters["steps_dropped_before_streams"] == 2
    # every committed canvas reached the final output, in order, whichever steps were dropped
    assert outputs == [[7001] * 3 + [7002] * 3 + [7003] * 3]
