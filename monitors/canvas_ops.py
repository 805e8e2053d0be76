"""Small tensor helpers the canvas monitors share (ranks, runs, id masks, spans)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 with ties given their average rank (what Spearman's rho needs)."""
    unique, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    return (starts.float() + (counts.float() - 1) / 2)[inverse]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (0 when either is constant)."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = float(torch.sqrt((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum()) / denominator if denominator > 0 else 0.0


def window_all(mask: np.ndarray, width: int) -> np.ndarray:
    """out[i] = mask[i : i + width].all(), for every i with a full window (prefix sums, no loop)."""
    if mask.size < width:
        return np.zeros(0, dtype=bool)
    runs = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    return (runs[width:] - runs[:-width]) == width


def window_mean(values: np.ndarray, width: int) -> np.ndarray:
    sums = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
    return (sums[width:] - sums[:-width]) / width


def isin(ids: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    return torch.isin(ids, members) if members.numel() else torch.zeros_like(ids, dtype=torch.bool)


def contiguous_spans(positions: list[int]) -> list[list[int]]:
    spans: list[list[int]] = []
    for position in positions:
        if spans and position == spans[-1][-1] + 1:
            spans[-1].append(position)
        else:
            spans.append([position])
    return spans


def isin_small(values: np.ndarray, members: np.ndarray) -> np.ndarray:
    """np.isin for a handful of members: a few equality passes beat its sort-based path ~10x."""
    if members.size > 8:
        return np.isin(values, members)
    out = np.zeros(values.shape, dtype=bool)
    for member in members.tolist():
        out |= values == member
    return out


@dataclass
class OffsetRuns:
    """Per (offset, position) of one block: consecutive steps a condition has held, and whether it was reported.

    The smearing monitors' state: a condition must hold `min_steps` steps in a row before it is
    flagged, once per (offset, position) and block. Bounded by offsets x canvas length.
    """

    block: int = -1
    run: np.ndarray | None = None  # [offsets, L] consecutive steps held
    flagged: np.ndarray | None = None  # [offsets, L]
    _none: np.ndarray | None = None  # [L] all False, what a step where nothing holds fires

    def begin_step(self, block: int, offsets: int, length: int) -> None:
        """Start over at a new block (or canvas size); otherwise keep counting."""
        if self.block != block or self.run is None or self.run.shape != (offsets, length):
            self.block = block
            self.run = np.zeros((offsets, length), dtype=np.int64)
            self.flagged = np.zeros((offsets, length), dtype=bool)
            self._none = np.zeros(length, dtype=bool)
            self._none.flags.writeable = False

    def advance(self, offset_index: int, holds: np.ndarray, min_steps: int) -> np.ndarray:
        """Count this step for one offset; the positions that reach `min_steps` now, for the first time."""
        if not holds.any():
            # The usual step (nothing smeared): every run ends; skip the five array passes below.
            self.run[offset_index] = 0
            return self._none
        self.run[offset_index] = np.where(holds, self.run[offset_index] + 1, 0)
        fire = (self.run[offset_index] >= min_steps) & ~self.flagged[offset_index]
        self.flagged[offset_index] |= fire
        return fire
