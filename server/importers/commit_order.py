"""Per-position commit steps rebuilt into step-by-step canvases, and the commit-order label.

clean.json, bench_order.json, films_order.json and poem_order.json record, per
position, the step at which it last changed (`*_lock`, `lock`), not the
canvases in between. The rebuilt run has, per position p with lock step l_p:

  - steps t >= l_p: the final token, decided (the sampler's accepted token
    from then on, as the capture defines the lock);
  - steps t < l_p: undecided, showing a *draft* token that is not the final
    one (so the argmax last changes exactly at l_p, as recorded).

The draft rule, chosen from what gallery.json's real frames do before a
position's last change (its argmax there is rarely the final token; it is
held for a few steps, changing on about a third of them; it is usually a
token found elsewhere in the same canvas, sometimes the neighbour's):
  - a new draft starts at step 0 and, at each later step before the lock,
    with probability `change_prob` (1/3); otherwise the draft holds;
  - a draft is, with probability `neighbour_share` (0.2), the final token of
    the position just left or right of it (equally likely), and otherwise the
    final token of a uniformly drawn content position of the same canvas;
  - a draw equal to the position's own final token is redrawn (three tries,
    then the position's placeholder id), so the draft is never the final token.
Positions outside the recorded content (template, padding) have lock 0.
clean.json's answer positions are the exception: they show the answers the
capture lists (clean.py), never drafts.

Commit-order label (`non_chronological`). Over the content positions in
canvas order, with n >= 8 of them: the run is *late-first* when the median lock
step of the last quarter (n // 4 positions) is strictly below that of the
first quarter: the end of the text settled before its beginning (an answer or
a closing written before what leads up to it). The difference of the two
medians is kept as `late_first_lead` (steps; > 0 means late-first), so an
evaluation can use another threshold. Ordinary left-to-right settling with
jitter, and padding that settles first, do not count: padding is not content,
and jitter moves single positions, not the medians of quarters.
"""

from __future__ import annotations

import numpy as np

from canvaswatch.server.importers.canvas import ROLE_OTHER, ROLE_REASONING
from canvaswatch.server.importers.fields import CaptureError, Fields
from canvaswatch.server.importers.text import placeholder_ids

CHANGE_PROB = 1.0 / 3.0
NEIGHBOUR_SHARE = 0.2
MIN_ORDER_POSITIONS = 8
MAX_CANVAS = 4096  # positions a rebuilt canvas may have (the captures' are 128-256)
MAX_STEPS = 10_000  # a lock step this large is no real run's (a sentinel, a corrupt record): refused, not rebuilt


def positions_and_locks(fields: Fields, pos_key: str, lock_key: str, length: int,
                        steps: int | None) -> tuple[np.ndarray, np.ndarray]:
    """A capture's positions and their lock steps, sorted by position: positions in [0, length),
    none listed twice, one lock each, every lock below `steps` (T) where it is known and below
    MAX_STEPS where it is not."""
    positions = fields.ints(pos_key, high=length, what="positions")
    lock = fields.ints(lock_key, length=positions.size, high=MAX_STEPS if steps is None else None, what="lock steps")
    if np.unique(positions).size != positions.size:
        raise fields.fail(pos_key, "a position is listed twice")
    if steps is not None and (lock >= steps).any():
        index = int(np.argmax(lock >= steps))
        raise CaptureError(fields.file, f"{fields.where(lock_key)}[{index}]",
                           f"lock step {int(lock[index])} is beyond T = {steps} steps")
    order = np.argsort(positions, kind="stable")
    return positions[order], lock[order]


def rebuild_content(final: np.ndarray, content: np.ndarray, content_lock: np.ndarray, steps: int,
                    rng: np.random.Generator, *, change_prob: float = CHANGE_PROB,
                    neighbour_share: float = NEIGHBOUR_SHARE
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, str], bool]:
    """A capture whose only roles are content and the rest (bench_order, poem, films): argmax and
    decided (`rebuild`), the roles, and the commit-order attributes and label (`order_attributes`)."""
    length = final.size
    lock = np.zeros(length, dtype=np.int64)
    lock[content] = content_lock
    mask = np.zeros(length, dtype=bool)
    mask[content] = True
    argmax, decided = rebuild(final, lock, steps, mask, rng, change_prob=change_prob, neighbour_share=neighbour_share)
    roles = np.where(mask, ROLE_REASONING, ROLE_OTHER).astype(np.int8)
    order, late = order_attributes(content_lock)
    return argmax, decided, roles, order, late


def rebuild(final: np.ndarray, lock: np.ndarray, steps: int, content: np.ndarray, rng: np.random.Generator,
            *, change_prob: float = CHANGE_PROB, neighbour_share: float = NEIGHBOUR_SHARE) -> tuple[np.ndarray, np.ndarray]:
    """(argmax [T, L], decided [T, L]) from the final canvas and per-position lock steps (all < steps)."""
    length = final.shape[0]
    t = np.arange(steps)[:, None]
    undecided = t < lock[None, :]
    argmax = np.broadcast_to(final, (steps, length)).copy()
    if not undecided.any():
        return argmax, ~undecided
    pool = final[np.nonzero(content)[0]] if content.any() else final
    draw = pool[rng.integers(0, pool.size, size=(steps, length))]
    side = np.where(rng.random((steps, length)) < 0.5, -1, 1)
    neighbour = np.clip(np.arange(length)[None, :] + side, 0, length - 1)
    draw = np.where(rng.random((steps, length)) < neighbour_share, final[neighbour], draw)
    for _ in range(3):
        same = draw == final[None, :]
        if not same.any():
            break
        draw[same] = pool[rng.integers(0, pool.size, size=int(same.sum()))]
    same = draw == final[None, :]
    if same.any():
        fallback = placeholder_ids(np.arange(length))
        fallback = np.where(fallback == final, placeholder_ids(np.arange(length) + 1), fallback)
        draw[same] = np.broadcast_to(fallback, (steps, length))[same]
    starts = np.zeros((steps, length), dtype=bool)
    starts[0] = True
    starts[1:] = rng.random((steps - 1, length)) < change_prob
    since = np.maximum.accumulate(np.where(starts, t, 0), axis=0)  # the step the current draft began
    draft = np.take_along_axis(draw, since, axis=0)
    argmax[undecided] = draft[undecided]
    return argmax, ~undecided


def late_first_lead(locks_in_order: np.ndarray) -> float | None:
    """Median lock of the first quarter minus that of the last quarter (None below MIN_ORDER_POSITIONS)."""
    count = locks_in_order.shape[0]
    if count < MIN_ORDER_POSITIONS:
        return None
    quarter = count // 4
    return float(np.median(locks_in_order[:quarter]) - np.median(locks_in_order[-quarter:]))


def order_known(order: dict[str, str]) -> bool:
    """Whether order_attributes could judge the order: a run it could not (too few content positions) is
    neither a positive nor a negative for non_chronological, so it is not labelled for it."""
    return order["late_first"] != "unknown"


def order_attributes(locks_in_order: np.ndarray) -> tuple[dict[str, str], bool]:
    """The commit-order attributes of a run and whether it is late-first (a non_chronological positive)."""
    lead = late_first_lead(locks_in_order)
    if lead is None:
        return {"late_first_lead": "", "late_first": "unknown"}, False
    late = lead > 0
    return {"late_first_lead": f"{lead:g}", "late_first": str(late).lower()}, late
