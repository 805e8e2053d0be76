"""gallery.json: labelled runs with the full argmax canvas and the sampler's accepted mask at every step.

Format (a list of runs): `name`, `label`, `why`, `outcome` (may be absent or
null), `T` (steps), `C` (canvas), `params` (`seed`, `t_max`, `t_min`,
`entropy_bound`), `pad_ids`, `t_end`, `frames[t][pos]` (argmax id),
`committed[t][pos]` (1 where the entropy-bound sampler had accepted the
position), optional `swap_k`. Read: all of these; `id2str` (a partial piece
table) and `margin` are not needed.

Rebuilt run: the frames are the argmax canvases, unchanged (real ids);
`committed` is the decided mask (and the steps' `accepted` signal); the final
canvas is the last frame (the trace's `output_ids`); the steps' `temperature`
runs linearly from `t_max` to `t_min`. Roles: positions whose final token is in `pad_ids`
are template, the rest content (reasoning curve under the entropy rule).
Filled: probabilities and alternatives only (canvas.py, rules.py).

Attributes: `label`, `why`, `outcome`, `t_end`, `swap_k`, the sampler
parameters (`t_max`, `t_min`, `entropy_bound`, `sampler_seed`), `regime`
(`default` for 0.8 -> 0.4 with bound 0.1, `hot` for 1.3 -> 0.8 with bound 0.3,
the real model's default and hot samplers; `custom` otherwise), `content_positions`,
and `curated` = true: these runs were picked to show phenomena, several with
interventions (planted text, prompt swaps, a clamped ending), so they are not
a sample of ordinary traffic.

Labels, from what `label` and `why` say (case-insensitive patterns; quoted
text ('eight', «...») is left out first, since it is what the model wrote, not
what the run shows; a match whose clause says "no", "not", "never", "without",
"nothing", "none", "nor", "neither", "cannot", "fails to" or "-n't" before it
does not count: "the count is never revised" names what a run lacks. A clause
ends at punctuation or at "and", "but", "then". The phrases that made each
label are kept in the `label_evidence` attribute, for a person to check):
  - self_correction: "revise(s/d/ing)", "repair" or "self-correct...": the
    model states a count, then rewrites it (the "eight" -> "seven" self-count
    repair). Not "revision", which the acrostic run uses for room to revise,
    not a revision seen; not "correct(ed)" or "rewritten", which describe
    interventions as often (a prompt corrected or rewritten at step 2).
  - intermediate_context: "wiped" or "erased": a text present in the
    intermediate canvases is gone from the output (the planted news report wiped
    in one step). The model did not write it, so it is not a self-correction of
    its own answer.
  - non_chronological: "skeleton-first", "before the filler", "pinned" or
    "clamped": content settles far out of left-to-right order (scattered
    content words before the filler between them; an ending fixed first and
    bridged into). Also when the content commits late-first by each position's
    last change step (commit_order.py), which no gallery run does.
Runs matching none (the escape, the trap, the acrostic, the prompt swaps, the
whisper) carry no label. `labelled` = the run's own labels: a `why` says what a
run shows, not what it lacks (the acrostic's revisions, the swaps' vanished
news state), so no gallery run is a negative for any monitor; for every
monitor it is not labelled for, it counts toward the flag rate on unlabelled
requests (server/evaluation/evaluate.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from canvaswatch.server.importers.canvas import ROLE_OTHER, ROLE_REASONING, RebuiltRun
from canvaswatch.server.importers.commit_order import MAX_STEPS, order_attributes
from canvaswatch.server.importers.fields import Fields, int_array, load_run_list
from canvaswatch.server.importers.options import ImportOptions
from canvaswatch.server.importers.text import ranges

LABEL_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("self_correction", re.compile(r"\brevis(?:e|es|ed|ing)\b|\brepair\w*|\bself-correct\w*")),
    ("intermediate_context", re.compile(r"\b(?:wiped|erased)\b")),
    ("non_chronological", re.compile(r"skeleton-first|before the filler|\bpinned\b|\bclamped\b")),
)
NEGATION = re.compile(r"\b(?:no|not|never|without|nothing|none|nor|neither|cannot|fails? to|failing to)\b|n['\u2019]t\b")
# a match's clause starts after the last of these
CLAUSE_END = re.compile(r"[.;:!?,()\u2014\u2013\u2192]|\s-\s|\b(?:and|but|then)\b")
# quoted text, whose quotes stand apart from words (the apostrophe of "doesn't" opens nothing)
QUOTED = re.compile(r"(?<!\w)'[^']*'(?!\w)|\u2018[^\u2019]*\u2019|\u201c[^\u201d]*\u201d|\"[^\"]*\"|\u00ab[^\u00bb]*\u00bb")
REGIMES = {(0.8, 0.4, 0.1): "default", (1.3, 0.8, 0.3): "hot"}


def read(path: Path, options: ImportOptions) -> list[RebuiltRun]:
    data = load_run_list(path)
    return options.each_run(enumerate(data), lambda item: _run(Fields(path.name, f"[{item[0]}]", item[1]), options))


def labels_from_text(label: str, why: str) -> list[str]:
    return list(label_evidence(label, why))


def label_evidence(label: str, why: str) -> dict[str, list[str]]:
    """Each label the text gives, with the phrases (not negated, outside quotes) that gave it."""
    text = QUOTED.sub(" ", f"{label}. {why}".lower())
    found: dict[str, list[str]] = {}
    for name, pattern in LABEL_PATTERNS:
        phrases = [match.group(0) for match in pattern.finditer(text) if not _negated(text, match.start())]
        if phrases:
            found[name] = phrases
    return found


def _negated(text: str, at: int) -> bool:
    """Whether the clause holding position `at` says no/not/never/without before it."""
    clause = CLAUSE_END.split(text[:at])[-1]
    return NEGATION.search(clause) is not None


def _run(fields: Fields, options: ImportOptions) -> RebuiltRun:
    name = fields.string("name")
    label = fields.string("label")
    why = fields.string("why")
    outcome = fields.string("outcome", optional=True) if fields.has("outcome") else None
    steps = fields.integer("T", low=1, high=MAX_STEPS)
    length = fields.integer("C", low=1)
    params = fields.child("params")
    t_max, t_min = params.number("t_max"), params.number("t_min")
    bound = params.number("entropy_bound")
    sampler_seed = params.integer("seed", optional=True)
    pad_ids = fields.ints("pad_ids", high=options.vocab_size, what="ids")
    t_end = fields.integer("t_end", low=0, optional=True)
    swap_k = fields.integer("swap_k", low=0, optional=True) if fields.has("swap_k") else None
    frames = int_array(fields.raw("frames"), fields.file, fields.where("frames"), ndim=2, shape=(steps, length),
                       high=options.vocab_size, what="ids")
    committed = int_array(fields.raw("committed"), fields.file, fields.where("committed"), ndim=2,
                          shape=(steps, length), high=2, what="flags (0 or 1)")

    final = frames[-1].copy()
    content = ~np.isin(final, pad_ids)
    roles = np.where(content, ROLE_REASONING, ROLE_OTHER).astype(np.int8)
    changed = np.zeros((steps, length), dtype=bool)
    changed[1:] = frames[1:] != frames[:-1]
    last_change = np.where(changed.any(axis=0), steps - 1 - np.argmax(changed[::-1], axis=0), 0)
    order, late = order_attributes(last_change[content])
    evidence = label_evidence(label, why)
    labels = list(evidence)
    if late and "non_chronological" not in labels:
        labels.append("non_chronological")
    regime = REGIMES.get((round(t_max, 3), round(t_min, 3), round(bound, 3)), "custom")
    attributes = {
        "label": label, "why": why, "regime": regime, "t_max": f"{t_max:g}", "t_min": f"{t_min:g}",
        "entropy_bound": f"{bound:g}", "pad_ids": ",".join(map(str, pad_ids.tolist())),
        "content_positions": ranges(np.nonzero(content)[0]), "curated": "true",
        "filled": "probabilities,alternatives", "labels": ",".join(labels), "labelled": ",".join(labels), **order,
        "label_evidence": "; ".join(f"{name}: {', '.join(phrases)}" for name, phrases in evidence.items()),
    }
    for key, value in (("outcome", outcome), ("t_end", t_end), ("swap_k", swap_k), ("sampler_seed", sampler_seed)):
        if value is not None:
            attributes[key] = str(value)
    # DiffusionGemma's schedule: linear from t_max at the first step to t_min at the last
    temperature = np.linspace(t_max, t_min, steps) if steps > 1 else np.array([t_max])
    if (temperature <= 0).any():
        raise fields.fail("params", f"temperatures must be > 0, got t_max {t_max:g}, t_min {t_min:g}")
    return RebuiltRun(name=name, argmax=frames, decided=committed.astype(bool), final=final, roles=roles,
                      attributes=attributes, temperature=temperature, accepted_source="real")
