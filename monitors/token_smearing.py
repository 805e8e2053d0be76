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

Cost: one [L - o, k, k] comparison per offset; state [max_distance, L].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from canvaswatch.monitors.base import DecodedStep, Evidence, FinalCanvas, Flag, RequestMeta, Severity
from canvaswatch.monitors.canvas_ops import isin


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


@dataclass
class SmearState:
    block: int = -1
    run: torch.Tensor | None = None  # [max_distance, L] consecutive smeared steps
    flagged: torch.Tensor | None = None  # [max_distance, L]


class TokenSmearingMonitor:
    name: ClassVar[str] = "token_smearing"
    description: ClassVar[str] = (
        "One token holding split probability at adjacent positions at once while its place is undecided."
    )
    Params: ClassVar[type] = TokenSmearingParams

    def __init__(self, params: TokenSmearingParams) -> None:
        self.params = params
        self.severity = Severity.parse(params.severity)
        self._ignore = torch.tensor(params.ignore_ids, dtype=torch.long)

    def start(self, request: RequestMeta) -> SmearState:
        return SmearState()

    def on_step(self, state: SmearState, step: DecodedStep) -> list[Flag]:
        p = self.params
        L = step.canvas_length
        if state.block != step.block or state.run is None or state.run.shape[1] != L:
            state.block = step.block
            state.run = torch.zeros(p.max_distance, L, dtype=torch.long)
            state.flagged = torch.zeros(p.max_distance, L, dtype=torch.bool)
        share = (step.probs >= p.min_share) & (step.probs < p.max_prob) & ~isin(step.ids, self._ignore)
        flags = []
        for index, offset in enumerate(range(1, p.max_distance + 1)):
            if offset >= L:
                break
            a_ids, b_ids = step.ids[:-offset], step.ids[offset:]
            match = (a_ids.unsqueeze(2) == b_ids.unsqueeze(1)) & share[:-offset].unsqueeze(2) & share[offset:].unsqueeze(1)
            smeared = torch.zeros(L, dtype=torch.bool)
            smeared[: L - offset] = match.flatten(1).any(dim=1)
            state.run[index] = torch.where(smeared, state.run[index] + 1, 0)
            fire = (state.run[index] >= p.min_steps) & ~state.flagged[index]
            if bool(fire.any()):
                state.flagged[index] |= fire
                flags.append(self._flag(step, match, fire.nonzero().flatten().tolist(), offset))
        return flags

    def on_finish(self, state: SmearState, final: FinalCanvas) -> list[Flag]:
        return []

    def _flag(self, step: DecodedStep, match: torch.Tensor, starts: list[int], offset: int) -> Flag:
        evidence, mass = [], 0.0
        for start in starts:
            slot_a, slot_b = (int(x) for x in match[start].nonzero()[0])
            token = int(step.ids[start, slot_a])
            shares = (float(step.probs[start, slot_a]), float(step.probs[start + offset, slot_b]))
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
