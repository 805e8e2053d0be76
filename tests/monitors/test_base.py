"""The Monitor base class: its defaults, the flag helper, and the step view's NumPy members."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from canvaswatch.monitors.base import DecodedStep, Evidence, FinalCanvas, Flag, Monitor, NoParams, RequestMeta, Severity
from canvaswatch.monitors.registry import BUILTINS, contract_problem

META = RequestMeta("r", "m", "", (), 4, 0)


class Pieces:
    """Token i reads as "<i>"."""

    size = 16

    def piece(self, token_id):
        return f"<{token_id}>"

    def decode(self, ids):
        return "".join(self.piece(int(i)) for i in ids)


class Minimal(Monitor):
    """Flags every step.

    Not part of the description: only the first paragraph is.
    """

    name = "minimal"

    def on_step(self, state, step):
        return [self.flag("warning", "a step", Evidence(step.block, step.step, (0,), "text"), score=0.25,
                          count=3, settled=True, share=0.5)]


def test_a_subclass_needs_only_a_name_and_on_step():
    monitor = Minimal()
    assert Minimal.description == "Flags every step."
    assert Minimal.Params is NoParams and monitor.params == NoParams()
    assert monitor.start(META) is None
    assert monitor.on_finish(None, FinalCanvas((), "", 0, 0)) == []
    assert monitor.close() is None
    assert contract_problem(Minimal) is None


def test_flag_fills_in_the_monitor_and_turns_attributes_into_strings():
    vocab = Pieces()
    step = DecodedStep(block=1, step=2, ids=np.zeros((4, 2), dtype=np.int64), probs=np.zeros((4, 2), dtype=np.float32),
                       vocab=vocab)
    [flag] = Minimal().on_step(None, step)
    assert flag == Flag(monitor="minimal", severity=Severity.WARNING, reason="a step", score=0.25,
                        evidence=(Evidence(1, 2, (0,), "text"),),
                        attributes={"count": "3", "settled": "true", "share": "0.5"})
    assert Minimal().flag(Severity.CRITICAL, "x").severity is Severity.CRITICAL
    with pytest.raises(ValueError, match="unknown severity 'loud'"):
        Minimal().flag("loud", "x")


def test_params_come_from_the_constructor_and_a_description_can_be_set():
    @dataclass(frozen=True)
    class ThresholdParams:
        threshold: float = 0.5

    class WithParams(Monitor):
        name = "with_params"
        description = "set by hand"
        Params = ThresholdParams

        def on_step(self, state, step):
            return []

    assert WithParams().params == ThresholdParams() and WithParams(ThresholdParams(0.9)).params.threshold == 0.9
    assert WithParams.description == "set by hand"


def test_a_subclass_without_a_docstring_keeps_its_parent_description():
    class Renamed(Minimal):
        name = "renamed"

    assert Renamed.description == "Flags every step."


def test_without_on_step_or_name_the_class_is_refused():
    class NoStep(Monitor):
        name = "no_step"

    class NoName(Monitor):
        def on_step(self, state, step):
            return []

    assert contract_problem(NoStep) == "does not define on_step"
    assert contract_problem(NoName) == "sets no `name`"
    with pytest.raises(NotImplementedError, match="NoStep does not define on_step"):
        NoStep().on_step(None, None)


def test_every_built_in_uses_the_base_class():
    assert all(issubclass(cls, Monitor) and contract_problem(cls) is None for cls in BUILTINS.values())


def test_the_step_view_reads_numpy_whichever_form_the_arrays_came_in():
    vocab = Pieces()
    ids = torch.tensor([[3, 4], [5, 0]])
    probs = torch.tensor([[0.5, 0.25], [0.75, 0.0]])
    from_torch = DecodedStep(block=0, step=0, ids=ids, probs=probs, vocab=vocab, residual=torch.tensor([0.25, 0.25]),
                             canvas_ids=torch.tensor([3, 9]))
    from_numpy = DecodedStep(block=0, step=0, ids=ids.numpy(), probs=probs.numpy(), vocab=vocab,
                             residual=np.array([0.25, 0.25], dtype=np.float32), canvas_ids=np.array([3, 9]))
    fast = DecodedStep.from_numpy(ids.numpy(), probs.numpy(), block=0, step=0, vocab=vocab,
                                  residual=np.array([0.25, 0.25], dtype=np.float32), canvas_ids=np.array([3, 9]))
    for step in (from_torch, from_numpy, fast):
        assert isinstance(step.ids_np, np.ndarray) and step.ids_np.tolist() == [[3, 4], [5, 0]]
        assert isinstance(step.probs_np, np.ndarray) and step.probs_np[:, 0].tolist() == [0.5, 0.75]
        assert isinstance(step.residual, np.ndarray) and step.residual_mean == 0.25
        assert isinstance(step.canvas_ids, np.ndarray) and step.canvas_ids.tolist() == [3, 9]
        assert step.canvas_length == 2 and step.text == vocab.decode([3, 5]) and step.span_text(1, 9) == vocab.piece(5)
        assert step.new_block is False and step.accepted is None and step.hidden is None
        # the server's torch form stays available to it
        assert step.ids.dtype == torch.int64 and step.top1.tolist() == [3, 5]


def test_the_fast_constructor_builds_what_the_constructor_builds():
    ids = np.array([[3, 4], [5, 0]], dtype=np.int64)
    probs = np.array([[0.5, 0.25], [0.75, 0.0]], dtype=np.float32)
    given = dict(block=2, step=7, vocab=Pieces(), residual=np.array([0.25, 0.25], dtype=np.float32), residual_sum=0.5,
                 accepted=np.array([True, False]), entropy=np.array([0.1, 2.0], dtype=np.float32),
                 argmax_ids=np.array([3, 5]), temperature=0.7)
    slow, fast = DecodedStep(ids=ids, probs=probs, **given), DecodedStep.from_numpy(ids, probs, **given)
    for name in DecodedStep.__dataclass_fields__:
        mine, theirs = getattr(fast, name), getattr(slow, name)
        if isinstance(theirs, (np.ndarray, torch.Tensor)):
            assert type(mine) is type(theirs) and mine.tolist() == theirs.tolist(), name
        else:
            assert mine == theirs, name
    assert fast.ids_np is ids and fast.probs_np is probs  # views, no copies
    assert fast.new_block is False and fast.canvas_ids is None and fast.hidden is None  # defaults filled in
    with pytest.raises(TypeError, match="missing.*'step'"):
        DecodedStep.from_numpy(ids, probs, block=0, vocab=Pieces())
    with pytest.raises(AttributeError):  # still frozen
        fast.step = 3


def _read_only_view(values):
    array = np.array(values)
    view = array.view()
    view.flags.writeable = False
    return array, view


@pytest.mark.parametrize("kind", ["tuple", "list", "array", "read-only view"])
def test_prompt_ids_become_a_read_only_int32_array_of_their_own(kind):
    values = [5, 7, 262143]
    owner, given = {"tuple": (None, tuple(values)), "list": (None, list(values)), "array": (None, np.array(values)),
                    "read-only view": _read_only_view(values)}[kind]
    meta = RequestMeta("r", "m", "", given, 4, 0)
    assert meta.prompt_ids.dtype == np.int32 and meta.prompt_ids.tolist() == values
    with pytest.raises(ValueError):
        meta.prompt_ids[0] = 1
    for array in (given, owner):
        if isinstance(array, np.ndarray) and array.flags.writeable:
            array[0] = 9  # the caller's memory stays the caller's
    assert meta.prompt_ids[0] == 5


def test_metas_compare_without_their_prompt_arrays():
    assert RequestMeta("r", "m", "", (1, 2, 3), 4, 0) == RequestMeta("r", "m", "", [1, 2, 3], 4, 0)
    assert RequestMeta("r", "m", "", (1, 2), 4, 0) != RequestMeta("q", "m", "", (1, 2), 4, 0)
