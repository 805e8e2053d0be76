"""The vLLM plugin's gate mode, piece by piece and without vLLM: which requests trip, how a sampler output is
silenced, and what a failed sidecar stream does (fail-open by default, fail-closed on request).

The whole path through vLLM's own classes is tests/client/test_vllm_gate.py (the vLLM venv)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import torch

from canvaswatch.client.vllm import Watcher
from canvaswatch.client.vllm_config import PluginConfig
from canvaswatch.client.vllm_gate import RequestGates, policy_for, suppress
from canvaswatch.v1 import monitor_pb2 as pb
from tests.client.test_vllm_watcher import _tile


def _flag(request_id: str, severity: int, monitor: str = "lexicon") -> pb.MonitorEvent:
    return pb.MonitorEvent(request_id=request_id, flag=pb.Flag(monitor=monitor, severity=severity, reason="x"))


def test_a_flag_at_the_gate_severity_trips_only_its_request_and_names_the_monitor():
    gates = RequestGates(policy_for("CRITICAL"), fail_closed=False)
    gates.open("a"), gates.open("b")
    gates.steps_started = 7
    gates.on_event("a", _flag("a", pb.WARNING))  # below the severity: serving goes on
    assert gates.rows(["a", "b"]) == [] and gates.tripped == {}
    gates.on_event("a", _flag("a", pb.CRITICAL))
    gates.on_event("a", _flag("a", pb.CRITICAL, monitor="other"))  # already tripped: the first reason stands
    assert gates.tripped == {"a": "canvaswatch gate: lexicon CRITICAL"} and gates.trip_step == {"a": 7}
    assert gates.rows(["b", "a"]) == [1] and gates.decisions["blocked_flag"] == 1
    gates.on_stream_failed("b", "UNAVAILABLE")  # fail-open: a failed stream ends nothing
    assert "b" not in gates.tripped
    gates.close("a")  # vLLM removed it
    assert gates.tripped == {} and gates.rows(["a"]) == []
    gates.on_event("zzz", _flag("zzz", pb.CRITICAL))  # a request the plugin never opened
    assert gates.tripped == {}


def test_a_lower_gate_severity_trips_on_warnings():
    gates = RequestGates(policy_for("WARNING"), fail_closed=True)
    gates.open("a"), gates.open("b")
    gates.on_event("a", _flag("a", pb.WARNING, monitor="self_correction"))
    gates.on_stream_failed("b", "UNAVAILABLE: connection refused")
    assert gates.tripped == {"a": "canvaswatch gate: self_correction WARNING",
                             "b": "canvaswatch gate: sidecar unavailable, fail-closed (UNAVAILABLE: connection refused)"}
    assert gates.decisions == {"blocked_flag": 1, "blocked_unavailable": 1}


def test_suppress_silences_the_gated_rows_and_books_them_as_denoising_steps():
    canvas = 4
    sampled = torch.arange(3 * canvas, dtype=torch.int32).view(3, canvas) + 100
    output = SimpleNamespace(sampled_token_ids=sampled.clone(),
                             num_sampled=torch.tensor([canvas, canvas, 0], dtype=torch.int32),
                             num_rejected=torch.tensor([0, 0, canvas], dtype=torch.int32))
    batch = SimpleNamespace(query_start_loc_np=np.array([0, canvas, 2 * canvas, 3 * canvas], dtype=np.int32))
    suppress(output, [1], batch)
    assert output.num_sampled.tolist() == [canvas, 0, 0]  # row 1's commit emits nothing
    assert output.num_rejected.tolist() == [0, canvas, canvas]
    assert torch.equal(output.sampled_token_ids[0], sampled[0]) and output.sampled_token_ids[1].tolist() == [0] * canvas


def _watcher(target: str, **settings) -> Watcher:
    sampler = SimpleNamespace(
        diffusion_states=SimpleNamespace(max_num_reqs=4, device=torch.device("cpu"), max_denoising_steps=8,
                                         step_allowed=None),
        entropy_bound=0.5, t_min=0.4, t_max=0.8)
    return Watcher(PluginConfig(target=target, k=4, **settings), SimpleNamespace(), sampler)


def _run_until_failed(watcher: Watcher) -> None:
    batch = SimpleNamespace(num_reqs=1, req_ids=["req-1"])
    watcher.on_add(0, SimpleNamespace(req_id="req-1", prompt_token_ids=[2, 5]))
    deadline = time.monotonic() + 20
    step = 0
    while watcher.counters["streams_failed"] == 0 and time.monotonic() < deadline:
        watcher.submit([_tile(step)], batch)  # the collector notices the failed stream at the next step it sends
        step += 1
        time.sleep(0.1)


def test_sidecar_down_fails_open_by_default_counted_and_logged(caplog):
    watcher = _watcher("127.0.0.1:1", gate="abort")  # nothing listens on port 1
    try:
        with caplog.at_level("WARNING", logger="canvaswatch.vllm"):
            _run_until_failed(watcher)
        assert watcher.counters["streams_failed"] == 1
        assert watcher.gates.tripped == {} and watcher.gated_rows(SimpleNamespace(num_reqs=1, req_ids=["req-1"])) == []
        assert any("stream_failed" in r.getMessage() and "UNAVAILABLE" in r.getMessage() for r in caplog.records)
        watcher.on_remove("req-1")
        assert watcher.flush(timeout=10)
    finally:
        watcher.close()


def test_sidecar_down_with_gate_fail_closed_ends_the_request():
    watcher = _watcher("127.0.0.1:1", gate="abort", gate_fail="closed")
    try:
        _run_until_failed(watcher)
        batch = SimpleNamespace(num_reqs=1, req_ids=["req-1"])
        assert watcher.gated_rows(batch) == [0]
        assert watcher.gates.tripped["req-1"].startswith("canvaswatch gate: sidecar unavailable, fail-closed (UNAVAILABLE")
        output = SimpleNamespace(sampled_token_ids=torch.ones(1, 8, dtype=torch.int32),
                                 num_sampled=torch.tensor([8], dtype=torch.int32), num_rejected=torch.tensor([0]))
        watcher.suppress(output, [0], SimpleNamespace(req_ids=["req-1"], query_start_loc_np=np.array([0, 8])))
        assert output.num_sampled.tolist() == [0] and list(watcher.take_gated()) == ["req-1"]
        assert watcher.take_gated() == {}  # handed to the scheduler once
        watcher.on_remove("req-1")
        assert watcher.flush(timeout=10) and watcher.gates.tripped == {}
    finally:
        watcher.close()
