"""The two probability rules (`--rule`): how a run's top-k probabilities are filled in.

No capture records probabilities, so every imported trace says which rule
made them (attribute `rule`). A monitor that holds under only one rule is
tuned to the rule, not to the model (issue 11), hence two rules that differ
in kind, not only in numbers.

`committed` (default): the sampler's decision sets the confidence.
  - decided position (accepted by the sampler in gallery.json; at or after its
    lock step in the commit-order captures): top-1 drawn uniformly in
    [0.90, 0.99]; the kept alternatives share (1 - top-1) x U(0.3, 0.8),
    halving from slot to slot.
  - shown answer (an answer position before its lock, showing one of the
    answers the capture recorded; clean.json only): top-1 uniform in
    [0.45, 0.85], the rest as a decided position's tail. The data's README
    says answer positions start at 0.0-2.1 nats, never at reasoning's
    1.2-3.9: an answer the model shows and later revises is held more firmly
    than a reasoning draft and less than a committed token. The range is the
    middle of that span, 0.5-1.5 nats (top-1 of a geometric at those
    entropies, the entropy rule's family).
  - undecided position: top-1 uniform in [0.15, 0.35], each other kept token
    uniform in [0.10, 0.25] and never above the top-1, sorted descending; if
    the kept mass would pass 0.98 the non-top tokens shrink together to fit
    (with k = 4 the ranges already fit; with large k the others get smaller).
    That is the kept-token mass of a real reasoning position at 2-3 nats of
    entropy, where real reasoning starts (issue 11).

  - the entropy sent as the step's `entropy` signal: that of the kept tokens
    plus the residual mass spread evenly over the 1,024 - k other ranks of
    the support the entropy rule uses below.

`entropy`: per-position entropy follows the real mean entropy curves of
anim_curves.json (per problem, per step, of the answer positions and of the
reasoning positions; read at import time from `curves`, default: the
anim_curves.json beside the input file; no number from it is kept in the code).
  - curve: clean.json runs use their own problem's curves (the run's `pid`);
    every other run, and a problem whose entry is null, uses the mean over the
    problems. Answer positions follow the answer curve, reasoning positions
    (and all content where no finer role is known) the reasoning curve,
    template and padding the answer curve (they commit in the first steps, as
    sure as the answer). Past the curve's last step the last value holds
    (later real steps repeat the canvas).
  - within a role, decided positions weigh `locked_weight` (0.25) and
    undecided ones 1: target entropy h(p, t) = curve(t) x w(p, t) / mean_role(w(., t)),
    so the role's mean entropy at each step equals the curve while undecided
    positions carry more of it. Clipped to [1e-4, 6.0] nats.
  - the distribution with that entropy: a geometric distribution over 1,024
    ranks, p_i proportional to q^i (i = 0..1023), q solved from the entropy
    (monotone; a precomputed table, interpolated). The trace keeps its first k
    probabilities; the rest is the residual mass outside the top-k. With k = 4:
    at 2 nats 0.31/0.21/0.15/0.10 (the committed rule's undecided shape), at
    2.5 nats 0.20/0.16/0.13/0.10, at 3-4 nats flatter (top-1 0.13-0.05), at
    0.05 nats a top-1 of 0.99. The `entropy` signal is the target itself.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from canvaswatch.server.importers.canvas import ROLE_ANSWER, ROLE_OTHER, ROLE_REASONING, RebuiltRun
from canvaswatch.server.importers.fields import CaptureError, Fields, load_json

RULES = ("committed", "entropy")


@dataclass(frozen=True)
class CommittedRule:
    name: str = "committed"
    decided_top: tuple[float, float] = (0.90, 0.99)
    decided_tail: tuple[float, float] = (0.3, 0.8)
    shown_answer_top: tuple[float, float] = (0.45, 0.85)
    undecided_top: tuple[float, float] = (0.15, 0.35)
    undecided_other: tuple[float, float] = (0.10, 0.25)
    max_mass: float = 0.98

    def probabilities(self, run: RebuiltRun, k: int, rng: np.random.Generator) -> np.ndarray:
        steps, length = run.argmax.shape
        shape = (steps, length)
        # a shown answer takes the decided shape (a firm top-1 and a geometric tail) at a lower top-1
        shown = ~run.decided & (run.roles == ROLE_ANSWER)[None, :]
        decided = run.decided | shown
        top = np.where(run.decided, rng.uniform(*self.decided_top, size=shape),
                       np.where(shown, rng.uniform(*self.shown_answer_top, size=shape),
                                rng.uniform(*self.undecided_top, size=shape)))
        probs = np.zeros((steps, length, k), dtype=np.float64)
        probs[..., 0] = top
        if k == 1:
            return probs
        # decided: a geometric tail (halving) holding a share of the mass left over
        halving = 0.5 ** np.arange(k - 1)
        tail = (1.0 - top) * rng.uniform(*self.decided_tail, size=shape)
        decided_rest = tail[..., None] * halving / halving.sum()
        # undecided: each kept alternative in its range, never above the top-1, descending, mass capped
        others = np.minimum(rng.uniform(*self.undecided_other, size=(steps, length, k - 1)), top[..., None])
        others = -np.sort(-others, axis=-1)
        total = top + others.sum(axis=-1)
        scale = np.where(total > self.max_mass, (self.max_mass - top) / others.sum(axis=-1), 1.0)
        others *= scale[..., None]
        probs[..., 1:] = np.where(decided[..., None], decided_rest, others)
        return probs

    def entropies(self, run: RebuiltRun, probs: np.ndarray) -> np.ndarray:
        """Entropy of the kept tokens plus the residual mass spread evenly over SUPPORT - k other tokens."""
        return kept_entropy(probs)


@dataclass(frozen=True)
class Curves:
    """Mean entropy per step (nats) of answer and reasoning positions, per problem, from anim_curves.json."""

    answer: dict[str, np.ndarray]
    reasoning: dict[str, np.ndarray]
    mean_answer: np.ndarray
    mean_reasoning: np.ndarray
    source: str

    def for_run(self, key: str | None) -> tuple[np.ndarray, np.ndarray, str]:
        """(answer curve, reasoning curve, which): the problem's own where known, else the mean."""
        if key is not None and key in self.answer:
            return self.answer[key], self.reasoning[key], key
        return self.mean_answer, self.mean_reasoning, "mean"


