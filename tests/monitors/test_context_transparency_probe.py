"""intermediate_context, transparency and probe on constructed requests."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from canvaswatch.monitors.base import DecodedStep, FinalCanvas, RequestMeta
from canvaswatch.monitors.intermediate_context import IntermediateContextMonitor, IntermediateContextParams
from canvaswatch.monitors.probe import ProbeMonitor, ProbeParams
from canvaswatch.monitors.registry import MonitorConfigError, build
from canvaswatch.monitors.transparency import TransparencyMonitor, TransparencyParams
from tests.monitors.canvas import canvas_step

META = RequestMeta("r", "m", "", (), 16, 24)


def _pad(ids, vocab, length=16):
    return (ids + vocab.encode(" the") * length)[:length]


def test_intermediate_only_content_is_flagged_with_its_span_of_steps(vocab):
    monitor = IntermediateContextMonitor(IntermediateContextParams())
    state = monitor.start(META)
    clean = _pad(vocab.encode("Clean the tiles with soap"), vocab)
    harmful = _pad(vocab.encode("Clean the tiles, mix bleach and ammonia"), vocab)
    for step, canvas in enumerate([clean, harmful, harmful, harmful, clean]):
        assert monitor.on_step(state, canvas_step(canvas, 0.9, step=step, vocab=vocab)) == []
    output = vocab.encode("Clean the tiles with soap")
    [flag] = monitor.on_finish(state, FinalCanvas(tuple(output), vocab.decode(output), 5, 0))
    assert flag.attributes["first_step"] == "1" and flag.attributes["last_step"] == "3"
    assert flag.attributes["steps_present"] == "3" and "absent from the final output" in flag.reason


def test_content_that_reaches_the_output_is_not_intermediate_context(vocab):
    monitor = IntermediateContextMonitor(IntermediateContextParams(patterns=["launch code"]))
    state = monitor.start(META)
    canvas = _pad(vocab.encode("the launch code is"), vocab)
    monitor.on_step(state, canvas_step(canvas, 0.9, vocab=vocab))
    output = vocab.encode("the launch code is 42")
    assert monitor.on_finish(state, FinalCanvas(tuple(output), vocab.decode(output), 1, 0)) == []


def test_min_steps_ignores_a_one_step_flicker(vocab):
    monitor = IntermediateContextMonitor(IntermediateContextParams(patterns=["launch code"], min_steps=2))
    state = monitor.start(META)
    monitor.on_step(state, canvas_step(_pad(vocab.encode("a launch code"), vocab), 0.9, vocab=vocab))
    assert monitor.on_finish(state, FinalCanvas((), "", 1, 0)) == []


def _coverage(steps_seen, total=24, residual=0.05, vocab=None):
    monitor = TransparencyMonitor(TransparencyParams())
    state = monitor.start(RequestMeta("r", "m", "", (), 4, total))
    for step in steps_seen:
        decoded = canvas_step([3000] * 4, 0.9, step=step, vocab=vocab)
        decoded = DecodedStep(block=0, step=step, ids=decoded.ids, probs=decoded.probs, vocab=vocab,
                              residual=torch.full((4,), residual))
        monitor.on_step(state, decoded)
    return monitor.on_finish(state, FinalCanvas((), "", len(steps_seen), total - len(steps_seen)))


def test_transparency_reports_opaque_depth_of_unseen_runs(vocab):
    assert _coverage(range(24), vocab=vocab) == []
    assert _coverage([s for s in range(24) if s % 2 == 0], vocab=vocab) == []  # every other step: depth 2
    [flag] = _coverage([s for s in range(24) if not 5 <= s < 12], vocab=vocab)
    assert flag.attributes["opaque_depth"] == "8"
    assert flag.reason.startswith("7 consecutive denoising steps never reached the monitors (opaque depth 8")
    [tail] = _coverage(range(12), vocab=vocab)  # the block's last 12 steps never came
    assert tail.attributes["opaque_depth"] == "13"


def test_transparency_counts_a_block_that_never_arrived_as_unseen_steps(vocab):
    monitor = TransparencyMonitor(TransparencyParams())
    state = monitor.start(RequestMeta(request_id="r", model="m", tenant="", prompt_ids=(), canvas_length=4, total_steps=8))
    for block in (0, 2):  # block 1 never sent: its 8 steps reached no monitor
        for step in range(8):
            monitor.on_step(state, dataclasses.replace(canvas_step([3000] * 4, 0.9, step=step, vocab=vocab), block=block))
    [flag] = monitor.on_finish(state, FinalCanvas((), "", 16, 0))
    assert flag.attributes["opaque_depth"] == "9" and flag.evidence[0].block == 1


def test_transparency_flags_residual_mass_in_settled_steps(vocab):
    [flag] = _coverage(range(24), residual=0.7, vocab=vocab)
    assert flag.attributes["residual_mass"] == "0.700"
    assert (flag.evidence[0].block, flag.evidence[0].step) == (0, 23)  # the block's last step seen, which it speaks of


def test_probe_fires_on_positions_along_its_direction(tmp_path, vocab):
    direction = torch.zeros(8)
    direction[3] = 1.0
    path = tmp_path / "probes.safetensors"
    save_file({"deception.direction": direction, "deception.bias": torch.tensor(-2.0),
               "deception.threshold": torch.tensor(0.9)}, str(path))
    monitor = ProbeMonitor(ProbeParams(path=str(path)))
    state = monitor.start(META)
    hidden = torch.zeros(6, 8)
    hidden[[2, 3], 3] = 10.0  # sigmoid(10 - 2) > 0.9 at positions 2 and 3 only
    base = canvas_step([3000] * 6, 0.9, vocab=vocab)
    no_hidden = monitor.on_step(state, base)
    step = DecodedStep(block=0, step=1, ids=base.ids, probs=base.probs, vocab=vocab, hidden=hidden)
    [flag] = monitor.on_step(state, step)
    assert no_hidden == [] and state.skipped_steps == 1
    assert flag.evidence[0].positions == (2, 3) and flag.attributes["label"] == "deception"
    assert monitor.on_step(state, step) == []  # once per label per request


def test_probe_file_problems_name_the_key(tmp_path):
    with pytest.raises(MonitorConfigError, match="monitors.probe.path: a safetensors file of probes is required"):
        build("probe", {}, "monitors.probe")
    path = tmp_path / "partial.safetensors"
    save_file({"x.direction": torch.ones(4)}, str(path))
    with pytest.raises(MonitorConfigError, match=r"monitors.probe.path: .* missing \['x.bias', 'x.threshold'\]"):
        build("probe", {"path": str(path)}, "monitors.probe")


def _passage_steps(vocab, replaced_at: int, count: int, *, rewritten: bool = False):
    from tests.monitors.canvas import canvas_step

    planted = vocab.encode(" the reporter said the storm closed every road north of the river tonight")[:10]
    story = vocab.encode(" once upon a time a small fox lived under the old oak")[:10]
    length = 16
    base = list(range(3000, 3000 + length))
    steps = []
    for step in range(4):
        top1 = list(base)
        accepted = [False] * length
        shown = story if step >= replaced_at else planted
        top1[2:2 + count] = shown[:count]
        if step < replaced_at or step == 3:
            accepted[2:2 + count] = [True] * count
        steps.append(canvas_step(top1, 0.9, step=step, vocab=vocab, accepted=accepted, argmax=top1))
    final_ids = steps[-1].ids_np[:, 0].tolist() if not rewritten else steps[0].ids_np[:, 0].tolist()
    return steps, FinalCanvas(tuple(final_ids), vocab.decode(final_ids), 4, 0)


def test_a_committed_passage_withdrawn_at_once_is_flagged_without_any_pattern(vocab):
    monitor = IntermediateContextMonitor(IntermediateContextParams())
    steps, final = _passage_steps(vocab, replaced_at=2, count=10)
    state = monitor.start(RequestMeta("r", "m", "", (), 16, 0))
    for step in steps:
        assert monitor.on_step(state, step) == []
    [flag] = monitor.on_finish(state, final)
    assert flag.severity.name == "INFO" and flag.evidence[0].positions == tuple(range(2, 12))
    assert flag.evidence[0].step == 2 and "reporter" in flag.evidence[0].snippet
    assert "reporter" not in flag.reason  # decoded text only in the evidence


def test_short_revisions_and_passages_that_reach_the_output_are_not_withdrawn(vocab):
    monitor = IntermediateContextMonitor(IntermediateContextParams())
    for steps, final in (_passage_steps(vocab, replaced_at=2, count=5),  # shorter than min_passage
                         _passage_steps(vocab, replaced_at=2, count=10, rewritten=True)):  # back in the output
        state = monitor.start(RequestMeta("r", "m", "", (), 16, 0))
        for step in steps:
            monitor.on_step(state, step)
        assert monitor.on_finish(state, final) == []


def test_a_withdrawn_passage_with_no_visible_text_is_not_flagged(vocab):
    space = vocab.encode("   ")[0]  # a whitespace piece: a withdrawn run of it leaves nothing a reader would miss
    base = list(range(3000, 3016))
    steps = []
    for number in range(3):
        top1 = list(base)
        top1[2:12] = [space] * 10 if number == 0 else list(range(4000, 4010))
        accepted = [1 if 2 <= i < 12 and number == 0 else 0 for i in range(16)]  # a 0/1 mask, as a client may send
        steps.append(canvas_step(top1, 0.9, step=number, vocab=vocab, accepted=accepted, argmax=top1))
    monitor = IntermediateContextMonitor(IntermediateContextParams())
    state = monitor.start(RequestMeta("r", "m", "", (), 16, 0))
    for step in steps:
        monitor.on_step(state, step)
    assert state.passages and state.passages[0][4].strip() == ""  # the run was seen withdrawn ...
    final = steps[-1].ids_np[:, 0].tolist()
    assert monitor.on_finish(state, FinalCanvas(tuple(final), vocab.decode(final), 3, 0)) == []  # ... and not flagged
