"""check_monitor: every built-in keeps the contract, and a monitor that breaks a rule is told which and where."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from canvaswatch.monitors.base import Evidence, Monitor, NoParams
from canvaswatch.monitors.probe import ProbeParams
from canvaswatch.monitors.registry import BUILTINS
from canvaswatch.monitors.testing import (
    MonitorCheckError,
    SyntheticVocabulary,
    canvas_step,
    check_monitor,
    run_request,
)


# the classifier's is in test_classifier.py, beside the tiny model it needs
@pytest.mark.parametrize("name", sorted(set(BUILTINS) - {"classifier", "probe"}))
def test_every_built_in_keeps_the_contract(name):
    check_monitor(BUILTINS[name])


def test_the_probe_keeps_the_contract_on_steps_that_carry_vectors(tmp_path):
    path = tmp_path / "probes.safetensors"
    direction = torch.randn(16, generator=torch.Generator().manual_seed(0))
    save_file({"concept.direction": direction, "concept.bias": torch.tensor(0.0),
               "concept.threshold": torch.tensor(0.99)}, str(path))
    report = check_monitor(BUILTINS["probe"], ProbeParams(path=str(path)), hidden_size=16)
    assert report.flags  # random vectors cross the threshold somewhere: the flag path was checked too


class Counting(Monitor):
    """Counts the steps of a request and says so at its end."""

    name = "counting"

    def start(self, request):
        return {"steps": 0}

    def on_step(self, state, step):
        state["steps"] += 1
        return []

    def on_finish(self, state, final):
        return [self.flag("info", f"{state['steps']} steps", Evidence(0, 0, (0,)), score=0.5, steps=state["steps"])]


def test_a_monitor_that_keeps_the_rules_passes_and_gets_a_report():
    report = check_monitor(Counting)
    assert report.flags and all(flag.monitor == "counting" for flag in report.flags)
    assert report.slowest_call_ms < 50


def test_a_class_with_only_the_protocol_is_checked_the_same():
    class Plain:
        name = "plain"
        description = "a monitor without the base class"
        Params = NoParams

        def __init__(self, params):
            self.params = params

        def start(self, request):
            return None

        def on_step(self, state, step):
            return []

        def on_finish(self, state, final):
            return []

    check_monitor(Plain)


class KeepsCountOnSelf(Counting):
    """Keeps the request's count on the instance."""

    name = "on_self"

    def start(self, request):
        self.steps = 0

    def on_step(self, state, step):
        self.steps += 1
        return []

    def on_finish(self, state, final):
        return [self.flag("info", f"{self.steps} steps")]


class KeepsEveryRequest(Counting):
    """Keeps each request's state on the instance, by request, and never lets go."""

    name = "every_request"

    def __init__(self, params=None):
        super().__init__(params)
        self.states = {}

    def start(self, request):
        state = self.states[len(self.states)] = {"steps": 0, "seen": np.zeros(request.canvas_length * 4)}
        return state


class KeepsEveryStep(Counting):
    """Keeps a copy of every step."""

    name = "every_step"

    def start(self, request):
        return []

    def on_step(self, state, step):
        state.append(step.ids_np.copy())
        return []

    def on_finish(self, state, final):
        return []


class NeverResets(Counting):
    """Flags confident top-1 changes, remembering the last canvas across blocks."""

    name = "never_resets"

    def start(self, request):
        return {"last": None}

    def on_step(self, state, step):
        top1, flags = step.ids_np[:, 0], []
        if state["last"] is not None:
            changed = np.flatnonzero((top1 != state["last"]) & (step.probs_np[:, 0] >= 0.8))
            if len(changed):
                flags.append(self.flag("info", f"{len(changed)} changed", Evidence(step.block, step.step, tuple(changed.tolist()))))
        state["last"] = top1.copy()
        return flags

    def on_finish(self, state, final):
        return []


class Slow(Counting):
    """Sleeps through every step of a long canvas."""

    name = "slow"

    def on_step(self, state, step):
        if step.canvas_length > 100:
            time.sleep(0.06)
        return []


