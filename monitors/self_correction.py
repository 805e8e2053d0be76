"""self_correction: a settled position that later flips to another token.

Definition (retroactive self-correction, "How Transparent is DiffusionGemma?").
Within one block, a position is *settled* once the same token has been its
top-1 for `settle_steps` consecutive steps, each with probability at least
`settle_prob`. A settled position *flips* when a different token becomes its
top-1 with probability at least `flip_prob`. Each step with flips raises one
flag whose evidence names the flipped spans, the step the old token settled,
the flip step, and the before/after text.

Stronger when the flip follows changes elsewhere on the canvas (the paper's
perfect-squares case: a wrong count, then the list written elsewhere, then the
count corrected): the flag's score rises from 0.5 to 1.0 with the number of
other positions whose top-1 changed in the `context_window` steps before the
flip, reported as the `changes_elsewhere` attribute.

Where the client sends the sampler's accepted mask (StepState.accepted), the
sampler's own decision replaces the probability test: a position is settled
while the sampler accepts it, and it flips when a token it accepted at the
previous step is replaced (the argmax canvas, StepState.argmax_ids, when sent;
else the top-1). DiffusionGemma re-decides accepted tokens every step, so an
accepted token replaced is the plain definition of a retroactive revision, and
it does not depend on how a temperature shapes the probabilities. On the real
model the answer is often revised within the first steps, before it has held
`settle_steps` steps at `settle_prob` (BENCHMARKS.md, real trajectories): with
only top-k probabilities such early revisions look like ordinary drafting.

A position can also be *held* without settling: it stands out of the drafting
crowd. At each step the crowd is the positions still drafting (top-1 below
`crowd_prob`, and not accepted where the mask is sent); a position whose top-1
is at least `hold_ratio` times the crowd's mean top-1 (and at least
`hold_prob`, above the 0.15-0.35 of a reasoning draft at 2-3 nats) holds a definite view the rest of the canvas does not, and a
later replacement of that token is a revision, reported one step later once
the old token has not come straight back (candidates trading the top spot
step by step are refinement). This is what the real model's
answer revisions look like (BENCHMARKS.md, real trajectories): in
anim_curves.json the answer positions of revised problems sit at 0.05-2 nats
while the reasoning drafts around them start at 1.2-3.9; the answer is
rewritten within the first steps, before it could settle, and the sampler
never accepted it (in gallery.json's runs without an intervention an
accepted token is replaced 0-2 times in 180-800 changes). A draft among
drafts never stands out, however confident the whole canvas is (late steps
of a real run are below 0.1 nats everywhere): the test is relative. It
counts only in the block's first `opening_steps` canvases, the model's first
view (the gallery's self-count run "says 'eight' at t=0"; clean.json's
answers are written from the first step): later, drafts that approach their
lock one by one stand out of the crowd as well, and replacing them is
drafting (on the simulated corpus, whose drafts approach that way, the rule
over every step flagged 28% of the negatives). The crowd needs at least
`min_crowd` positions; `hold_ratio = 0` turns the rule off.

Hard negatives this excludes: ordinary refinement (positions that change while
still uncertain never settled) and a settled token's probability wobbling
without another token overtaking it.

A stood-out token replaced at its block's last step, or the request's, is reported when the
block or the request ends (the canvas is final: the old token cannot come back). Other positions
count as changes elsewhere only once seen (the block's first step is no change), and a settled
position's step is the first of its confident run as seen (steps may have been dropped).

State per request: fifteen [L] arrays, reset at each new block, and the block's last step. Each
step is one compiled pass over the canvas (`_advance`); the flag and its evidence are built only
on steps with a flip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from canvaswatch.monitors.canvas_ops import contiguous_spans
from canvaswatch.monitors.compiled import kernel, sized
from canvaswatch.monitors.base import DecodedStep, Evidence, FinalCanvas, Flag, Monitor, RequestMeta, Severity


@dataclass(frozen=True)
class SelfCorrectionParams:
    settle_prob: float = 0.8
    settle_steps: int = 3
    flip_prob: float = 0.3
    context_window: int = 3
    hold_ratio: float = 2.0
    hold_prob: float = 0.4
    crowd_prob: float = 0.5
    min_crowd: int = 8
    opening_steps: int = 2
    severity: str = "warning"

    def __post_init__(self) -> None:
        for key in ("settle_prob", "flip_prob", "hold_prob", "crowd_prob"):
            value = getattr(self, key)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{key}: must be in (0, 1], got {value}")
        if self.settle_steps < 1:
            raise ValueError(f"settle_steps: must be >= 1, got {self.settle_steps}")
        if self.hold_ratio != 0 and self.hold_ratio < 1.0:
            raise ValueError(f"hold_ratio: must be 0 (off) or >= 1, got {self.hold_ratio}")
        if self.opening_steps < 0:
            raise ValueError(f"opening_steps: must be >= 0, got {self.opening_steps}")
        if self.min_crowd < 1:
            raise ValueError(f"min_crowd: must be >= 1, got {self.min_crowd}")
        if self.context_window < 0:
            raise ValueError(f"context_window: must be >= 0, got {self.context_window}")
        Severity.parse(self.severity, "severity")


@dataclass
class SelfCorrectionState:
    block: int = -1
    steps_in_block: int = 0
    previous: np.ndarray | None = None  # [L] top-1 at the last step
    run: np.ndarray | None = None  # [L] consecutive confident steps of that top-1
    run_start: np.ndarray | None = None  # [L] the step that run began at (steps may have been dropped between)
    settled: np.ndarray | None = None  # [L] bool
    settled_token: np.ndarray | None = None  # [L]
    settled_step: np.ndarray | None = None  # [L] step at which it settled
    changed_step: np.ndarray | None = None  # [L] last step its top-1 changed
    held_by: np.ndarray | None = None  # [L] HELD_* : what made the position settled
    # This step's flips: where, and the token and step each flipped position had settled at.
    flipped: np.ndarray | None = None  # [L] bool
    flipped_from: np.ndarray | None = None  # [L]
    flipped_since: np.ndarray | None = None  # [L]
    flipped_held_by: np.ndarray | None = None  # [L]
    # Stood-out tokens replaced last step, reported once this step shows the old token did not return.
    pending: np.ndarray | None = None  # [L] bool
    pending_from: np.ndarray | None = None  # [L]
    pending_since: np.ndarray | None = None  # [L]
    last: DecodedStep | None = None  # the block's last step (its token column is `previous`): pending revisions flush there


# What made a position settled (SelfCorrectionState.held_by), named in the flag's `held_by`.
HELD_NONE, HELD_SETTLED, HELD_ACCEPTED, HELD_STOOD_OUT = 0, 1, 2, 3
HELD_NAMES = {HELD_SETTLED: "settled", HELD_ACCEPTED: "accepted", HELD_STOOD_OUT: "stood_out"}


class SelfCorrectionMonitor(Monitor):
    """Retroactive self-correction: a position that held one token stably with high probability
    for several steps later flips to another."""

    name: ClassVar[str] = "self_correction"
    Params: ClassVar[type] = SelfCorrectionParams

    def __init__(self, params: SelfCorrectionParams) -> None:
        super().__init__(params)
        self.severity = Severity.parse(params.severity)

    def start(self, request: RequestMeta) -> SelfCorrectionState:
        return SelfCorrectionState()

    def on_step(self, state: SelfCorrectionState, step: DecodedStep) -> list[Flag]:
        top1, prob = step.ids_np[:, 0], step.probs_np[:, 0]
        flushed = []
        if state.block != step.block or state.previous is None or state.previous.shape != top1.shape:
            flushed = self._flush_pending(state)
            self._reset(state, step.block, top1)
        p = self.params
        # standing out counts only in the block's opening canvases (the model's first view)
        ratio = p.hold_ratio if state.steps_in_block < p.opening_steps else 0.0
        state.steps_in_block += 1
        if step.accepted is not None:
            if step.argmax_ids is not None:
                top1 = step.argmax_ids.astype(top1.dtype, copy=False)
            advance = sized(_advance_accepted, len(top1))
            flips = advance(top1, prob, step.accepted, step.step, ratio, p.hold_prob, p.crowd_prob,
                            p.min_crowd, state.previous, state.settled, state.settled_token,
                            state.settled_step, state.changed_step, state.held_by, state.flipped,
                            state.flipped_from, state.flipped_since, state.flipped_held_by)
        else:
            advance = sized(_advance, len(top1))
            flips = advance(top1, prob, step.step, p.settle_prob, p.flip_prob, p.settle_steps, ratio,
                            p.hold_prob, p.crowd_prob, p.min_crowd, state.previous, state.run, state.run_start,
                            state.settled, state.settled_token, state.settled_step, state.changed_step,
                            state.held_by, state.flipped, state.flipped_from, state.flipped_since,
                            state.flipped_held_by)
        if flips or state.pending.any():
            flips = _confirm_stand_outs(state, top1)
        state.last = step
        return flushed + ([self._flag(state, step, top1)] if flips else [])

    def on_finish(self, state: SelfCorrectionState, final: FinalCanvas) -> list[Flag]:
        return self._flush_pending(state)

    def _flush_pending(self, state: SelfCorrectionState) -> list[Flag]:
        """A stood-out token replaced at its block's last step (or the request's) cannot come back: the block's
        canvas is final, so the revision is reported at that step rather than dropped with the block's state."""
        if state.pending is None or state.last is None or not state.pending.any():
            return []
        pending = state.pending
        state.flipped_from[pending] = state.pending_from[pending]
        state.flipped_since[pending] = state.pending_since[pending]
        state.flipped_held_by[pending] = HELD_STOOD_OUT
        state.flipped = pending.copy()
        state.pending = np.zeros_like(pending)
        return [self._flag(state, state.last, state.previous)]  # the kernels leave the last step's tokens there

    def _reset(self, state: SelfCorrectionState, block: int, top1: np.ndarray) -> None:
        state.block = block
        state.steps_in_block = 0
        state.previous = np.full_like(top1, -1)
        state.run = np.zeros_like(top1)
        state.run_start = np.zeros_like(top1)
        state.settled = np.zeros(top1.shape, dtype=bool)
        state.settled_token = np.full_like(top1, -1)
        state.settled_step = np.zeros_like(top1)
        state.changed_step = np.full_like(top1, -(10**6))
        state.held_by = np.zeros(top1.shape, dtype=np.uint8)
        state.flipped_held_by = np.zeros(top1.shape, dtype=np.uint8)
        state.flipped = np.zeros(top1.shape, dtype=bool)
        state.flipped_from = np.zeros_like(top1)
        state.flipped_since = np.zeros_like(top1)
        state.pending = np.zeros(top1.shape, dtype=bool)
        state.pending_from = np.zeros_like(top1)
        state.pending_since = np.zeros_like(top1)

    def _flag(self, state: SelfCorrectionState, step: DecodedStep, token: np.ndarray) -> Flag:
        flipped = state.flipped
        positions = np.nonzero(flipped)[0].tolist()
        vocab = step.vocab
        evidence = []
        changes = []
        for span in contiguous_spans(positions):
            before = vocab.decode(state.flipped_from[span[0] : span[-1] + 1].tolist())
            after = vocab.decode(token[span[0] : span[-1] + 1].tolist())
            since = int(state.flipped_since[span[0]])
            changes.append(f"{_span_name(span)} (settled at step {since})")
            evidence.append(Evidence(step.block, step.step, tuple(span), f"{before!r} -> {after!r}"))
        held = int((step.step - state.flipped_since[flipped]).max())
        # Other positions that changed just before (and at) the flip: the context that caused it.
        recent = (state.changed_step >= step.step - self.params.context_window) & ~flipped
        elsewhere = int(recent.sum())
        score = 0.5 + 0.5 * min(1.0, elsewhere / 4)
        held_by = ",".join(sorted({HELD_NAMES[int(h)] for h in state.flipped_held_by[flipped]}))
        return self.flag(self.severity, f"block {step.block} step {step.step}: settled tokens flipped at " + "; ".join(changes),
                         *evidence, score=score, flipped_positions=len(positions), held_steps=held,
                         changes_elsewhere=elsewhere, held_by=held_by)


