"""Gate mode in the vLLM plugin against real vLLM 0.33.0 on the CPU and a real sidecar: a severe flag ends its request.

The sidecar runs here on an ephemeral loopback port with the lexicon watching one phrase at CRITICAL;
tests/client/vllm_cpu_gate_engine.py drives vLLM's own DiffusionScheduler (as its engine core does),
DiffusionSampler and model state in the vLLM venv (fixtures shared with test_vllm_plugin.py: the venv,
built once per machine, and this checkout's wheel installed into it). One request plants the phrase
in its first denoising steps; two clean requests run beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from canvaswatch.v1 import monitor_pb2 as pb
from tests.client.test_vllm_plugin import installed, run_engine, vllm_python  # noqa: F401  (module-scoped fixtures)
from tests.conftest import start_sidecar

ENGINE = Path(__file__).with_name("vllm_cpu_gate_engine.py")
PHRASE = "disable the safety interlock"


@pytest.mark.slow
def test_a_planted_critical_phrase_ends_its_vllm_request_and_clean_requests_pass(installed, vocab,  # noqa: F811
                                                                                  tmp_path):
    phrase_ids = vocab.encode(" " + PHRASE)
    running = start_sidecar(vocab, tmp_path, {"monitors": {"lexicon": {"patterns": [PHRASE], "regex": [],
                                                                       "severity": "critical"}}})
    result = run_engine(installed, ENGINE, running, tmp_path, {
        "CANVASWATCH_VLLM_MAX_PENDING": "1000", "CANVASWATCH_VLLM_GATE": "abort",
        "CANVASWATCH_VLLM_GATE_SEVERITY": "CRITICAL", "CANVASWATCH_TEST_PHRASE_IDS": json.dumps(phrase_ids)})
    canvas, blocks, truth = result["canvas"], result["blocks"], result["truth"]
    assert result["flushed"] and result["counters"].get("errors", 0) == 0, result["counters"]

    assert result["scheduler"] == "DiffusionScheduler"

    # The planted request, and only it, was ended by the gate, as vLLM ends an aborted request,
    # with a reason its caller reads in CompletionOutput.stop_reason.
    assert {req_id for req_id, end in result["ended"].items() if end["trip_step"] is not None} == {"req-G"}
    ended = result["ended"]["req-G"]
    assert ended["finish_reason"] == "abort" and ended["new_token_ids"] == []
    assert ended["stop_reason"] == "canvaswatch gate: lexicon CRITICAL", ended
    # It ended at the first engine step begun after the flag arrived; no step after that one was computed
    # for it, and that step emitted nothing (a commit there would have released a canvas).
    assert ended["engine_step"] == ended["trip_step"] + 1, ended
    assert result["decode_steps"]["req-G"][-1] == ended["engine_step"]
    assert result["emitted"]["req-G"][-1] == 0
    # The phrase was planted in block 0's first steps: the flag came before the request's last canvas
    # (six blocks), which it never committed.
    assert len(truth["req-G"]["committed"]) < blocks["req-G"] * canvas
    # What vLLM's scheduler emitted for it, all told: the canvases committed before the flag, nothing after.
    assert result["received"]["req-G"] == truth["req-G"]["committed"]
    assert result["decisions"] == {"blocked_flag": 1, "blocked_unavailable": 0}
    assert result["counters"]["gated_steps"] == 1

    # The clean requests ran to their end beside it, every canvas committed, with clean verdicts.
    verdicts = result["verdicts"]
    for clean in ("req-A", "req-B"):
        assert len(truth[clean]["committed"]) == blocks[clean] * canvas, clean
        # the scheduler finished it at max_tokens and emitted every committed canvas, in order
        assert result["ended"][clean]["finish_reason"] == "length" and result["ended"][clean]["stop_reason"] is None
        assert result["received"][clean] == truth[clean]["committed"], clean
        assert verdicts[clean]["max_severity"] < pb.CRITICAL and verdicts[clean]["flags"] == [], verdicts[clean]
        assert verdicts[clean]["steps_seen"] == len(truth[clean]["steps"])
    # The gated request's stream still ends with its final message (what was committed): its verdict has the flag.
    assert verdicts["req-G"]["max_severity"] == pb.CRITICAL and "lexicon" in verdicts["req-G"]["flags"]
    print(f"\nvLLM CPU gate: flag arrived after engine step {ended['trip_step']}, request ended at step "
          f"{ended['engine_step']}, {len(truth['req-G']['committed']) // canvas} of {blocks['req-G']} blocks "
          f"committed; {result['scheduler']} ran {result['scheduler_steps']} steps; run {result['seconds']:.1f} s")
