"""The vLLM hold's parts without vLLM: the Hold's decisions, the streams it asks for, the preemption hand-over.

The same code against real vLLM 0.33.0 (its OutputProcessor, collectors, a real sidecar): test_vllm_hold.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

from canvaswatch.client.vllm_config import PluginConfig
from canvaswatch.client.vllm_hold import STREAMS_KEY, Hold, tag_stream_counts, take_stream_counts
from canvaswatch.v1 import monitor_pb2 as pb


@dataclass
class _Completion:
    token_ids: list[int]
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | None = None
    logprobs: object = None
    cumulative_logprob: float | None = None


@dataclass
class _Output:
    """RequestOutput's shape as the hold uses it (vLLM's `add` merges deltas the same way)."""

    finished: bool
    outputs: list[_Completion] = field(default_factory=list)

    def add(self, other: "_Output", aggregate: bool) -> None:
        self.finished |= other.finished
        mine, theirs = self.outputs[0], other.outputs[0]
        if aggregate:
            mine.token_ids = mine.token_ids + theirs.token_ids
        else:
            mine.token_ids = theirs.token_ids
        mine.finish_reason, mine.stop_reason = theirs.finish_reason, theirs.stop_reason


class _Verdicts:
    """A VerdictSource answering from a dict when told to (None: no verdict, as a silent sidecar)."""

    def __init__(self, known: dict[str, pb.Verdict | None]) -> None:
        self.known, self.asked = known, []

    def ask(self, request_id, wait_s, done) -> None:
        self.asked.append((request_id, wait_s))
        verdict = self.known.get(request_id)
        done(verdict, "" if verdict is not None else "no verdict")


def _hold(verdicts, **settings) -> tuple[Hold, list]:
    config = PluginConfig(target="h:1", gate="hold", **settings)
    released: list = []
    hold = Hold(config, verdicts)
    return hold, released


def _out(tokens, finished=False) -> _Output:
    return _Output(finished, [_Completion(list(tokens), finish_reason="length" if finished else None)])


def test_deltas_are_held_merged_and_released_after_a_clean_verdict():
    verdicts = _Verdicts({"r1": pb.Verdict(request_id="r1")})
    hold, released = _hold(verdicts)
    hold.register("q", "r1", released.append, aggregate=True)
    hold.put("q", _out([1, 2]))
    hold.put("q", _out([3]))
    assert released == [] and verdicts.asked == []  # nothing leaves, nothing asked before the finished output
    hold.put("q", _out([4], finished=True))
    assert verdicts.asked == [("r1", 2.0)]
    [output] = released
    assert output.finished and output.outputs[0].token_ids == [1, 2, 3, 4]
    assert hold.gate.decisions == {"released": 1} and hold.pending == 0 and len(hold.latencies) == 1
    hold.put("q", _out([9], finished=True))  # after the release, nothing is held any more
    assert len(released) == 1


def test_a_severe_verdict_withholds_and_says_why():
    flag = pb.Flag(monitor="lexicon", severity=pb.CRITICAL)
    hold, released = _hold(_Verdicts({"r1": pb.Verdict(request_id="r1", flags=[flag], max_severity=pb.CRITICAL)}))
    hold.register("q", "r1", released.append, aggregate=False)
    hold.put("q", _out([5, 6], finished=True))
    [output] = released
    completion = output.outputs[0]
    assert completion.token_ids == [] and completion.text == "" and completion.finish_reason == "abort"
    assert completion.stop_reason == "canvaswatch gate: withheld (lexicon CRITICAL)"
    # a flag below gate_block_at (CRITICAL): released
    warning = pb.Flag(monitor="lexicon", severity=pb.WARNING)
    hold, released = _hold(_Verdicts({"r1": pb.Verdict(request_id="r1", flags=[warning])}))
    hold.register("q", "r1", released.append, aggregate=False)
    hold.put("q", _out([5], finished=True))
    assert released[0].outputs[0].token_ids == [5]


def test_no_verdict_releases_open_and_withholds_closed():
    for on_timeout, tokens, decision in (("open", [7], "released_on_timeout"), ("closed", [], "blocked_on_timeout")):
        hold, released = _hold(_Verdicts({}), gate_on_timeout=on_timeout, gate_budget_s=0.5)
        hold.register("q", "r1", released.append, aggregate=False)
        hold.put("q", _out([7], finished=True))
        assert released[0].outputs[0].token_ids == tokens and hold.gate.decisions == {decision: 1}
        if on_timeout == "closed":
            assert released[0].outputs[0].stop_reason.startswith("canvaswatch gate: withheld, no verdict within 0.5 s")


def test_a_preempted_request_waits_for_every_stream_and_the_count_never_reaches_the_caller():
    flag = pb.Flag(monitor="trigger", severity=pb.CRITICAL)
    verdicts = _Verdicts({"r1": pb.Verdict(request_id="r1"), "r1#2": pb.Verdict(request_id="r1#2"),
                          "r1#3": pb.Verdict(request_id="r1#3", flags=[flag])})
    hold, released = _hold(verdicts)
    hold.register("q", "r1", released.append, aggregate=False)
    # engine core: the scheduler freed r1 after two preemptions and tags its finished output
    finished = SimpleNamespace(request_id="r1", finish_reason=1, kv_transfer_params={"other": 1})
    running = SimpleNamespace(request_id="r2", finish_reason=None, kv_transfer_params=None)
    tag_stream_counts({0: SimpleNamespace(outputs=[finished, running])}, {"r1": 3, "r2": 2})
    assert finished.kv_transfer_params == {"other": 1, STREAMS_KEY: 3} and running.kv_transfer_params is None
    # frontend: taken out before vLLM builds the caller's output
    take_stream_counts([finished, running], hold.streams)
    assert finished.kv_transfer_params == {"other": 1} and hold.streams == {"r1": 3}
    hold.put("q", _out([1], finished=True))
    assert [asked for asked, _ in verdicts.asked] == ["r1", "r1#2", "r1#3"]
    assert released[0].outputs[0].stop_reason == "canvaswatch gate: withheld (trigger CRITICAL)"
    lone = SimpleNamespace(request_id="r3", finish_reason=1, kv_transfer_params={STREAMS_KEY: 2})
    take_stream_counts([lone], {})
    assert lone.kv_transfer_params is None


def test_an_error_passes_through_and_an_empty_output_is_not_asked_about():
    verdicts = _Verdicts({})
    hold, released = _hold(verdicts)
    hold.register("q", "r1", released.append, aggregate=False)
    error = RuntimeError("engine dead")
    hold.put("q", error)
    assert released == [error] and hold.pending == 0
    hold.register("q2", "r2", released.append, aggregate=False)
    hold.put("q2", _out([], finished=True))
    assert verdicts.asked == [] and hold.counters["released_empty"] == 1 and released[-1].finished


def test_an_aborted_llm_engine_request_is_forgotten():
    hold, released = _hold(_Verdicts({}))
    hold.register(("llm", "x"), "r1", released.append, aggregate=False)
    hold.put(("llm", "x"), _out([1]))
    hold.forget(["r1"])
    assert hold.pending == 0 and released == []