def _confirm_stand_outs(state: SelfCorrectionState, token: np.ndarray) -> int:
    """A stood-out token replaced is a revision once the next step shows it did not come straight back:
    two candidates trading the top spot step by step is refinement, not a change of mind. Turns this
    step's stood-out flips into pending ones and last step's pending ones into flips (unless the old
    token is back); returns the number of flips to report now."""
    flipped = state.flipped
    fresh = flipped & (state.flipped_held_by == HELD_STOOD_OUT)
    confirmed = state.pending & (token != state.pending_from) & ~flipped
    if confirmed.any():
        state.flipped_from[confirmed] = state.pending_from[confirmed]
        state.flipped_since[confirmed] = state.pending_since[confirmed]
        state.flipped_held_by[confirmed] = HELD_STOOD_OUT
    state.pending = fresh
    state.pending_from = np.where(fresh, state.flipped_from, 0)
    state.pending_since = np.where(fresh, state.flipped_since, 0)
    state.flipped = (flipped & ~fresh) | confirmed
    return int(state.flipped.sum())


def _span_name(span: list[int]) -> str:
    return f"position {span[0]}" if len(span) == 1 else f"positions {span[0]}-{span[-1]}"


@kernel
def _stand_out_level(prob, drafting, hold_ratio, hold_prob, crowd_prob, min_crowd):
    """The top-1 probability at which a position stands out of this step's drafting crowd
    (positions with `drafting` set and top-1 below crowd_prob); 2.0 (never) when the rule is off
    or the crowd has fewer than min_crowd positions."""
    if hold_ratio <= 0.0:
        return 2.0
    n = 0
    total = 0.0
    for i in range(prob.shape[0]):
        if drafting[i] and prob[i] < crowd_prob:
            n += 1
            total += prob[i]
    if n < min_crowd:
        return 2.0
    return max(hold_prob, hold_ratio * total / n)


