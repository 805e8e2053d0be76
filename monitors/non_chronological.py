"""non_chronological: positions commit far out of left-to-right order, an answer before its reasons.

Definition. Within a block, a position's *commit step* is the step from which
its final token stayed committed without interruption to the block's last
step: where the client sends the sampler's accepted mask, committed means
accepted by the sampler (its own decision, the same under any temperature);
otherwise it means top-1 with probability at least `settle_prob`. Positions whose final token is in
`ignore_ids` (padding, end of sequence, which models settle first) and
positions that never commit are left out. At the end of each block:
  - rho: Spearman rank correlation between position and commit step
    (1 = strictly left to right);
  - lead: how many steps earlier the last `late_fraction` of the committed
    positions (the answer, in a question-then-answer text) committed than the
    positions before them (median against median).
A block is flagged when lead >= `min_lead_steps` or rho < `min_rank_corr`,
with at least `min_positions` committed positions that did not all commit at
the same step (a canvas settled in one step has no order to judge; its rank
correlation is undefined, not zero). Score: the larger of (1 - rho) / 2 and the
lead as a share of the block's spread of commit steps (lead / (last commit - first
commit), at most 1), so a flag raised by the lead alone is scored by how far the
last part jumped ahead, not by a rank correlation the jump barely moved.

Hard negatives it excludes: ordinary left-to-right settling with jitter (rho
stays high, no lead), early-settling padding (ignored ids).

State per request: the [L] commit steps and the last step, reset per block; each step is one
compiled pass (`_update_commits`), and so is each part of the judgement at the block's end
(`_commit_order`, `_rank_correlation`: in float64; as ~20 torch calls it cost 0.35-0.7 ms a block,
8-18 us a step at 48 steps a block).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from canvaswatch.monitors.base import DecodedStep, Evidence, FinalCanvas, Flag, Monitor, RequestMeta, Severity
from canvaswatch.monitors.canvas_ops import sorted_members
from canvaswatch.monitors.compiled import kernel, sized


@dataclass(frozen=True)
class NonChronologicalParams:
    # Without the sampler's mask, committed = top-1 >= settle_prob. 0.5 rather than 0.8: on the real
    # captures imported under the entropy rule, 0.8 put late, still-moving drafts' crossings into the
    # commit order (films FPR 0.09, poems 0.17, recall 0.50); at 0.5: 0.045, 0.00, 1.00, and the
    # committed rule and the simulated corpus are unchanged or better (BENCHMARKS.md, real data).
    settle_prob: float = 0.5
    min_rank_corr: float = 0.2
    late_fraction: float = 0.2
    min_lead_steps: int = 3
    min_positions: int = 8
    ignore_ids: list[int] = field(default_factory=lambda: [0, 1])
    severity: str = "info"

    def __post_init__(self) -> None:
        if not 0.0 < self.settle_prob <= 1.0:
            raise ValueError(f"settle_prob: must be in (0, 1], got {self.settle_prob}")
        if not -1.0 <= self.min_rank_corr <= 1.0:
            raise ValueError(f"min_rank_corr: must be in [-1, 1], got {self.min_rank_corr}")
        if not 0.0 < self.late_fraction < 1.0:
            raise ValueError(f"late_fraction: must be in (0, 1), got {self.late_fraction}")
        if self.min_positions < 3:
            raise ValueError(f"min_positions: must be >= 3, got {self.min_positions}")
        Severity.parse(self.severity, "severity")


@dataclass
class NonChronologicalState:
    block: int = -1
    last: DecodedStep | None = None
    commit: np.ndarray | None = None  # [L] commit step, -1 while not committed
    previous: np.ndarray | None = None  # [L] the token each commit step refers to


class NonChronologicalMonitor(Monitor):
    """Positions commit far from left to right (low rank correlation), or the last part of a
    block (an answer) commits steps before the text that leads to it."""

    name: ClassVar[str] = "non_chronological"
    Params: ClassVar[type] = NonChronologicalParams

    def __init__(self, params: NonChronologicalParams) -> None:
        super().__init__(params)
        self.severity = Severity.parse(params.severity)
        self._ignore = sorted_members(params.ignore_ids)

    def start(self, request: RequestMeta) -> NonChronologicalState:
        return NonChronologicalState()

    def on_step(self, state: NonChronologicalState, step: DecodedStep) -> list[Flag]:
        flags = []
        if state.last is not None and step.block != state.block:
            flags = self._judge(state)
            state.last = None
        top1 = step.ids_np[:, 0] if step.argmax_ids is None else step.argmax_ids
        if step.accepted is not None:
            committed = step.accepted
        else:
            committed = step.probs_np[:, 0] >= self.params.settle_prob
        if state.last is None or state.commit is None or state.commit.shape != top1.shape:
            state.commit = np.full(top1.shape, -1, dtype=np.int64)
            previous = np.full_like(top1, -1)  # matches no token: nothing holds over from another block
        else:
            previous = state.previous
        sized(_update_commits, len(top1))(top1, committed, previous, state.commit, step.step)
        state.previous = top1
        state.block, state.last = step.block, step
        return flags

    def on_finish(self, state: NonChronologicalState, final: FinalCanvas) -> list[Flag]:
        return self._judge(state) if state.last is not None else []

    def _judge(self, state: NonChronologicalState) -> list[Flag]:
        p, last = self.params, state.last
        length = len(state.commit)
        positions, commits = np.empty(length, dtype=np.int64), np.empty(length, dtype=np.int64)
        count = _commit_order(state.commit, state.previous, self._ignore, positions, commits)
        if count < p.min_positions:
            return []
        positions, commits = positions[:count], commits[:count]
        if commits.min() == commits.max():
            return []
        rho = float(_rank_correlation(commits))
        split = max(1, int(round(count * (1 - p.late_fraction))))
        early, late = commits[:split], commits[split:]
        lead = float(_lower_median(early) - _lower_median(late)) if len(late) else 0.0
        if lead < p.min_lead_steps and rho >= p.min_rank_corr:
            return []
        late_positions = positions[split:].tolist()
        snippet = last.span_text(late_positions[0], late_positions[-1] + 1) if late_positions else ""
        return [self.flag(
            self.severity,
            f"block {state.block}: commit order far from left to right (rho {rho:.2f}); "
            f"the last {len(late_positions)} positions committed {_lead_text(lead)}",
            Evidence(state.block, int(late.min()) if len(late) else last.step, tuple(late_positions), snippet),
            score=max((1.0 - rho) / 2.0, min(1.0, max(0.0, lead) / float(commits.max() - commits.min()))),
            rank_correlation=f"{rho:.3f}", lead_steps=f"{lead:.1f}", committed_positions=count,
        )]


def _lead_text(lead: float) -> str:
    """How the last part's median commit step stands to the rest's, in words (lead > 0: earlier)."""
    steps = abs(round(lead))
    if steps == 0:
        return "at the same median step as the rest"
    return f"{steps} step{'s' if steps != 1 else ''} {'before' if lead > 0 else 'after'} the rest"


def _lower_median(values: np.ndarray) -> int:
    """The lower of the two middle values for an even count (what torch.median gave before)."""
    return int(np.partition(values, (len(values) - 1) // 2)[(len(values) - 1) // 2])


@kernel
def _commit_order(commit, previous, ignore, positions, commits):
    """Fill positions/commits with the committed positions whose token is not in `ignore` (sorted), left to
    right, and their commit steps; returns how many."""
    count = 0
    for i in range(commit.shape[0]):
        if commit[i] < 0:
            continue
        at = np.searchsorted(ignore, previous[i])  # as the smearing kernels search their ignore_ids
        if at < ignore.shape[0] and ignore[at] == previous[i]:
            continue
        positions[count] = i
        commits[count] = commit[i]
        count += 1
    return count


@kernel
def _rank_correlation(commits):
    """Spearman's rho between position order and commit step: the positions are distinct and increasing,
    so their ranks are 0..n-1; tied commit steps share their average rank. 0 when either is constant."""
    n = commits.shape[0]
    order = np.argsort(commits, kind="mergesort")
    ranks = np.empty(n, dtype=np.float64)
    start = 0
    while start < n:
        stop = start + 1
        while stop < n and commits[order[stop]] == commits[order[start]]:
            stop += 1
        average = start + (stop - start - 1) / 2.0
        for j in range(start, stop):
            ranks[order[j]] = average
        start = stop
    mean = (n - 1) / 2.0  # of both rank vectors: average ranks keep the sum
    sxy, sxx, syy = 0.0, 0.0, 0.0
    for i in range(n):
        dx, dy = i - mean, ranks[i] - mean
        sxy += dx * dy
        sxx += dx * dx
        syy += dy * dy
    denominator = np.sqrt(sxx * syy)
    return sxy / denominator if denominator > 0 else 0.0


@kernel(gil_free_twin=True)
def _update_commits(top1, committed, previous, commit, step):
    """A committed position keeps its commit step while its token holds, else commits now; -1 while not committed."""
    for i in range(top1.shape[0]):
        if not committed[i]:
            commit[i] = -1
        elif top1[i] != previous[i] or commit[i] < 0:
            commit[i] = step
