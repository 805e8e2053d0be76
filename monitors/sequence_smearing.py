"""sequence_smearing: a whole phrase present at two shifted offsets of the same canvas at once.

Definition. At a step, a phrase of at least `min_length` tokens is smeared at
shift s (1 <= s <= `max_shift`) when the top-1 tokens at positions q..q+m-1
equal those at q+s..q+s+m-1, each with probability >= `min_prob`, the phrase
is not one token repeated, none of its tokens is in `ignore_ids`, and the two
copies are not both confident (mean top-1 probability over both copies below
`max_prob`: the model has not decided which offset the phrase belongs at). A
flag is raised when the same (q, s) stays smeared for `min_steps` consecutive
steps, once per (q, s) per block. Score: 1 - mean probability of the copies.

Hard negatives it excludes: text that repeats a phrase on purpose and settles
it confidently ("step by step, step by step"); runs of one repeated token.

Cost: one compiled pass per step (`_smear_phrases`), `max_shift` comparisons per position that
stop at the first unequal token; state [max_shift, L].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from canvaswatch.monitors.base import DecodedStep, Evidence, Flag, Monitor, RequestMeta, Severity
from canvaswatch.monitors.canvas_ops import OffsetRuns, contiguous_spans, sorted_members
from canvaswatch.monitors.compiled import kernel, sized


@dataclass(frozen=True)
class SequenceSmearingParams:
    min_length: int = 3
    max_shift: int = 4
    min_prob: float = 0.3
    max_prob: float = 0.8
    min_steps: int = 2
    ignore_ids: list[int] = field(default_factory=lambda: [0, 1])
    severity: str = "info"

    def __post_init__(self) -> None:
        if self.min_length < 2 or self.max_shift < 1 or self.min_steps < 1:
            raise ValueError("min_length: must be >= 2 (and max_shift, min_steps >= 1)")
        if not 0.0 < self.min_prob < self.max_prob <= 1.0:
            raise ValueError(f"min_prob: need 0 < min_prob < max_prob <= 1, got {self.min_prob} and {self.max_prob}")
        Severity.parse(self.severity, "severity")


class SequenceSmearingMonitor(Monitor):
    """A multi-token phrase present at two or more shifted offsets of one canvas at once."""

    name: ClassVar[str] = "sequence_smearing"
    Params: ClassVar[type] = SequenceSmearingParams

    def __init__(self, params: SequenceSmearingParams) -> None:
        super().__init__(params)
        self.severity = Severity.parse(params.severity)
        self._ignore = sorted_members(params.ignore_ids)

    def start(self, request: RequestMeta) -> OffsetRuns:
        return OffsetRuns()  # per shift and start position: consecutive smeared steps

    def on_step(self, state: OffsetRuns, step: DecodedStep) -> list[Flag]:
        p = self.params
        top1, prob = step.ids_np[:, 0], step.probs_np[:, 0]
        state.begin_step(step.block, p.max_shift, step.canvas_length)
        sized(_smear_phrases, len(top1))(top1, prob, self._ignore, p.min_prob, p.max_prob, p.min_length, state.holds)
        fires = state.advance(p.min_steps)
        if not fires:
            return []
        return [self._flag(step, np.nonzero(row)[0].tolist(), index + 1, (prob[: -index - 1] + prob[index + 1 :]) / 2)
                for index, row in enumerate(state.fire) if row.any()]

    def _flag(self, step: DecodedStep, starts: list[int], shift: int, both: np.ndarray) -> Flag:
        # consecutive starts are one longer phrase (a 4-token phrase is two overlapping 3-token ones): one place
        m = self.params.min_length
        places = [(run[0], run[-1] + m) for run in contiguous_spans(starts)]
        evidence = []
        for first, stop in places:
            positions = tuple(range(first, stop)) + tuple(range(first + shift, stop + shift))
            evidence.append(Evidence(step.block, step.step, tuple(sorted(set(positions))),
                                     f"{step.span_text(first, stop)!r} at +0 and +{shift}"))
        first, stop = places[0]
        confidence = float(both[first:stop].mean())
        longest = max(stop - first for first, stop in places)
        return self.flag(
            self.severity,
            f"block {step.block} step {step.step}: a phrase of {longest} tokens stands at two offsets {shift} apart "
            f"({len(places)} place{'s' if len(places) != 1 else ''})",
            *evidence, score=max(0.0, 1.0 - confidence), shift=shift, places=len(places), phrase_tokens=longest,
        )


@kernel(gil_free_twin=True)
def _smear_phrases(top1, prob, ignore, min_prob, max_prob, min_length, holds):
    """holds[s - 1, q]: the phrase at q..q+m-1 stands again at shift s, undecided, not one token repeated."""
    length = top1.shape[0]
    usable = np.zeros(length, dtype=np.bool_)
    for i in range(length):
        if prob[i] >= min_prob:
            at = np.searchsorted(ignore, top1[i])  # ignore_ids, sorted
            usable[i] = not (at < ignore.shape[0] and ignore[at] == top1[i])
    holds[:] = False
    for row in range(holds.shape[0]):
        shift = row + 1
        # starts whose two copies both fit on the canvas (none once the shift is too long)
        for start in range(length - shift - min_length + 1):
            total = 0.0
            one_token = True
            same = True
            for t in range(min_length):
                a = start + t
                b = a + shift
                if not (top1[a] == top1[b] and usable[a] and usable[b]):
                    same = False
                    break
                total += (prob[a] + prob[b]) / 2
                if t > 0 and top1[a] != top1[a - 1]:
                    one_token = False
            holds[row, start] = same and not one_token and total / min_length < max_prob