@kernel(gil_free_twin=True)
def _advance(top1, prob, step, settle_prob, flip_prob, settle_steps, hold_ratio, hold_prob, crowd_prob, min_crowd,
             previous, run, run_start, settled, settled_token, settled_step, changed_step, held_by, flipped, flipped_from,
             flipped_since, flipped_held_by):
    """One step of every position's settle/flip state machine; returns how many settled positions flipped.

    A position is settled by `settle_steps` confident steps or by standing out of the drafting crowd
    (_stand_out_level). A flipped position records the token, step and reason it had been held
    (flipped_from, flipped_since, flipped_held_by) before it may be held again on its new token in
    this same step.
    """
    level = _stand_out_level(prob, prob < crowd_prob, hold_ratio, hold_prob, crowd_prob, min_crowd)
    flips = 0
    for i in range(top1.shape[0]):
        token = top1[i]
        p = prob[i]
        same = token == previous[i]
        if p >= settle_prob:
            if same and run[i] > 0:
                run[i] += 1
            else:
                run[i] = 1
                run_start[i] = step
        else:
            run[i] = 0
        if not same and previous[i] >= 0:  # a change, not the block's first sight of the position
            changed_step[i] = step
        flip = settled[i] and token != settled_token[i] and p >= flip_prob
        flipped[i] = flip
        if flip:
            flips += 1
            flipped_from[i] = settled_token[i]
            flipped_since[i] = settled_step[i]
            flipped_held_by[i] = held_by[i]
            settled[i] = False
        if not settled[i]:
            if run[i] >= settle_steps:
                settled[i] = True
                settled_token[i] = token
                settled_step[i] = run_start[i]  # not step - settle_steps + 1: steps may have been dropped
                held_by[i] = 1  # HELD_SETTLED
            elif p >= level:
                settled[i] = True
                settled_token[i] = token
                settled_step[i] = step
                held_by[i] = 3  # HELD_STOOD_OUT
        previous[i] = token
    return flips


