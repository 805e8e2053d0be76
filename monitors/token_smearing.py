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

Cost: per offset, a pre-filter over [L, k] and a [C, k, k] comparison on the C
candidate positions only (NumPy: small canvases pay per-call overhead, not
per-element); state [max_distance, L].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from canvaswatch.monitors.base import DecodedStep, Evidence, FinalCanvas, Flag, RequestMeta, Severity
from canvaswatch.monitors.canvas_ops import OffsetRuns, isin_small


@dataclass(frozen=True)
class TokenSmearingParams:
    min_share: float = 0.15
    max_prob: float = 0.8
    max_distance: int = 1
    min_steps: int = 2
    ignore_ids: list[int] = field(default_factory=lambda: [0, 1])
    severity: str = "info"

    def __post_init__(self) -> None:
        if not 0.0 < self.min_share < self.max_prob <= 1.0:
            raise ValueError(f"min_share: need 0 < min_share < max_prob <= 1, got {self.min_share} and {self.max_prob}")
        if self.max_distance < 1 or self.min_steps < 1:
            raise ValueError("max_distance: must be >= 1" if self.max_distance < 1 else "min_steps: must be >= 1")
        Severity.parse(self.severity)


class TokenSmearingMonitor:
    name: ClassVar[str] = "token_smearing"
    description: ClassVar[str] = (
        "One token holding split probability at adjacent positions at once while its place is undecided."
    )
    Params: ClassVar[type] = TokenSmearingParams

    def __init__(self, params: TokenSmearingParams) -> None:
        self.params = params
        self.severity = Severity.parse(params.severity)
        self._ignore = np.array(params.ignore_ids, dtype=np.int64)

    def start(self, request: RequestMeta) -> OffsetRuns:
        return OffsetRuns()  # per distance and position: consecutive smeared steps

    def on_step(self, state: OffsetRuns, step: DecodedStep) -> list[Flag]:
        p = self.params
        L = step.canvas_length
        state.begin_step(step.block, p.max_distance, L)
        ids, probs = step.ids_np, step.probs_np
        share = (probs >= p.min_share) & (probs < p.max_prob) & ~isin_small(ids, self._ignore)
        any_share = share.any(axis=1)  # once for every offset's pre-filter
        flags = []
        for index, offset in enumerate(range(1, p.max_distance + 1)):
            if offset >= L:
                break
            smeared = np.zeros(L, dtype=bool)
            near = any_share[:-offset] & any_share[offset:]  # cheap pre-filter
            candidates = np.nonzero(near)[0]
            match = None
            if candidates.size:
                a, b = ids[:-offset][candidates], ids[offset:][candidates]
                match = (a[:, :, None] == b[:, None, :]) & share[:-offset][candidates][:, :, None] & share[offset:][candidates][:, None, :]
                smeared[candidates] = match.reshape(len(candidates), -1).any(axis=1)
            fire = state.advance(index, smeared, p.min_steps)
            if fire.any():
                starts = np.nonzero(fire)[0].tolist()
                lookup = {int(c): i for i, c in enumerate(candidates)}
                flags.append(self._flag(step, match, lookup, starts, offset))
        return flags

    def on_finish(self, state: OffsetRuns, final: FinalCanvas) -> list[Flag]:
        return []

    def _flag(self, step: DecodedStep, match: np.ndarray, lookup: dict[int, int], starts: list[int], offset: int) -> Flag:
        evidence, mass = [], 0.0
        for start in starts:
            slot_a, slot_b = (int(x) for x in np.argwhere(match[lookup[start]])[0])
            token = int(step.ids_np[start, slot_a])
            shares = (float(step.probs_np[start, slot_a]), float(step.probs_np[start + offset, slot_b]))
            mass = max(mass, sum(shares))
            evidence.append(Evidence(step.block, step.step, (start, start + offset),
                                     f"{step.vocab.piece(token)!r} at {shares[0]:.2f} / {shares[1]:.2f}"))
        return Flag(
            monitor=self.name,
            severity=self.severity,
            reason=f"block {step.block} step {step.step}: a token split across positions {offset} apart at "
                   f"{len(starts)} place(s), undecided for {self.params.min_steps}+ steps",
            score=min(1.0, mass),
            evidence=tuple(evidence),
            attributes={"pairs": str(len(starts)), "distance": str(offset)},
        )
