"""token_smearing: one token's probability split over adjacent positions while its place is undecided.

Definition. At a step, positions p and p + o (1 <= o <= `max_distance`) are
smeared on token t when t is among the kept tokens of both, with probability
in [`min_share`, `max_prob`) at each (present at both, confident at neither),
and t is not in `ignore_ids`. A flag is raised when the same pair stays
smeared for `min_steps` consecutive steps; each position pair is flagged at
most once per block. Score: the token's combined mass at the two positions.

Hard negatives it excludes: a word legitimately repeated next to itself and
settled ("very very", both >= max_prob); one-step coincidences of noise
tokens (persistence).

Cost: one compiled pass per step (`_smear_pairs`): the shares over [L, k], then
per offset a k x k comparison at positions where both ends hold a share (most
positions hold none); state [max_distance, L].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from canvaswatch.monitors.base import DecodedStep, Evidence, Flag, Monitor, RequestMeta, Severity
from canvaswatch.monitors.canvas_ops import OffsetRuns, sorted_members
from canvaswatch.monitors.compiled import kernel, sized


@dataclass(frozen=True)
class TokenSmearingParams:
    # On the real model a token split between neighbours for a few steps is ordinary early
    # indecision: at 0.15 / 2 steps this monitor flags 94-100% of ordinary real requests (the
    # real captures, imported by either probability rule); at 0.25 / 6 steps 0-6% of them, and
    # still every simulated smearing case (BENCHMARKS.md has the measurements).
    min_share: float = 0.25
    max_prob: float = 0.8
    max_distance: int = 1
    min_steps: int = 6
    ignore_ids: list[int] = field(default_factory=lambda: [0, 1])
    severity: str = "info"

    def __post_init__(self) -> None:
        if not 0.0 < self.min_share < self.max_prob <= 1.0:
            raise ValueError(f"min_share: need 0 < min_share < max_prob <= 1, got {self.min_share} and {self.max_prob}")
        if self.max_distance < 1 or self.min_steps < 1:
            raise ValueError("max_distance: must be >= 1" if self.max_distance < 1 else "min_steps: must be >= 1")
        Severity.parse(self.severity, "severity")


class TokenSmearingMonitor(Monitor):
    """One token holding split probability at adjacent positions at once while its place is undecided."""

    name: ClassVar[str] = "token_smearing"
    Params: ClassVar[type] = TokenSmearingParams

    def __init__(self, params: TokenSmearingParams) -> None:
        super().__init__(params)
        self.severity = Severity.parse(params.severity)
        self._ignore = sorted_members(params.ignore_ids)

    def start(self, request: RequestMeta) -> OffsetRuns:
        return OffsetRuns()  # per distance and position: consecutive smeared steps

    def on_step(self, state: OffsetRuns, step: DecodedStep) -> list[Flag]:
        p = self.params
        state.begin_step(step.block, p.max_distance, step.canvas_length)
        # slots[o, i]: the kept slots (at i, at i + o + 1) of the first shared token found, for evidence
        slots = np.empty((p.max_distance, step.canvas_length, 2), dtype=np.int64)
        sized(_smear_pairs, step.canvas_length)(step.ids_np, step.probs_np, self._ignore, p.min_share, p.max_prob, state.holds, slots)
        fires = state.advance(p.min_steps)
        if not fires:
            return []
        return [self._flag(step, slots[index], np.nonzero(row)[0].tolist(), index + 1)
                for index, row in enumerate(state.fire) if row.any()]

    def _flag(self, step: DecodedStep, slots: np.ndarray, starts: list[int], offset: int) -> Flag:
        evidence, mass = [], 0.0
        for start in starts:
            slot_a, slot_b = (int(x) for x in slots[start])
            token = int(step.ids_np[start, slot_a])
            shares = (float(step.probs_np[start, slot_a]), float(step.probs_np[start + offset, slot_b]))
            mass = max(mass, sum(shares))
            evidence.append(Evidence(step.block, step.step, (start, start + offset),
                                     f"{step.vocab.piece(token)!r} at {shares[0]:.2f} / {shares[1]:.2f}"))
        return self.flag(
            self.severity,
            f"block {step.block} step {step.step}: a token split across positions {offset} apart at "
            f"{len(starts)} place(s), undecided for {self.params.min_steps}+ steps",
            *evidence, score=min(1.0, mass), pairs=len(starts), distance=offset,
        )


@kernel(gil_free_twin=True)
def _smear_pairs(ids, probs, ignore, min_share, max_prob, holds, slots):
    """holds[o, i]: positions i and i + o + 1 share a kept token at this step (its slots into `slots`)."""
    length, k = ids.shape
    share = np.zeros((length, k), dtype=np.bool_)
    any_share = np.zeros(length, dtype=np.bool_)
    for i in range(length):
        for a in range(k):
            p = probs[i, a]
            if p >= min_share and p < max_prob:
                # ignore_ids (sorted) searched only for the few kept tokens in the share range
                at = np.searchsorted(ignore, ids[i, a])
                if not (at < ignore.shape[0] and ignore[at] == ids[i, a]):
                    share[i, a] = True
                    any_share[i] = True
    holds[:] = False
    for row in range(holds.shape[0]):
        offset = row + 1
        for i in range(length - offset):
            if not (any_share[i] and any_share[i + offset]):
                continue
            # the first (slot at i, slot at i + offset) pair in slot order holding one token
            for a in range(k):
                if share[i, a]:
                    for b in range(k):
                        if share[i + offset, b] and ids[i, a] == ids[i + offset, b]:
                            holds[row, i] = True
                            slots[row, i, 0] = a
                            slots[row, i, 1] = b
                            break
                    if holds[row, i]:
                        break