@kernel(gil_free_twin=True)
def _advance_accepted(token, prob, accepted, step, hold_ratio, hold_prob, crowd_prob, min_crowd, previous, settled,
                      settled_token, settled_step, changed_step, held_by, flipped, flipped_from, flipped_since,
                      flipped_held_by):
    """One step with the sampler's accepted mask: a token held at the previous step and replaced now is a
    flip. Held: accepted by the sampler (for as long as it is accepted), or standing out of the crowd of
    positions the sampler has not accepted (until it is replaced). Returns the number of flips."""
    level = _stand_out_level(prob, accepted == 0, hold_ratio, hold_prob, crowd_prob, min_crowd)
    flips = 0
    for i in range(token.shape[0]):
        t = token[i]
        if t != previous[i] and previous[i] >= 0:  # a change, not the block's first sight of the position
            changed_step[i] = step
        flip = settled[i] and t != settled_token[i]
        flipped[i] = flip
        if flip:
            flips += 1
            flipped_from[i] = settled_token[i]
            flipped_since[i] = settled_step[i]
            flipped_held_by[i] = held_by[i]
            settled[i] = False
        if accepted[i]:
            if not settled[i]:
                settled_step[i] = step
            settled[i] = True
            settled_token[i] = t
            held_by[i] = 2  # HELD_ACCEPTED
        elif prob[i] >= level and not settled[i]:
            settled[i] = True
            settled_token[i] = t
            settled_step[i] = step
            held_by[i] = 3  # HELD_STOOD_OUT
        elif held_by[i] == 2:
            settled[i] = False
        previous[i] = t
    return flips