def load_curves(path: Path) -> Curves:
    """Read anim_curves.json: {problem: null | {"ans_curve": [...], "cot_curve": [...], ...}}."""
    data = load_json(path)
    if not isinstance(data, dict):
        raise CaptureError(path.name, "(top level)", "expected an object of problems")
    answer: dict[str, np.ndarray] = {}
    reasoning: dict[str, np.ndarray] = {}
    for key, entry in data.items():
        if entry is None:  # a problem without curves in the capture
            continue
        fields = Fields(path.name, key, entry)
        answer[key] = fields.floats("ans_curve", low=0.0)
        reasoning[key] = fields.floats("cot_curve", low=0.0)
    if not answer:
        raise CaptureError(path.name, "(top level)", "no problem has curves")
    return Curves(answer, reasoning, _mean(list(answer.values())), _mean(list(reasoning.values())), path.name)


def _mean(curves: list[np.ndarray]) -> np.ndarray:
    width = max(len(c) for c in curves)
    held = np.stack([np.concatenate((c, np.full(width - len(c), c[-1]))) for c in curves])
    return held.mean(axis=0)


SUPPORT = 1024  # ranks of the geometric family
H_MIN, H_MAX = 1e-4, 6.0


@functools.lru_cache(maxsize=1)
def _entropy_table() -> tuple[np.ndarray, np.ndarray]:
    """Entropy (nats) of the truncated geometric p_i ~ q^i, i < SUPPORT, on a grid of q (increasing in q)."""
    q = np.concatenate((np.linspace(0.0, 0.99, 3000, endpoint=False), 1.0 - np.geomspace(1e-2, 1e-5, 1000)))
    ranks = np.arange(SUPPORT)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_p = ranks * np.log(q[:, None]) + np.log1p(-q[:, None]) - np.log1p(-(q[:, None] ** SUPPORT))
        p = np.exp(log_p)
        entropy = -np.where(p > 0, p * log_p, 0.0).sum(axis=1)
    entropy[0] = 0.0
    return entropy, q


def geometric_topk(entropy: np.ndarray, k: int) -> np.ndarray:
    """The first k probabilities of the geometric distribution with each given entropy: [..., k]."""
    table_h, table_q = _entropy_table()
    q = np.interp(np.clip(entropy, H_MIN, H_MAX), table_h, table_q)[..., None]
    ranks = np.arange(k)
    return (1.0 - q) * q ** ranks / (1.0 - q ** SUPPORT)


@dataclass(frozen=True)
class EntropyRule:
    curves: Curves
    locked_weight: float = 0.25
    name: str = "entropy"

    def target_entropy(self, run: RebuiltRun) -> tuple[np.ndarray, str]:
        """[T, L] target entropy (nats) of every position at every step, and which curves were used."""
        steps, length = run.argmax.shape
        answer, reasoning, which = self.curves.for_run(run.curve_key)
        t = np.arange(steps)
        by_role = {ROLE_ANSWER: answer, ROLE_OTHER: answer, ROLE_REASONING: reasoning}
        weight = np.where(run.decided, self.locked_weight, 1.0)
        target = np.zeros((steps, length))
        for role, curve in by_role.items():
            members = run.roles == role
            if not members.any():
                continue
            level = curve[np.minimum(t, len(curve) - 1)]
            w = weight[:, members]
            target[:, members] = level[:, None] * w / w.mean(axis=1, keepdims=True)
        return np.clip(target, H_MIN, H_MAX), which

    def probabilities(self, run: RebuiltRun, k: int, rng: np.random.Generator) -> np.ndarray:
        target, _ = self.target_entropy(run)
        return geometric_topk(target, k)

    def entropies(self, run: RebuiltRun, probs: np.ndarray) -> np.ndarray:
        """The target entropy itself: the exact entropy of the geometric distribution behind the top-k."""
        return self.target_entropy(run)[0]


def kept_entropy(probs: np.ndarray) -> np.ndarray:
    """[..., k] kept probabilities -> entropy (nats), the residual spread evenly over SUPPORT - k tokens."""
    k = probs.shape[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        kept = -np.where(probs > 0, probs * np.log(probs), 0.0).sum(axis=-1)
        residual = np.clip(1.0 - probs.sum(axis=-1), 0.0, 1.0)
        spread = -np.where(residual > 0, residual * np.log(residual / max(SUPPORT - k, 1)), 0.0)
    return kept + spread


def make_rule(name: str, curves_path: Path | None) -> CommittedRule | EntropyRule:
    if name == "committed":
        return CommittedRule()
    if name == "entropy":
        if curves_path is None or not curves_path.exists():
            where = str(curves_path) if curves_path is not None else "anim_curves.json"
            raise CaptureError(Path(where).name, "(file)",
                               f"the entropy rule reads the real entropy curves; {where} not found (give its path)")
        return EntropyRule(load_curves(curves_path))
    raise ValueError(f"unknown rule {name!r}; one of {', '.join(RULES)}")