class Raises(Counting):
    """Fails at step 3."""

    name = "raises"

    def on_step(self, state, step):
        if step.step == 3:
            raise KeyError("boom")
        return []


class FailsTheWarmUp(Counting):
    """Assumes a canvas is never 16 positions long."""

    name = "fails_warm_up"

    def start(self, request):
        assert request.canvas_length != 16
        return {"steps": 0}


class Quotes(Counting):
    """Quotes the canvas in its reason."""

    name = "quotes"

    def on_step(self, state, step):
        return [self.flag("info", f"saw {step.span_text(0, 2)}")] if step.step == 1 else []


class OutOfRange(Counting):
    """Scores 3 and points past the canvas."""

    name = "out_of_range"

    def on_step(self, state, step):
        return [self.flag("info", "x", Evidence(0, 0, (step.canvas_length,)), score=3.0)] if step.step == 1 else []


class Writes(Counting):
    """Clears the top-1 probability of position 0 in place."""

    name = "writes"

    def on_step(self, state, step):
        step.probs_np[0, 0] = 0.0
        return []


class NoOnStep(Monitor):
    """Has no on_step."""

    name = "no_on_step"


@pytest.mark.parametrize("cls, expected", [
    (KeepsCountOnSelf, r"rule 1 \(one instance serves every request.*raised other flags while another request ran"),
    (KeepsEveryRequest, r"rule 1 .*the monitor instance grew by [\d,]+ bytes while requests ran"),
    (KeepsEveryStep, r"rule 2 \(state is bounded by the canvas length L\): the state held [\d,]+ bytes after 400 steps"),
    (NeverResets, r"rule 3 \(positional state starts over at a new block\): block 1 after block 0 raised"),
    (Slow, r"rule 4 \(each call fits the per-call budget\): on_step took [\d.]+ ms on a canvas of L = 256"),
    (Raises, r"rule 5 .*on_step raised KeyError: 'boom' \(.*\) at block 0 step 3 of the 'one block' request"),
    (FailsTheWarmUp, r"rule 6 \(the warm-up request\): start raised AssertionError"),
    (Quotes, r"rule 7 .*the reason 'saw §..§..' .* holds canvas text"),
    (OutOfRange, r"rule 8 .*has score 3.0, not a number in \[0, 1\]"),
    (OutOfRange, r"rule 8 .*names positions \[16\], outside the canvas \[0, 16\)"),
    (Writes, r"rule 9 .*on_step changed step.probs_np in place"),
    (NoOnStep, r"(?s)no_on_step breaks 1 rule.*the class does not define on_step"),
])
def test_a_broken_rule_is_named_with_where_it_broke(cls, expected):
    with pytest.raises(MonitorCheckError, match=expected):
        check_monitor(cls)


def test_canvas_step_and_run_request_build_requests_by_hand():
    vocab = SyntheticVocabulary(64)
    step = canvas_step([5, 6, 7], [0.9, 0.5, 0.9], vocab=vocab, alternatives={1: [(8, 0.3)]}, accepted=[1, 0, 1])
    assert step.ids_np.tolist() == [[5, 0, 0, 0], [6, 8, 0, 0], [7, 0, 0, 0]]
    assert step.residual.tolist() == pytest.approx([0.1, 0.2, 0.1])
    assert step.accepted.tolist() == [1, 0, 1] and step.entropy is None and step.text == vocab.decode([5, 6, 7])
    assert vocab.encode(step.text) == [5, 6, 7] and vocab.encode("plain text") == []

    seen = []

    class Records(Counting):
        name = "records"

        def on_step(self, state, step):
            seen.append((step.block, step.step, step.new_block))
            return super().on_step(state, step)

    steps = [canvas_step([1, 2], block=block, step=number) for block in (0, 1) for number in (0, 1)]
    [flag] = run_request(Records(), steps)
    assert seen == [(0, 0, True), (0, 1, False), (1, 0, True), (1, 1, False)]
    assert flag.reason == "4 steps"
