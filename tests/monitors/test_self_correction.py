"""self_correction: settled-then-flipped positions, and the refinements that are not it."""

from __future__ import annotations

import pytest

from canvaswatch.monitors.base import FinalCanvas, RequestMeta
from canvaswatch.monitors.self_correction import SelfCorrectionMonitor, SelfCorrectionParams
from tests.monitors.canvas import canvas_step

META = RequestMeta("r", "m", "", (), 8, 0)
BASE = [3000, 3001, 3002, 3003, 3004, 3005, 3006, 3007]


def _run(monitor, canvases, block_of=lambda step: 0, vocab=None):
    state = monitor.start(META)
    flags = []
    for step, (top1, prob) in enumerate(canvases):
        flags.extend(monitor.on_step(state, canvas_step(top1, prob, step=step, block=block_of(step), vocab=vocab)))
    return flags


def _with(position: int, token: int) -> list[int]:
    canvas = list(BASE)
    canvas[position] = token
    return canvas


def test_settled_position_that_flips_is_flagged_with_before_after_and_steps(vocab):
    seven, eight = vocab.encode("7")[0], vocab.encode("8")[0]
    canvases = [(_with(5, seven), 0.95)] * 5 + [(_with(5, eight), 0.9)] * 2
    flags = _run(SelfCorrectionMonitor(SelfCorrectionParams()), canvases, vocab=vocab)
    assert len(flags) == 1
    flag = flags[0]
    assert flag.evidence[0].positions == (5,)
    assert flag.evidence[0].step == 5
    assert flag.evidence[0].snippet == "'7' -> '8'"
    assert "settled at step 0" in flag.reason
    assert flag.attributes["held_steps"] == "5"


def test_refinement_of_unsettled_positions_is_not_a_correction(vocab):
    # The token changes every step, but never with enough probability for long enough to be settled.
    canvases = [(_with(2, 4000 + step), 0.95 if step % 2 else 0.5) for step in range(10)]
    assert _run(SelfCorrectionMonitor(SelfCorrectionParams()), canvases, vocab=vocab) == []


def test_too_short_a_hold_is_not_settled(vocab):
    canvases = [(_with(1, 4100), 0.95)] * 2 + [(_with(1, 4200), 0.95)] * 3
    assert _run(SelfCorrectionMonitor(SelfCorrectionParams(settle_steps=3)), canvases, vocab=vocab) == []


def test_probability_wobble_without_a_new_winner_is_not_a_flip(vocab):
    # Settled, then the same token dips below the threshold and recovers: no other token overtook it.
    canvases = [(BASE, 0.95)] * 4 + [(BASE, 0.4)] * 2 + [(BASE, 0.95)] * 2
    assert _run(SelfCorrectionMonitor(SelfCorrectionParams()), canvases, vocab=vocab) == []


def test_a_low_probability_newcomer_does_not_count_as_a_flip(vocab):
    canvases = [(BASE, 0.95)] * 4 + [(_with(3, 4300), [0.95, 0.95, 0.95, 0.2, 0.95, 0.95, 0.95, 0.95])]
    assert _run(SelfCorrectionMonitor(SelfCorrectionParams(flip_prob=0.3)), canvases, vocab=vocab) == []


def test_a_new_block_starts_fresh(vocab):
    # Block 0 settles BASE; block 1 is a different canvas: its first tokens are not flips.
    canvases = [(BASE, 0.95)] * 4 + [(_with(0, 4400), 0.95)] * 3
    flags = _run(SelfCorrectionMonitor(SelfCorrectionParams()), canvases, block_of=lambda s: 0 if s < 4 else 1, vocab=vocab)
    assert flags == []


def test_several_flips_in_one_step_are_grouped_into_spans(vocab):
    flipped = list(BASE)
    flipped[1], flipped[2], flipped[6] = 4501, 4502, 4506
    canvases = [(BASE, 0.95)] * 3 + [(flipped, 0.9)]
    flags = _run(SelfCorrectionMonitor(SelfCorrectionParams()), canvases, vocab=vocab)
    assert len(flags) == 1
    assert [e.positions for e in flags[0].evidence] == [(1, 2), (6,)]
    assert flags[0].attributes["flipped_positions"] == "3"


def _run_signals(monitor, steps, vocab):
    """steps: (top1, prob, accepted) per step; the sampler's mask rides with each."""
    state = monitor.start(META)
    flags = []
    for step, (top1, prob, accepted) in enumerate(steps):
        flags.extend(monitor.on_step(state, canvas_step(top1, prob, step=step, vocab=vocab, accepted=accepted,
                                                        argmax=top1)))
    return flags


def test_with_the_samplers_mask_an_accepted_token_replaced_is_a_revision_at_any_probability(vocab):
    # The real model revises answers within the first steps, at probabilities far below settle_prob:
    # the sampler's own acceptance is what makes the first answer a commitment.
    eight, seven = vocab.encode(" eight")[0], vocab.encode(" seven")[0]
    accepted_at_5 = [i == 5 for i in range(8)]
    steps = [(_with(5, eight), 0.3, accepted_at_5), (_with(5, seven), 0.35, accepted_at_5)]
    [flag] = _run_signals(SelfCorrectionMonitor(SelfCorrectionParams()), steps, vocab)
    assert flag.evidence[0].positions == (5,) and flag.evidence[0].snippet == "' eight' -> ' seven'"
    assert "settled at step 0" in flag.reason


