"""token_smearing and sequence_smearing: split mass and shifted phrases vs confident repetition."""

from __future__ import annotations

from canvaswatch.monitors.base import RequestMeta
from canvaswatch.monitors.sequence_smearing import SequenceSmearingMonitor, SequenceSmearingParams
from canvaswatch.monitors.token_smearing import TokenSmearingMonitor, TokenSmearingParams
from tests.monitors.canvas import canvas_step

L = 12
BASE = list(range(3000, 3000 + L))
META = RequestMeta("r", "m", "", (), L, 0)


def _steps(monitor, canvases, vocab):
    state = monitor.start(META)
    flags = []
    for step, (top1, prob, alternatives) in enumerate(canvases):
        flags += monitor.on_step(state, canvas_step(top1, prob, step=step, vocab=vocab, alternatives=alternatives))
    return flags


def test_token_split_over_neighbours_for_two_steps_is_flagged(vocab):
    word = vocab.encode(" carbon")[0]
    top1 = list(BASE)
    top1[4] = word
    smeared = (top1, [0.9] * 4 + [0.45] + [0.9] * 7, {5: [(word, 0.35)]})
    [flag] = _steps(TokenSmearingMonitor(TokenSmearingParams(min_steps=2)), [smeared, smeared, smeared], vocab)
    assert flag.evidence[0].positions == (4, 5)
    assert "' carbon'" in flag.evidence[0].snippet
    assert 0.79 < flag.score < 0.81


def test_by_default_only_a_persistent_split_is_smearing(vocab):
    # Real requests split tokens between neighbours for a few early steps as a matter of course;
    # the defaults flag a split that lasts min_steps (6) steps, not one that resolves sooner.
    word = vocab.encode(" carbon")[0]
    top1 = list(BASE)
    top1[4] = word
    smeared = (top1, [0.9] * 4 + [0.45] + [0.9] * 7, {5: [(word, 0.35)]})
    resolved = (top1, 0.95, {})
    monitor = TokenSmearingMonitor(TokenSmearingParams())
    assert _steps(monitor, [smeared] * 5 + [resolved], vocab) == []
    [flag] = _steps(monitor, [smeared] * 6, vocab)
    assert flag.evidence[0].positions == (4, 5)


def test_one_step_coincidence_and_confident_repetition_are_not_smearing(vocab):
    word = vocab.encode(" very")[0]
    top1 = list(BASE)
    top1[4] = top1[5] = word
    once = (top1, [0.9] * 4 + [0.45, 0.4] + [0.9] * 6, {})
    settled = (top1, 0.95, {})
    monitor = TokenSmearingMonitor(TokenSmearingParams())
    assert _steps(monitor, [once, settled, settled, settled], vocab) == []


def test_phrase_at_two_offsets_is_flagged_with_both_copies(vocab):
    phrase = vocab.encode(" the red fox")
    top1 = list(BASE)
    top1[2:5] = phrase
    top1[5:8] = phrase
    prob = [0.9, 0.9] + [0.5] * 6 + [0.9] * 4
    [flag] = _steps(SequenceSmearingMonitor(SequenceSmearingParams()), [(top1, prob, {})] * 2, vocab)
    assert flag.attributes["shift"] == "3"
    assert flag.evidence[0].positions == (2, 3, 4, 5, 6, 7)
    assert "the red fox" in flag.evidence[0].snippet


def test_a_longer_smeared_phrase_is_one_place_not_overlapping_ones(vocab):
    phrase = vocab.encode(" the quick red fox")  # 4 tokens, min_length 3: starts 1 and 2 both hold
    assert len(phrase) == 4
    top1 = list(BASE)
    top1[1:5] = phrase
    top1[5:9] = phrase
    prob = [0.9] + [0.5] * 8 + [0.9] * 3
    [flag] = _steps(SequenceSmearingMonitor(SequenceSmearingParams()), [(top1, prob, {})] * 2, vocab)
    assert flag.attributes["places"] == "1" and flag.attributes["phrase_tokens"] == "4"
    [evidence] = flag.evidence
    assert evidence.positions == tuple(range(1, 9)) and "the quick red fox" in evidence.snippet
    assert "a phrase of 4 tokens stands at two offsets 4 apart (1 place)" in flag.reason


def test_confident_repetition_and_single_token_runs_are_not_sequence_smearing(vocab):
    phrase = vocab.encode(" step by step")
    repeated = list(BASE)
    repeated[1:4] = phrase
    repeated[5:8] = phrase  # "step by step, step by step" said on purpose and settled
    run = list(BASE)
    run[2:9] = [vocab.encode(" la")[0]] * 7  # "la la la la ..."
    monitor = SequenceSmearingMonitor(SequenceSmearingParams())
    assert _steps(monitor, [(repeated, 0.95, {})] * 3, vocab) == []
    assert _steps(monitor, [(run, 0.5, {})] * 3, vocab) == []
