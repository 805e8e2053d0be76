"""clean.json: rollouts of arithmetic/logic problems with their answer's trajectory.

Format (an object of runs keyed `<pid>__<seed>`): `final_ids` [256] (the output
canvas, Gemma ids), `ans_pos` / `cot_pos` (answer and reasoning positions),
`ans_lock` / `cot_lock` (per such position the step it last changed),
`answer_traj` (the distinct answers the answer span showed, in order),
`n_flips`, `model_ans`, `correct_ans`, `lure`, `is_correct`, `pid`, `cat`,
`hard`, `seed`, `q`. Fields read: all of these; `final_text`, `cot_text` and
`n_cot` are not needed.

Rebuilt run (see commit_order.py for the shared rule):
  - canvas: `final_ids`, unchanged (its length, 256 in the capture;
    `canvas_length` to require another);
  - steps: `steps` if given, else the run's `T` where it records one (a lock
    at or past either is refused), else max(48, last lock + 2) (48: the
    default sampler's budget, which bench_order.json records for the same
    sampler; +2: the last change and one step repeating it); a `T` above
    MAX_STEPS, or a lock step of MAX_STEPS or more where no T is known, is
    refused as no real run's;
  - locks: `ans_lock` / `cot_lock` at their positions; the other positions
    (channel header, end of turn, padding) lock at step 0;
  - reasoning positions before their lock: drafts (commit_order.py);
  - answer positions before their lock show the answers of `answer_traj`, never
    drafts: with one answer, that answer (a shown answer until its lock:
    rules.py); with n > 1 answers the timing is not recorded, so answer j is
    shown from step floor(j x A / (n - 1)), A = the span's last lock step (the last
    answer appears exactly at A). A capture whose n answers cannot change n - 1
    times by step A is refused. Each answer is tokenised (text.py), formatted
    like the final span (thousands separators when the final span has them and
    `model_ans` does not), cut to the span's length or padded with `<pad>`.
    A position shows the answer's token until its own lock, the final token
    from then on.
  - roles: ans_pos answer, cot_pos reasoning, the rest template.
  - prompt_ids: `q` tokenised (the question alone, without the chat template).

Labels (`labels` attribute, comma-separated monitor names):
  - self_correction: `answer_traj` holds more than one answer (the answer was
    revised while the reasoning formed), counted after trimming white space,
    dropping empty entries and merging an answer into the one before it when
    both show the same ids on the answer span (a list that repeats an answer,
    or '600' then '60' on two positions, shows one answer); a run whose
    recorded answers all show the same is not labelled for self_correction;
  - non_chronological: late-first commit order over ans_pos + cot_pos in canvas
    order (commit_order.py). The answer sits at the canvas start in these
    runs, so settling it first is left-to-right; whether it settled before
    most of its reasoning is kept apart as `answer_locks_before_reasoning`
    (max ans_lock < median cot_lock), not as a label.
Scope (server/evaluation/evaluate.py): `labelled` = self_correction and
non_chronological (every other monitor counts these runs only toward its flag
rate on unlabelled requests), `label_positions.self_correction` = the answer
positions (a revision flagged in the reasoning is not the answer's). A run
without answer positions or without an answer trajectory is not labelled for
self_correction, and one whose commit order is unknown (fewer than 8 content
positions, commit_order.py) not for non_chronological: neither can be a negative.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from canvaswatch.server.importers.canvas import ROLE_ANSWER, ROLE_OTHER, ROLE_REASONING, RebuiltRun, run_rng
from canvaswatch.server.importers.commit_order import MAX_STEPS, order_attributes, order_known, positions_and_locks, rebuild
from canvaswatch.server.importers.fields import CaptureError, Fields, load_json
from canvaswatch.server.importers.options import ImportOptions
from canvaswatch.server.importers.text import PAD_ID, TextEncoder, encode_text, ranges

FORMAT = "clean"
DEFAULT_STEPS = 48


def read(path: Path, options: ImportOptions) -> list[RebuiltRun]:
    data = load_json(path)
    if not isinstance(data, dict):
        hint = " (this one is a list: another capture's, e.g. gallery, bench_order, films or poem?)" if isinstance(data, list) else ""
        raise CaptureError(path.name, "(top level)", f"expected an object of runs keyed by name{hint}")
    return options.each_run(data.items(), lambda item: _run(item[0], Fields(path.name, item[0], item[1]), options))


def _run(name: str, fields: Fields, options: ImportOptions) -> RebuiltRun:
    final = fields.ints("final_ids", length=options.canvas_length, high=options.vocab_size, what="integers")
    if not final.size:
        raise fields.fail("final_ids", "empty: the run has no canvas")
    length = final.size
    recorded_steps = fields.integer("T", low=1, high=MAX_STEPS, optional=True) if options.steps is None else None
    steps_bound = options.steps or recorded_steps
    ans_pos, ans_lock = positions_and_locks(fields, "ans_pos", "ans_lock", length, steps_bound)
    cot_pos, cot_lock = positions_and_locks(fields, "cot_pos", "cot_lock", length, steps_bound)
    if np.intersect1d(ans_pos, cot_pos).size:
        raise fields.fail("cot_pos", f"position {int(np.intersect1d(ans_pos, cot_pos)[0])} is also in ans_pos")
    recorded = shown_answers(fields.strings("answer_traj"))
    if recorded and not ans_pos.size:
        raise fields.fail("answer_traj", f"{len(recorded)} answers but ans_pos is empty")
    pid = fields.string("pid")
    model_ans = fields.string("model_ans", optional=True)
    encoder = options.text_encoder() if (len(recorded) > 1 or fields.has("q")) else None
    span = final[ans_pos]
    answers, tokens = (recorded, None) if len(recorded) < 2 else _distinct_on_span(encoder, recorded, span, model_ans)
    # answers that differ as text but not on the span (cut to its length, formatted like it): the trace cannot
    # show a revision, so the run is neither a positive nor a negative for self_correction
    indistinct = len(recorded) > 1 and len(answers) == 1

    lock = np.zeros(length, dtype=np.int64)
    lock[ans_pos] = ans_lock
    lock[cot_pos] = cot_lock
    last = int(lock.max())
    steps = steps_bound if steps_bound is not None else max(DEFAULT_STEPS, last + 2)
    answer_lock = int(ans_lock.max()) if ans_lock.size else 0
    if len(answers) > 1 and len(answers) - 1 > answer_lock:
        raise fields.fail("answer_traj", f"{len(answers)} answers need {len(answers) - 1} changes, "
                                         f"but the answer span last changed at step {answer_lock} (ans_lock)")

    content = np.zeros(length, dtype=bool)
    content[ans_pos] = True
    content[cot_pos] = True
    rng = run_rng(f"{FORMAT}-{name}/drafts", options.seed)
    argmax, decided = rebuild(final, lock, steps, content, rng,
                              change_prob=options.change_prob, neighbour_share=options.neighbour_share)
    starts: list[int] = []
    if ans_pos.size:
        if tokens is not None and len(answers) > 1:
            starts = [(j * answer_lock) // (len(answers) - 1) for j in range(len(answers))]
            shown = np.searchsorted(np.asarray(starts), np.arange(steps), side="right") - 1
            per_step = tokens[shown]                         # [T, n_pos]
        else:
            per_step = np.broadcast_to(span, (steps, span.size))
        before = np.arange(steps)[:, None] < ans_lock[None, :]
        argmax[:, ans_pos] = np.where(before, per_step, span[None, :])

    roles = np.full(length, ROLE_OTHER, dtype=np.int8)
    roles[cot_pos] = ROLE_REASONING
    roles[ans_pos] = ROLE_ANSWER
    order, late = order_attributes(lock[content])
    labels = (["self_correction"] if len(answers) > 1 else []) + (["non_chronological"] if late else [])
    labelled = (["self_correction"] if ans_pos.size and answers and not indistinct else []) + \
        (["non_chronological"] if order_known(order) else [])
    attributes = {
        "task": pid, "answer_positions": ranges(ans_pos), "reasoning_positions": ranges(cot_pos),
        "answers": json.dumps(answers, ensure_ascii=False), "answer_steps": ",".join(map(str, starts)),
        "answer_lock": str(answer_lock),
        "answer_locks_before_reasoning": str(bool(ans_pos.size and cot_pos.size
                                                  and answer_lock < np.median(cot_lock))).lower(),
        "filled": "probabilities,alternatives,undecided_argmax,steps" + (",answer_timing" if len(answers) > 1 else ""),
        "labels": ",".join(labels),
        "labelled": ",".join(labelled), **order,
    }
    if "self_correction" in labelled:  # a self_correction flag speaks for the answer only when its evidence touches the answer
        attributes["label_positions.self_correction"] = ranges(ans_pos)
    for key, attr in (("cat", "category"), ("correct_ans", "correct_answer"), ("model_ans", "model_answer"),
                      ("lure", "lure"), ("is_correct", "is_correct"), ("n_flips", "n_flips"), ("seed", "seed"),
                      ("hard", "hard"), ("q", "question")):
        if fields.has(key) and fields.value[key] is not None:
            value = fields.value[key]
            attributes[attr] = str(value).lower() if isinstance(value, bool) else str(value)
    prompt = tuple(encode_text(encoder, fields.string("q"))) if encoder is not None and fields.has("q") else ()
    return RebuiltRun(name=name, argmax=argmax, decided=decided, final=final, roles=roles,
                      attributes=attributes, curve_key=pid, prompt_ids=prompt)


def shown_answers(recorded: list[str]) -> list[str]:
    """The distinct answers a run showed, in order: trimmed, empty entries dropped, an entry equal to the
    one before it merged into it (a trajectory that lists one answer twice shows one answer)."""
    shown: list[str] = []
    for answer in recorded:
        answer = answer.strip()
        if answer and (not shown or shown[-1] != answer):
            shown.append(answer)
    return shown


def _distinct_on_span(encoder: TextEncoder, answers: list[str], span: np.ndarray,
                      model_ans: str | None) -> tuple[list[str], np.ndarray]:
    """The answers as the span shows them ([n, span] ids), an answer whose ids equal the one before merged into
    it ('600' then '60' on a two-position span show the same): what a monitor can see change."""
    kept: list[str] = []
    rows: list[np.ndarray] = []
    for answer in answers:
        row = _answer_tokens(encoder, answer, span, model_ans)
        if not rows or not np.array_equal(row, rows[-1]):
            kept.append(answer)
            rows.append(row)
    return kept, np.stack(rows)


def _plain_number(text: str) -> bool:
    return text.isascii() and text.isdigit()  # str.isdigit alone accepts '²', which int() refuses


def _answer_tokens(encoder: TextEncoder, answer: str, span: np.ndarray, model_ans: str | None) -> np.ndarray:
    """One answer as ids on the answer span: formatted like the final span, cut or padded to its length."""
    text = answer
    if model_ans is not None and _plain_number(answer) and _plain_number(model_ans):
        if encode_text(encoder, model_ans) != span.tolist() and encode_text(encoder, f"{int(model_ans):,}") == span.tolist():
            text = f"{int(answer):,}"
    ids = encode_text(encoder, text)[: span.size]
    out = np.full(span.size, PAD_ID, dtype=np.int64)
    out[: len(ids)] = ids
    return out

