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

Hard negatives this excludes: ordinary refinement (positions that change while
still uncertain never settled) and a settled token's probability wobbling
without another token overtaking it.

State per request: nine [L] arrays, reset at each new block. Each step is one compiled pass
over the canvas (`_advance`); the flag and its evidence are built only on steps with a flip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from canvaswatch.monitors.canvas_ops import contiguous_spans
from canvaswatch.monitors.compiled import kernel
from canvaswatch.monitors.base import DecodedStep, Evidence, Flag, Monitor, RequestMeta, Severity


@dataclass(frozen=True)
class SelfCorrectionParams:
    settle_prob: float = 0.8
    settle_steps: int = 3
    flip_prob: float = 0.3
    context_window: int = 3
    severity: str = "warning"

    def __post_init__(self) -> None:
        for key in ("settle_prob", "flip_prob"):
            value = getattr(self, key)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{key}: must be in (0, 1], got {value}")
        if self.settle_steps < 1:
            raise ValueError(f"settle_steps: must be >= 1, got {self.settle_steps}")
        if self.context_window < 0:
            raise ValueError(f"context_window: must be >= 0, got {self.context_window}")
        Severity.parse(self.severity)


@dataclass
class SelfCorrectionState:
    block: int = -1
    previous: np.ndarray | None = None  # [L] top-1 at the last step
    run: np.ndarray | None = None  # [L] consecutive confident steps of that top-1
    settled: np.ndarray | None = None  # [L] bool
    settled_token: np.ndarray | None = None  # [L]
    settled_step: np.ndarray | None = None  # [L] step at which it settled
    changed_step: np.ndarray | None = None  # [L] last step its top-1 changed
    # This step's flips: where, and the token and step each flipped position had settled at.
    flipped: np.ndarray | None = None  # [L] bool
    flipped_from: np.ndarray | None = None  # [L]
    flipped_since: np.ndarray | None = None  # [L]


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
        if state.block != step.block or state.previous is None or state.previous.shape != top1.shape:
            self._reset(state, step.block, top1)
        p = self.params
        if step.accepted is not None:
            if step.argmax_ids is not None:
                top1 = step.argmax_ids.astype(top1.dtype, copy=False)
            flips = _advance_accepted(top1, step.accepted, step.step, state.previous, state.settled,
                                      state.settled_token, state.settled_step, state.changed_step,
                                      state.flipped, state.flipped_from, state.flipped_since)
        else:
            flips = _advance(top1, prob, step.step, p.settle_prob, p.flip_prob, p.settle_steps, state.previous,
                             state.run, state.settled, state.settled_token, state.settled_step, state.changed_step,
                             state.flipped, state.flipped_from, state.flipped_since)
        return [self._flag(state, step, top1)] if flips else []

    def _reset(self, state: SelfCorrectionState, block: int, top1: np.ndarray) -> None:
        state.block = block
        state.previous = np.full_like(top1, -1)
        state.run = np.zeros_like(top1)
        state.settled = np.zeros(top1.shape, dtype=bool)
        state.settled_token = np.full_like(top1, -1)
        state.settled_step = np.zeros_like(top1)
        state.changed_step = np.full_like(top1, -(10**6))
        state.flipped = np.zeros(top1.shape, dtype=bool)
        state.flipped_from = np.zeros_like(top1)
        state.flipped_since = np.zeros_like(top1)

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
        return self.flag(self.severity, f"block {step.block} step {step.step}: settled tokens flipped at " + "; ".join(changes),
                         *evidence, score=score, flipped_positions=len(positions), held_steps=held,
                         changes_elsewhere=elsewhere)


def _span_name(span: list[int]) -> str:
    return f"position {span[0]}" if len(span) == 1 else f"positions {span[0]}-{span[-1]}"


@kernel
def _advance(top1, prob, step, settle_prob, flip_prob, settle_steps, previous, run, settled, settled_token,
             settled_step, changed_step, flipped, flipped_from, flipped_since):
    """One step of every position's settle/flip state machine; returns how many settled positions flipped.

    A flipped position records the token and step it had settled at (flipped_from, flipped_since)
    before it may settle again on its new token in this same step (settle_steps = 1).
    """
    flips = 0
    for i in range(top1.shape[0]):
        token = top1[i]
        p = prob[i]
        same = token == previous[i]
        if p >= settle_prob:
            run[i] = run[i] + 1 if same else 1
        else:
            run[i] = 0
        if not same:
            changed_step[i] = step
        flip = settled[i] and token != settled_token[i] and p >= flip_prob
        flipped[i] = flip
        if flip:
            flips += 1
            flipped_from[i] = settled_token[i]
            flipped_since[i] = settled_step[i]
            settled[i] = False
        if run[i] >= settle_steps and not settled[i]:
            settled[i] = True
            settled_token[i] = token
            settled_step[i] = step - settle_steps + 1
        previous[i] = token
    return flips


@kernel
def _advance_accepted(token, accepted, step, previous, settled, settled_token, settled_step, changed_step,
                      flipped, flipped_from, flipped_since):
    """One step with the sampler's accepted mask: a token accepted at the previous step and replaced now
    is a flip; a position is settled exactly while the sampler accepts it. Returns the number of flips."""
    flips = 0
    for i in range(token.shape[0]):
        t = token[i]
        if t != previous[i]:
            changed_step[i] = step
        flip = settled[i] and t != settled_token[i]
        flipped[i] = flip
        if flip:
            flips += 1
            flipped_from[i] = settled_token[i]
            flipped_since[i] = settled_step[i]
        if accepted[i]:
            if flip or not settled[i]:
                settled_step[i] = step
            settled[i] = True
            settled_token[i] = t
        else:
            settled[i] = False
        previous[i] = t
    return flips
