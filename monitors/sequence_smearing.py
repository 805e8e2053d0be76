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

Cost: `max_shift` vectorised comparisons over [L] (NumPy); state [max_shift, L].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from canvaswatch.monitors.base import DecodedStep, Evidence, FinalCanvas, Flag, RequestMeta, Severity
from canvaswatch.monitors.canvas_ops import OffsetRuns, isin_small, window_all, window_mean


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
        Severity.parse(self.severity)


class SequenceSmearingMonitor:
    name: ClassVar[str] = "sequence_smearing"
    description: ClassVar[str] = "A multi-token phrase present at two or more shifted offsets of one canvas at once."
    Params: ClassVar[type] = SequenceSmearingParams

    def __init__(self, params: SequenceSmearingParams) -> None:
        self.params = params
        self.severity = Severity.parse(params.severity)
        self._ignore = np.array(params.ignore_ids, dtype=np.int64)

    def start(self, request: RequestMeta) -> OffsetRuns:
        return OffsetRuns()  # per shift and start position: consecutive smeared steps

    def on_step(self, state: OffsetRuns, step: DecodedStep) -> list[Flag]:
        p = self.params
        top1, prob = step.ids_np[:, 0], step.probs_np[:, 0]
        L, m = step.canvas_length, p.min_length
        state.begin_step(step.block, p.max_shift, L)
        usable = (prob >= p.min_prob) & ~isin_small(top1, self._ignore)
        flags = []
        for index, shift in enumerate(range(1, p.max_shift + 1)):
            width = L - shift - m + 1
            if width <= 0:
                break
            same = (top1[:-shift] == top1[shift:]) & usable[:-shift] & usable[shift:]
            smeared = np.zeros(L, dtype=bool)
            if same.any():
                starts = window_all(same, m)[:width]
                both = (prob[:-shift] + prob[shift:]) / 2
                undecided = window_mean(both, m)[:width] < p.max_prob
                one_token = window_all(top1[1:] == top1[:-1], m - 1)[:width]
                smeared[:width] = starts & undecided & ~one_token
            fire = state.advance(index, smeared, p.min_steps)
            if fire.any():
                flags.append(self._flag(step, np.nonzero(fire)[0].tolist(), shift, (prob[:-shift] + prob[shift:]) / 2))
        return flags

    def on_finish(self, state: OffsetRuns, final: FinalCanvas) -> list[Flag]:
        return []

    def _flag(self, step: DecodedStep, starts: list[int], shift: int, both: np.ndarray) -> Flag:
        m = self.params.min_length
        evidence = []
        for start in starts:
            positions = tuple(range(start, start + m)) + tuple(range(start + shift, start + shift + m))
            evidence.append(Evidence(step.block, step.step, tuple(sorted(set(positions))),
                                     f"{step.span_text(start, start + m)!r} at +0 and +{shift}"))
        confidence = float(both[starts[0] : starts[0] + m].mean())
        return Flag(
            monitor=self.name,
            severity=self.severity,
            reason=f"block {step.block} step {step.step}: a {m}-token phrase stands at two offsets {shift} apart "
                   f"({len(starts)} place(s))",
            score=max(0.0, 1.0 - confidence),
            evidence=tuple(evidence),
            attributes={"shift": str(shift), "places": str(len(starts))},
        )

