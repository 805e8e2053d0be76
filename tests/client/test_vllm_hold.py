"""Hold mode in the vLLM plugin against real vLLM 0.33.0 on the CPU and a real sidecar: output waits for its verdict.

The sidecar runs here on an ephemeral loopback port with a planted trigger (tests/trigger_monitor.py:
CRITICAL at block 0, step 1 of streams named "bad-*" or "pre#*", a flag nothing in the canvas shows), and a second
server that accepts GetVerdict and never answers stands in for a hung sidecar.
tests/client/vllm_cpu_hold_engine.py drives vLLM's DiffusionSampler and model state in an engine thread
and vLLM's OutputProcessor and RequestOutputCollectors in an AsyncLLM-style frontend (fixtures shared with
test_vllm_plugin.py: the venv, built once per machine, and this checkout's wheel installed into it).
"""

from __future__ import annotations

import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from canvaswatch.v1 import monitor_pb2 as pb
from tests.client.test_vllm_plugin import installed, run_engine, vllm_python  # noqa: F401  (module-scoped fixtures)
from tests.conftest import install_entry_point, start_sidecar

ENGINE = Path(__file__).with_name("vllm_cpu_hold_engine.py")


def silent_sidecar() -> tuple[grpc.Server, str]:
    """A server that takes GetVerdict calls and never answers them (a hung sidecar): each ends at its deadline."""

    def never(request: bytes, context: grpc.ServicerContext) -> bytes:
        time.sleep(max(0.0, context.time_remaining() or 0.0) + 0.2)
        return b""

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "canvaswatch.v1.CanvasMonitor", {"GetVerdict": grpc.unary_unary_rpc_method_handler(never)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.mark.slow
def test_hold_releases_output_only_after_its_verdict_without_delaying_the_batch(installed, vocab, tmp_path,  # noqa: F811
                                                                                  monkeypatch):
    install_entry_point(tmp_path, monkeypatch, "trigger", "tests.trigger_monitor:Trigger")
    running = start_sidecar(vocab, tmp_path, {"monitors": {"trigger": {"at_step": 1, "request_prefix": "bad-",
                                                                       "also_prefix": "pre#"}}})
    silent, silent_target = silent_sidecar()
    try:
        result = run_engine(installed, ENGINE, running, tmp_path, {
            "CANVASWATCH_VLLM_MAX_PENDING": "1000", "CANVASWATCH_VLLM_GATE": "hold",
            "CANVASWATCH_VLLM_GATE_BUDGET_S": "20", "CANVASWATCH_VLLM_GATE_ON_TIMEOUT": "closed",
            "CANVASWATCH_TEST_SILENT": silent_target})
    finally:
        silent.stop(0)
    truth, received, finished_at = result["truth"], result["received"], result["finished_at"]
    assert result["flushed"] and result["watcher"].get("errors", 0) == 0, result["watcher"]
    assert result["pending"] == {"main": 0, "open": 0, "closed": 0}
    verdicts = result["verdicts"]

    # Each caller got exactly one output, the finished one: nothing (streamed deltas included) left before it,
    # and it left only after the request's stream had sent its final message, i.e. after there was a verdict.
    for req_id, got in received.items():
        assert len(got) == 1 and got[0]["finished"], (req_id, got)
        assert got[0]["engine_step"] >= finished_at[req_id][0], (req_id, got[0], finished_at[req_id])
        assert got[0]["at"] > result["cleared_at"][req_id], req_id
        assert len(truth[req_id]) > 0, req_id  # the engine generated it in full: the hold never stops generation

    # The planted request: the trigger is in its verdict only, and its output is withheld.
    assert verdicts["bad-async"]["max_severity"] == pb.CRITICAL and verdicts["bad-async"]["flags"] == ["trigger"]
    bad = received["bad-async"][0]
    assert bad["token_ids"] == [] and bad["finish_reason"] == "abort"
    assert bad["stop_reason"] == "canvaswatch gate: withheld (trigger CRITICAL)", bad
    # Clean requests: released after a clean verdict, every committed token (DELTA merged, CUMULATIVE whole).
    for clean in ("clean-a", "clean-long"):
        assert verdicts[clean]["flags"] == [], verdicts[clean]
        assert received[clean][0]["token_ids"] == truth[clean] and received[clean][0]["finish_reason"] == "length"
    assert result["decisions"]["main"] == {"blocked_verdict": 2, "released": 2}, result["decisions"]

    # A request preempted and resumed streams as "pre", then "pre#2"; the trigger is in the resumed stream only.
    # The engine core told the frontend (kv_transfer_params, taken out before the caller sees it) to wait for both.
    assert verdicts["pre"]["flags"] == [] and verdicts["pre#2"]["flags"] == ["trigger"], verdicts
    pre = received["pre"][0]
    assert pre["token_ids"] == [] and pre["stop_reason"] == "canvaswatch gate: withheld (trigger CRITICAL)", pre
    assert all(got[0]["kv_transfer_params"] is None for got in received.values())

    # A sidecar that never answers: open releases after the budget (counted), closed withholds.
    opened, closed = received["silent-open"][0], received["silent-closed"][0]
    assert opened["token_ids"] == truth["silent-open"] and opened["finish_reason"] == "length"
    assert opened["at"] - finished_at["silent-open"][1] >= 0.5
    assert result["decisions"]["open"] == {"released_on_timeout": 1}
    assert closed["token_ids"] == [] and closed["finish_reason"] == "abort"
    assert closed["stop_reason"].startswith("canvaswatch gate: withheld, no verdict within 0.5 s (fail-closed;"), closed
    assert closed["at"] - finished_at["silent-closed"][1] >= 0.5
    assert result["decisions"]["closed"] == {"blocked_on_timeout": 1}

    # Nobody else waited: while bad-async's output was held, the engine kept stepping and computed clean-long at
    # every one of those steps (its batch steps are contiguous from admission to finish).
    held = result["held_steps"]["bad-async"]
    long_steps = result["in_batch"]["clean-long"]
    assert held and held[0] in long_steps, (held, long_steps)
    assert long_steps == list(range(long_steps[0], long_steps[-1] + 1))
    assert finished_at["clean-long"][0] > finished_at["bad-async"][0]

    # LLMEngine's path (the plugin's __init__ and step() wrappers, the real OutputProcessor): the same decisions.
    sync = result["sync"]
    assert sync["released"] == 2  # once each, and LLM.generate()'s loop (has_unfinished_requests) waited for them
    assert sync["outputs"]["llm-bad-async"]["token_ids"] == []
    assert sync["outputs"]["llm-bad-async"]["stop_reason"] == "canvaswatch gate: withheld (trigger CRITICAL)"
    assert sync["outputs"]["llm-clean-a"]["token_ids"] == truth["clean-a"]
    assert sync["decisions"] == {"blocked_verdict": 1, "released": 1}
    waits = [received[r][0]["at"] - finished_at[r][1] for r in ("bad-async", "clean-a", "clean-long")]
    print(f"\nvLLM CPU hold: finished-in-engine -> released {', '.join(f'{w * 1000:.0f}' for w in waits)} ms "
          f"(the worker sends the final message at the next step's start); bad-async held during {len(held)} engine steps; "
          f"run {result['seconds']:.1f} s")