def test_with_the_samplers_mask_drafting_that_was_never_accepted_is_not_a_revision(vocab):
    # Confident, stable for many steps, then changed: by probabilities a settled flip, but the sampler
    # never accepted it, so it was a draft (and the mask is what the client says the sampler did).
    eight, seven = vocab.encode(" eight")[0], vocab.encode(" seven")[0]
    nothing = [False] * 8
    steps = [(_with(5, eight), 0.95, nothing)] * 5 + [(_with(5, seven), 0.95, [i == 5 for i in range(8)])] * 2
    assert _run_signals(SelfCorrectionMonitor(SelfCorrectionParams()), steps, vocab) == []
    # ... and a token accepted, then released by the sampler with the same token, then changed is not one either
    released = [(_with(5, eight), 0.9, [i == 5 for i in range(8)]), (_with(5, eight), 0.5, nothing),
                (_with(5, seven), 0.9, nothing)]
    assert _run_signals(SelfCorrectionMonitor(SelfCorrectionParams()), released, vocab) == []


# --- standing out of the drafting crowd (the real model's answer revisions: never accepted, never settled)

WIDE = [3100 + i for i in range(16)]


def _drafting(step: int) -> list[int]:
    """A canvas of drafts: every position but 0 changes its token every step."""
    return [WIDE[0]] + [4000 + 16 * step + i for i in range(1, 16)]


def _answer_revision(first: int, second: int, answer_prob: float, draft_prob: float = 0.2):
    """Position 0 shows `first` for two steps and then `second`, at `answer_prob`, among drafts at `draft_prob`."""
    probs = [answer_prob] + [draft_prob] * 15
    steps = []
    for step in range(4):
        canvas = _drafting(step)
        canvas[0] = first if step < 2 else second
        steps.append((canvas, probs))
    return steps


def test_an_answer_held_well_above_the_drafting_crowd_and_rewritten_is_a_revision(vocab):
    # Real answers are rewritten within the first steps at 0.5-2 nats among drafts at 2-4: never settled.
    eight, seven = vocab.encode(" eight")[0], vocab.encode(" seven")[0]
    flags = _run(SelfCorrectionMonitor(SelfCorrectionParams()), _answer_revision(eight, seven, 0.6), vocab=vocab)
    [flag] = [f for f in flags if 0 in f.evidence[0].positions]
    assert flag.evidence[0].snippet == "' eight' -> ' seven'"
    assert flag.attributes["held_by"] == "stood_out"
    # the drafts themselves (at the crowd's level, changing every step) are never revisions
    assert all(e.positions == (0,) for f in flags for e in f.evidence)


def test_standing_out_is_relative_to_the_crowd_and_needs_a_crowd(vocab):
    eight, seven = vocab.encode(" eight")[0], vocab.encode(" seven")[0]
    # as unsure as the drafts around it (0.35 among 0.2: under twice the crowd): drafting, not a revision
    assert _run(SelfCorrectionMonitor(SelfCorrectionParams()), _answer_revision(eight, seven, 0.35), vocab=vocab) == []
    # the same answer among drafts that are all as sure as it: no crowd to stand out of
    assert _run(SelfCorrectionMonitor(SelfCorrectionParams()),
                _answer_revision(eight, seven, 0.6, draft_prob=0.6), vocab=vocab) == []
    # the rule turned off
    assert _run(SelfCorrectionMonitor(SelfCorrectionParams(hold_ratio=0)),
                _answer_revision(eight, seven, 0.6), vocab=vocab) == []
    # a crowd smaller than min_crowd
    assert _run(SelfCorrectionMonitor(SelfCorrectionParams(min_crowd=16)),
                _answer_revision(eight, seven, 0.6), vocab=vocab) == []


def test_standing_out_counts_only_in_the_opening_canvases(vocab):
    # A draft that firms up later, approaching its lock, and is then replaced is drafting: the same
    # stand-out two steps into the block is not held (opening_steps = 2 counts steps 0 and 1).
    eight, seven = vocab.encode(" eight")[0], vocab.encode(" seven")[0]
    late = [(_drafting(0), [0.2] * 16), (_drafting(1), [0.2] * 16)]
    for step, (canvas, probs) in enumerate(_answer_revision(eight, seven, 0.6)):
        late.append(([canvas[0]] + _drafting(step + 2)[1:], probs))
    assert _run(SelfCorrectionMonitor(SelfCorrectionParams()), late, vocab=vocab) == []
    assert _run(SelfCorrectionMonitor(SelfCorrectionParams(opening_steps=4)), late, vocab=vocab) != []


