"""transparency: is the bottleneck view of this request faithful?

Two gauges, each flagged past its threshold:
- residual mass: the probability outside the kept tokens (exact for the dense
  forms; 1 - sum of the sent probabilities for top-k, which the wire contract
  normalises over the full vocabulary). Judged per block on the mean residual
  of its last `window` steps, when positions should have settled: flagged when
  above `max_residual`. Early steps are noisy by nature and are not judged.
- step coverage: the longest run of consecutive denoising steps that never
  reached the monitors (dropped by the client, or a gap in the step numbers),
  reported as an opaque-depth multiplier: 1 + that run (1 = every step seen).
  Flagged when above `max_opaque_depth`.

State per request: a few numbers and the last `window` residual means.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import ClassVar

from canvaswatch.monitors.base import DecodedStep, Evidence, FinalCanvas, Flag, Monitor, RequestMeta, Severity


@dataclass(frozen=True)
class TransparencyParams:
    max_residual: float = 0.5
    window: int = 4
    max_opaque_depth: int = 4
    severity: str = "warning"

    def __post_init__(self) -> None:
        if not 0.0 < self.max_residual <= 1.0:
            raise ValueError(f"max_residual: must be in (0, 1], got {self.max_residual}")
        if self.window < 1 or self.max_opaque_depth < 1:
            raise ValueError("window: must be >= 1" if self.window < 1 else "max_opaque_depth: must be >= 1")
        Severity.parse(self.severity, "severity")


@dataclass
class TransparencyState:
    total_steps: int = 0
    block: int = -1
    last_step: int = -1
    longest_gap: int = 0
    gap_at: tuple[int, int] = (0, 0)
    recent: collections.deque = field(default_factory=collections.deque)
    worst_residual: tuple[float, int, int] = (0.0, -1, -1)  # mean residual, its block, that block's last step seen


class TransparencyMonitor(Monitor):
    """Residual probability mass outside the kept tokens, and the longest run of denoising steps no monitor
    saw (opaque-depth multiplier, 1 = every step seen)."""

    name: ClassVar[str] = "transparency"
    Params: ClassVar[type] = TransparencyParams

    def __init__(self, params: TransparencyParams) -> None:
        super().__init__(params)
        self.severity = Severity.parse(params.severity)

    def start(self, request: RequestMeta) -> TransparencyState:
        return TransparencyState(total_steps=request.total_steps, recent=collections.deque(maxlen=self.params.window))

    def on_step(self, state: TransparencyState, step: DecodedStep) -> list[Flag]:
        if step.block != state.block:
            self._close_block(state)
            skipped = step.block - state.block - 1 if state.block >= 0 else step.block
            if state.total_steps and skipped > 0:  # whole blocks no step of which arrived: unseen steps too
                gap = skipped * state.total_steps  # at least: the tails and heads beside them are counted apart
                if gap > state.longest_gap:
                    state.longest_gap, state.gap_at = gap, (state.block + 1, 0)
            state.block, state.last_step = step.block, -1
            state.recent.clear()
        gap = step.step - state.last_step - 1  # unseen steps since the last one (or since the block began)
        if gap > state.longest_gap:
            state.longest_gap, state.gap_at = gap, (step.block, step.step)
        state.last_step = step.step
        if step.residual_mean is not None:
            state.recent.append(step.residual_mean)
        return []

    def on_finish(self, state: TransparencyState, final: FinalCanvas) -> list[Flag]:
        self._close_block(state)
        flags = []
        depth = 1 + state.longest_gap
        if depth > self.params.max_opaque_depth:
            block, step = state.gap_at
            flags.append(self.flag(
                self.severity, f"{depth - 1} consecutive denoising steps never reached the monitors "
                               f"(opaque depth {depth}, more than {self.params.max_opaque_depth})",
                Evidence(block, step), score=min(1.0, depth / (2 * self.params.max_opaque_depth)),
                opaque_depth=depth, steps_dropped=final.steps_dropped,
            ))
        residual, block, last_step = state.worst_residual
        if residual > self.params.max_residual:
            flags.append(self.flag(
                self.severity, f"block {block}: {residual:.2f} of the probability mass lies outside the kept tokens "
                               f"in its last steps; the bottleneck view is not faithful",
                Evidence(block, last_step), score=residual, residual_mass=f"{residual:.3f}",
            ))
        return flags

    def _close_block(self, state: TransparencyState) -> None:
        if state.block < 0:
            return
        if state.total_steps and state.last_step < state.total_steps - 1:
            gap = state.total_steps - 1 - state.last_step  # steps at the block's end never seen
            if gap > state.longest_gap:
                state.longest_gap, state.gap_at = gap, (state.block, state.last_step + 1)
        if state.recent:
            mean = sum(state.recent) / len(state.recent)
            if mean > state.worst_residual[0]:
                state.worst_residual = (mean, state.block, state.last_step)
