"""films_order.json: per-position commit steps of small reasoning tasks, without any text.

Format (a list of runs): `task` (arithmetic, collatz, reverse_chain,
square_count, tower_of_london), `depth`, `T` (16 to 256 steps), `seed`, `ok`
(solved), `content` (the content positions), `lock` (per content position,
same order, the step it committed). All are read.

Rebuilt run (commit_order.py has the shared rule):
  - canvas: the capture keeps neither the canvas length nor any token, so the
    canvas is the content itself (max content position + 1 positions, or
    `canvas_length`), every content position holding its placeholder id
    (text.py), anything else `<pad>`. Monitors that read text see markers, not
    words: these traces carry the commit order, which is what the file holds.
  - steps: `T`; locks: `lock`; drafts before the lock (drafts here are other
    positions' placeholders).
  - roles: content positions reasoning.

Labels: non_chronological when the content commits late-first (commit_order.py);
`labelled` = non_chronological where the order could be judged (8 or more
content positions; other monitors: flag rate on unlabelled requests).
The request id is `real-films-<index>-<task>-d<depth>-s<seed>`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from canvaswatch.server.importers.canvas import RebuiltRun, run_rng
from canvaswatch.server.importers.commit_order import MAX_CANVAS, MAX_STEPS, order_known, positions_and_locks, rebuild_content
from canvaswatch.server.importers.fields import Fields, load_run_list
from canvaswatch.server.importers.options import ImportOptions
from canvaswatch.server.importers.text import PAD_ID, placeholder_ids, ranges

FORMAT = "films"


def read(path: Path, options: ImportOptions) -> list[RebuiltRun]:
    data = load_run_list(path)
    return options.each_run(enumerate(data), lambda item: _run(Fields(path.name, f"[{item[0]}]", item[1]), item[0], options))


def _run(fields: Fields, index: int, options: ImportOptions) -> RebuiltRun:
    task = fields.string("task")
    depth = fields.integer("depth", optional=True)
    seed = fields.integer("seed", optional=True)
    ok = fields.boolean("ok", optional=True)
    steps = fields.integer("T", low=1, high=MAX_STEPS)
    raw = fields.ints("content", high=MAX_CANVAS, what="positions")
    if raw.size == 0:
        raise fields.fail("content", "no content positions")
    length = options.canvas_length or int(raw.max()) + 1
    content, content_lock = positions_and_locks(fields, "content", "lock", length, steps)

    final = np.full(length, PAD_ID, dtype=np.int64)
    final[content] = placeholder_ids(content, options.placeholder_base, options.vocab_size)
    name = f"{index:03d}-{task}-d{depth}-s{seed}"
    rng = run_rng(f"{FORMAT}-{name}/drafts", options.seed)
    argmax, decided, roles, order, late = rebuild_content(final, content, content_lock, steps, rng,
                                                          change_prob=options.change_prob,
                                                          neighbour_share=options.neighbour_share)
    attributes = {
        "task": task, "content_positions": ranges(content), "placeholder_positions": ranges(content),
        "filled": "probabilities,alternatives,undecided_argmax,placeholder_tokens",
        "labels": "non_chronological" if late else "", "labelled": "non_chronological" if order_known(order) else "", **order,
    }
    for key, value in (("depth", depth), ("seed", seed), ("ok", ok)):
        if value is not None:
            attributes[key] = str(value).lower() if isinstance(value, bool) else str(value)
    return RebuiltRun(name=name, argmax=argmax, decided=decided, final=final, roles=roles, attributes=attributes)
