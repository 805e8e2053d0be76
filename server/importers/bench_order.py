"""bench_order.json and poem_order.json: per-position commit steps of ordinary requests, with the text's start.

Format (a list of runs): `bench` (gpqa, math, humaneval, wildchat; `poem` in
poem_order.json), `pid`, `T` (steps, 48), optional `C` (the canvas), `content` (the content positions),
`lock` (per content position, same order: the step it committed for good),
`final_text` (the first 300 characters of the output). All are read.

Rebuilt run (commit_order.py has the shared rule):
  - canvas: `canvas_length` if given, else the run's `C` where it records one,
    else 256 positions (the capture's canvas) or as many as the content
    needs when it reaches past them; steps: `T`;
  - tokens: `final_text` tokenised (text.py: the Gemma tokenizer, channel
    markers as ids 100/101) fills the content positions in canvas order. A
    text of 300 characters or more that gives fewer ids than there are content
    positions was cut by the capture: its last id is dropped (the cut may have
    split that token). Content positions the text does not reach hold
    placeholder ids (text.py), listed in `placeholder_positions`; positions
    outside `content` are `<pad>`. A text giving more ids than content
    positions contradicts the capture and is refused. (Every poem's text is
    complete and gives exactly its content's length.)
  - locks: `lock` at the content positions, 0 elsewhere (padding commits
    first); before its lock a position shows drafts (commit_order.py).
  - roles: content positions reasoning, the rest template.

Labels: non_chronological when the content commits late-first
(commit_order.py), and `labelled` = non_chronological where the order could
be judged (8 or more content positions): these are ordinary runs, so for
every other monitor they count toward its flag rate on unlabelled requests
(server/evaluation/evaluate.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from canvaswatch.server.importers.canvas import RebuiltRun, run_rng
from canvaswatch.server.importers.commit_order import MAX_CANVAS, MAX_STEPS, order_known, positions_and_locks, rebuild_content
from canvaswatch.server.importers.fields import Fields, load_run_list
from canvaswatch.server.importers.options import ImportOptions
from canvaswatch.server.importers.text import PAD_ID, TEXT_LIMIT, encode_text, placeholder_ids, ranges

CANVAS_LENGTH = 256


def read_bench(path: Path, options: ImportOptions) -> list[RebuiltRun]:
    return _read(path, options, "bench_order")


def read_poem(path: Path, options: ImportOptions) -> list[RebuiltRun]:
    return _read(path, options, "poem")


def _read(path: Path, options: ImportOptions, format_name: str) -> list[RebuiltRun]:
    data = load_run_list(path)
    return options.each_run(enumerate(data), lambda item: _run(Fields(path.name, f"[{item[0]}]", item[1]), options,
                                                                 format_name))


def _run(fields: Fields, options: ImportOptions, format_name: str) -> RebuiltRun:
    bench = fields.string("bench")
    pid = fields.string("pid")
    steps = fields.integer("T", low=1, high=MAX_STEPS)
    recorded = fields.integer("C", low=1, high=MAX_CANVAS, optional=True)
    if options.canvas_length is not None and recorded is not None and recorded != options.canvas_length:
        raise fields.fail("C", f"the run records a canvas of {recorded} positions, not the {options.canvas_length} required")
    length = options.canvas_length or recorded
    if length is None:  # the capture's canvas, or the content's extent where it reaches past it
        reach = fields.ints("content", high=MAX_CANVAS, what="positions").max(initial=-1)
        length = max(CANVAS_LENGTH, int(reach) + 1)
    text = fields.string("final_text")
    content, content_lock = positions_and_locks(fields, "content", "lock", length, steps)

    ids = encode_text(options.text_encoder(), text)
    truncated = len(text) >= TEXT_LIMIT and len(ids) < content.size
    if truncated:
        ids = ids[:-1]
    if len(ids) > content.size:
        raise fields.fail("final_text", f"tokenises to {len(ids)} ids, more than the {content.size} content positions")
    if ids and max(ids) >= options.vocab_size:
        raise fields.fail("final_text", f"tokenises to id {max(ids)}, outside the vocabulary [0, {options.vocab_size})")
    final = np.full(length, PAD_ID, dtype=np.int64)
    text_positions = content[: len(ids)]
    filler = content[len(ids):]
    final[text_positions] = ids
    final[filler] = placeholder_ids(filler, options.placeholder_base, options.vocab_size)

    rng = run_rng(f"{format_name}-{pid}/drafts", options.seed)
    argmax, decided, roles, order, late = rebuild_content(final, content, content_lock, steps, rng,
                                                          change_prob=options.change_prob,
                                                          neighbour_share=options.neighbour_share)
    attributes = {
        "bench": bench, "task": pid, "content_positions": ranges(content), "text_positions": ranges(text_positions),
        "placeholder_positions": ranges(filler), "text_truncated": str(truncated).lower(),
        "filled": "probabilities,alternatives,undecided_argmax" + (",placeholder_tokens" if filler.size else ""),
        "labels": "non_chronological" if late else "", "labelled": "non_chronological" if order_known(order) else "", **order,
    }
    return RebuiltRun(name=pid, argmax=argmax, decided=decided, final=final, roles=roles, attributes=attributes)
