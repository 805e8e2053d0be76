"""Small helpers the canvas monitors share (runs, id sets, spans)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from canvaswatch.monitors.compiled import kernel, sized


def contiguous_spans(positions: list[int]) -> list[list[int]]:
    spans: list[list[int]] = []
    for position in positions:
        if spans and position == spans[-1][-1] + 1:
            spans[-1].append(position)
        else:
            spans.append([position])
    return spans


def sorted_members(ids: list[int]) -> np.ndarray:
    """An id list as a sorted int64 array, for kernels to binary-search."""
    return np.unique(np.asarray(ids, dtype=np.int64))


@kernel(gil_free_twin=True)
def advance_runs(run, flagged, fire, holds, min_steps):
    """Count one step into every (offset, position) run; returns how many reached min_steps for the first time.

    A run grows while its condition holds and restarts at 0 when it does not; `fire` marks the
    (offset, position) pairs reported at this step, each at most once per block (`flagged`).
    """
    fires = 0
    for row in range(run.shape[0]):
        for position in range(run.shape[1]):
            fire[row, position] = False
            if holds[row, position]:
                run[row, position] += 1
                if run[row, position] >= min_steps and not flagged[row, position]:
                    flagged[row, position] = True
                    fire[row, position] = True
                    fires += 1
            else:
                run[row, position] = 0
    return fires


@dataclass
class OffsetRuns:
    """Per (offset, position) of one block: consecutive steps a condition has held, and whether it was reported.

    The smearing monitors' state: a condition must hold `min_steps` steps in a row before it is
    flagged, once per (offset, position) and block. Bounded by offsets x canvas length. A
    monitor's kernel writes the step's condition into `holds`; `advance` counts it into the runs
    in one compiled pass and leaves the step's new (offset, position) reports in `fire`.
    """

    block: int = -1
    run: np.ndarray | None = None  # [offsets, L] consecutive steps held
    flagged: np.ndarray | None = None  # [offsets, L]
    fire: np.ndarray | None = None  # [offsets, L] reached min_steps at this step
    holds: np.ndarray | None = None  # [offsets, L] the condition at this step, written by the monitor

    def begin_step(self, block: int, offsets: int, length: int) -> None:
        """Start over at a new block (or canvas size); otherwise keep counting."""
        if self.block != block or self.run is None or self.run.shape != (offsets, length):
            self.block = block
            self.run = np.zeros((offsets, length), dtype=np.int64)
            self.flagged = np.zeros((offsets, length), dtype=bool)
            self.fire = np.zeros((offsets, length), dtype=bool)
            self.holds = np.zeros((offsets, length), dtype=bool)

    def advance(self, min_steps: int) -> int:
        """Count `holds` (filled by the monitor for this step) into the runs; how many fired."""
        return sized(advance_runs, self.run.shape[1])(self.run, self.flagged, self.fire, self.holds, min_steps)
