"""non_chronological on hand-built commit orders: answer-first and scrambled vs left-to-right."""

from __future__ import annotations

import pytest
import torch

from canvaswatch.monitors.base import FinalCanvas, RequestMeta
from canvaswatch.monitors.non_chronological import NonChronologicalMonitor, NonChronologicalParams
from tests.monitors.canvas import canvas_step

L = 20
TEXT = list(range(3000, 3000 + L))
META = RequestMeta("r", "m", "", (), L, 0)
FINAL = FinalCanvas((), "", 0, 0)


def _run(commit_steps: list[int], steps: int = 14, vocab=None, final_ids=TEXT, accepted_steps=None,
         committed_prob: float = 0.9):
    """Each position shows noise until its commit step, then its final token at `committed_prob`.
    `accepted_steps`: where given, the sampler's mask rides along, accepting each position from that step."""
    monitor = NonChronologicalMonitor(NonChronologicalParams())
    state = monitor.start(META)
    flags = []
    for step in range(steps):
        top1 = [final_ids[p] if step >= commit_steps[p] else 9000 + step * 50 + p for p in range(L)]
        prob = [committed_prob if step >= commit_steps[p] else 0.3 for p in range(L)]
        accepted = None if accepted_steps is None else [step >= accepted_steps[p] for p in range(L)]
        flags += monitor.on_step(state, canvas_step(top1, prob, step=step, vocab=vocab, accepted=accepted))
    return flags + monitor.on_finish(state, FINAL)


def test_a_canvas_that_commits_in_one_step_has_no_order_to_judge(vocab):
    # Rank correlation is undefined when every commit step is the same; it is not evidence of disorder.
    assert _run([3] * L, vocab=vocab) == []


def test_with_the_samplers_mask_commit_order_is_the_samplers_not_the_probabilities(vocab):
    # Probabilities under a hot temperature may stay below settle_prob after the sampler accepted a
    # position; the mask still gives the commit order.
    commits = [4 + p // 2 for p in range(16)] + [1, 1, 2, 2]
    [flag] = _run(commits, vocab=vocab, accepted_steps=commits, committed_prob=0.45)
    assert flag.evidence[0].positions == (16, 17, 18, 19)
    assert _run(commits, vocab=vocab, committed_prob=0.45) == []  # without the mask nothing looks committed
    left_to_right = [1 + p // 2 for p in range(L)]
    assert _run(commits, vocab=vocab, accepted_steps=left_to_right) == []  # the sampler's order wins


def test_answer_committed_before_its_reasons_is_flagged(vocab):
    commits = [4 + p // 2 for p in range(16)] + [1, 1, 2, 2]  # the last 4 positions settle first
    [flag] = _run(commits, vocab=vocab)
    assert float(flag.attributes["lead_steps"]) >= 3
    assert flag.evidence[0].positions == (16, 17, 18, 19)
    assert flag.score > 0.4


def test_left_to_right_with_jitter_is_not_flagged(vocab):
    generator = torch.Generator().manual_seed(0)
    commits = [1 + p // 2 + int(torch.randint(0, 2, (1,), generator=generator)) for p in range(L)]
    assert _run(commits, vocab=vocab) == []


def test_padding_that_settles_first_is_ignored(vocab):
    # The text settles left to right; the trailing padding (id 0) settles at step 1, as models do.
    final_ids = TEXT[:14] + [0] * 6
    commits = [2 + p // 2 for p in range(14)] + [1] * 6
    assert _run(commits, vocab=vocab, final_ids=final_ids) == []


def test_a_position_that_wavers_commits_at_its_last_settling(vocab):
    monitor = NonChronologicalMonitor(NonChronologicalParams(min_positions=3))
    state = monitor.start(META)
    for step in range(6):
        prob = [0.9] * L
        if step == 3:
            prob[0] = 0.2  # position 0 loses confidence once
        monitor.on_step(state, canvas_step(TEXT, prob, step=step, vocab=vocab))
    assert int(state.commit[0]) == 4 and int(state.commit[1]) == 0


def test_the_reason_says_before_or_after_in_words():
    from canvaswatch.monitors.non_chronological import _lead_text

    assert _lead_text(4.0) == "4 steps before the rest"
    assert _lead_text(1.0) == "1 step before the rest"
    assert _lead_text(-5.0) == "5 steps after the rest"  # flagged by rho alone: the end came later
    assert _lead_text(0.0) == "at the same median step as the rest"


def test_a_flag_raised_by_the_lead_alone_is_scored_by_the_lead(vocab):
    # The opening commits first, the body at step 10, and the answer at the end at step 6: 4 steps
    # ahead of the text before it. The rank correlation stays above min_rank_corr; the lead fires.
    commits = [1] * 6 + [10] * 10 + [6] * 4
    [flag] = _run(commits, steps=12, vocab=vocab)
    rho, lead = float(flag.attributes["rank_correlation"]), float(flag.attributes["lead_steps"])
    assert rho >= NonChronologicalParams().min_rank_corr and lead == 4
    assert flag.score == pytest.approx(lead / (10 - 1))  # commit steps span 1..10
    assert flag.score > (1 - rho) / 2