def test_with_the_mask_the_crowd_is_what_the_sampler_has_not_accepted(vocab):
    eight, seven = vocab.encode(" eight")[0], vocab.encode(" seven")[0]
    nothing = [False] * 16
    steps = [(canvas, probs, nothing) for canvas, probs in _answer_revision(eight, seven, 0.6)]
    flags = _run_signals(SelfCorrectionMonitor(SelfCorrectionParams()), steps, vocab)
    assert [f.attributes["held_by"] for f in flags] == ["stood_out"]
    # every draft accepted (none left drafting): position 0 stands out of nothing, and accepted drafts that
    # change are revisions of their own (held_by=accepted), never of position 0's stand-out
    all_but_0 = [False] + [True] * 15
    steps = [(canvas, probs, all_but_0) for canvas, probs in _answer_revision(eight, seven, 0.6)]
    flags = _run_signals(SelfCorrectionMonitor(SelfCorrectionParams()), steps, vocab)
    assert flags and all(0 not in e.positions for f in flags for e in f.evidence)
    assert {f.attributes["held_by"] for f in flags} == {"accepted"}


def test_stand_out_parameters_are_validated():
    with pytest.raises(ValueError, match="hold_ratio"):
        SelfCorrectionParams(hold_ratio=0.5)
    with pytest.raises(ValueError, match="min_crowd"):
        SelfCorrectionParams(min_crowd=0)
    with pytest.raises(ValueError, match="opening_steps"):
        SelfCorrectionParams(opening_steps=-1)
    with pytest.raises(ValueError, match="crowd_prob"):
        SelfCorrectionParams(crowd_prob=1.5)


def test_two_candidates_trading_the_top_spot_is_refinement_not_a_revision(vocab):
    # The simulated corpus's hard negative: right token and a rival alternate at 0.55 (stood out of a
    # drafting crowd at 0.2). The flip is reported only once the old token did not come straight back.
    eight, seven = vocab.encode(" eight")[0], vocab.encode(" seven")[0]
    probs = [0.55] + [0.2] * 15
    wobble = []
    for step in range(6):
        canvas = _drafting(step)
        canvas[0] = eight if step % 2 == 0 else seven
        wobble.append((canvas, probs))
    assert _run(SelfCorrectionMonitor(SelfCorrectionParams()), wobble, vocab=vocab) == []
    # ... while a change that stays is reported one step later, naming the token it replaced
    stays = wobble[:1] + [(_drafting(step)[:0] + [seven] + _drafting(step)[1:], probs) for step in range(1, 4)]
    [flag] = _run(SelfCorrectionMonitor(SelfCorrectionParams()), stays, vocab=vocab)
    assert flag.evidence[0].snippet == "' eight' -> ' seven'" and flag.evidence[0].step == 2


# --- what the block's edges and dropped steps must not distort


def test_a_flip_early_in_a_block_counts_only_real_changes_elsewhere(vocab):
    # the block's first step shows every position for the first time: that is no change elsewhere
    canvases = [(BASE, 0.9)] * 3 + [(_with(0, 3999), 0.9)]
    [flag] = _run(SelfCorrectionMonitor(SelfCorrectionParams()), canvases, vocab=vocab)
    assert flag.attributes["changes_elsewhere"] == "0" and flag.score == 0.5


def test_a_stand_out_replaced_at_the_blocks_last_step_is_reported_when_the_block_ends(vocab):
    eight, seven = vocab.encode(" eight")[0], vocab.encode(" seven")[0]
    steps = _answer_revision(eight, seven, 0.6)[:3]  # replaced at step 2, the block's last step
    monitor = SelfCorrectionMonitor(SelfCorrectionParams())
    state = monitor.start(META)
    flags = [f for number, (canvas, probs) in enumerate(steps)
             for f in monitor.on_step(state, canvas_step(canvas, probs, step=number, vocab=vocab))]
    assert flags == []  # waiting one step to see whether the old token comes back
    [flag] = monitor.on_step(state, canvas_step(_drafting(0), 0.2, block=1, step=0, vocab=vocab))
    assert (flag.evidence[0].block, flag.evidence[0].step) == (0, 2) and flag.evidence[0].snippet == "' eight' -> ' seven'"
    # the same at the request's end
    state = monitor.start(META)
    for number, (canvas, probs) in enumerate(steps):
        monitor.on_step(state, canvas_step(canvas, probs, step=number, vocab=vocab))
    [flag] = monitor.on_finish(state, FinalCanvas((), "", 3, 0))
    assert flag.attributes["held_by"] == "stood_out"


def test_the_settled_step_is_one_that_was_seen_when_steps_were_dropped(vocab):
    monitor = SelfCorrectionMonitor(SelfCorrectionParams())
    state = monitor.start(META)
    flags = []
    for number, canvas in ((0, BASE), (10, BASE), (20, BASE), (30, _with(5, 3999))):  # steps 1-9, 11-19, ... dropped
        flags += monitor.on_step(state, canvas_step(canvas, 0.9, step=number, vocab=vocab))
    [flag] = flags
    assert "settled at step 0" in flag.reason and flag.attributes["held_steps"] == "30"
