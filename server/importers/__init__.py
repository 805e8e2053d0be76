"""Importers: real DiffusionGemma captures (../shared/real) turned into `.cwtrace` traces.

    traces = import_capture("clean", Path("../shared/real/clean.json"), rule="entropy", k=4)

One module per capture family: `gallery` (full argmax frames and the accepted
mask per step), `clean` (answer and reasoning lock steps, the answer's
trajectory), `bench_order` (bench_order.json and poem_order.json: lock steps
and the text's first 300 characters), `films` (lock steps only). Shared rules:
`commit_order` (canvases rebuilt from lock steps, the commit-order label),
`canvas` (alternatives, the trace itself), `rules` (the two probability
rules), `text` (tokenising, placeholders). docs/importers.md has every rule in
one place.

Real Gemma ids pass through unchanged. What a capture lacks is filled by a
documented rule, and each trace says so in `RequestInfo.attributes`: `source`
(`real:<file>`), `rule`, `filled`, plus the labels the data carries and
`labels` (comma-separated monitor names that should flag, as
server.evaluation.evaluate reads them). Malformed input raises `CaptureError`
with one line naming the file and the field.

Never commit the captures or anything made from them (their README): write
imported traces outside the repository.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from canvaswatch.server.importers import bench_order, clean, films, gallery
from canvaswatch.server.importers.canvas import RebuiltRun, to_trace
from canvaswatch.server.importers.commit_order import MAX_CANVAS, MAX_STEPS
from canvaswatch.server.importers.fields import CaptureError
from canvaswatch.server.importers.options import ImportOptions
from canvaswatch.server.importers.rules import RULES, EntropyRule, make_rule
from canvaswatch.v1 import monitor_pb2 as pb


@dataclass(frozen=True)
class CaptureFormat:
    name: str
    file: str          # the capture's file name in ../shared/real
    read: Callable[[Path, ImportOptions], list[RebuiltRun]]
    description: str
    shape_options: frozenset[str] = frozenset()  # of canvas_length / steps, those this format reads (others: refused)


FORMATS: dict[str, CaptureFormat] = {
    "gallery": CaptureFormat("gallery", "gallery.json", gallery.read,
                             "labelled runs: argmax frames and accepted mask per step"),
    "clean": CaptureFormat("clean", "clean.json", clean.read,
                           "problem rollouts: answer/reasoning lock steps and the answer's trajectory",
                           frozenset({"canvas_length", "steps"})),
    "bench_order": CaptureFormat("bench_order", "bench_order.json", bench_order.read_bench,
                                 "GPQA/MATH/HumanEval/WildChat: lock steps and the text's start",
                                 frozenset({"canvas_length"})),
    "films": CaptureFormat("films", "films_order.json", films.read, "small reasoning tasks: lock steps only",
                           frozenset({"canvas_length"})),
    "poem": CaptureFormat("poem", "poem_order.json", bench_order.read_poem, "poems: lock steps and the text",
                          frozenset({"canvas_length"})),
}

DEFAULT_K = 4
MAX_K = 1024  # as dense.k: a top-k wider than this is no bottleneck
_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(ImportOptions) if not f.name.startswith("_"))


def import_capture(format: str, path: Path, *, rule: str = "committed", k: int = DEFAULT_K,
                   curves: Path | None = None, **opts: Any) -> list[pb.Trace]:
    """Every run of the capture at `path` as a Trace (in the file's order).

    `rule`: "committed" or "entropy" (rules.py). `k`: top-k width. `curves`:
    anim_curves.json for the entropy rule (default: beside `path`). `opts`:
    ImportOptions fields (seed, vocab_size, canvas_length, steps,
    placeholder_base, change_prob, neighbour_share, signals, tokenizer, encoder, on_invalid).
    Raises CaptureError for malformed input (with `on_invalid`, a malformed run is handed to it
    and skipped instead), ValueError for bad arguments.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown capture format {format!r}; one of {', '.join(FORMATS)}")
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; one of {', '.join(RULES)}")
    if not isinstance(k, int) or not 1 <= k <= MAX_K:
        # the traces hold [steps, L, k] ids and probabilities: --k 100000 grew past 11 GB without a word
        raise ValueError(f"k must be an integer in [1, {MAX_K}] (the sidecar's own bound on dense.k), got {k!r}")
    unknown = sorted(set(opts) - set(_OPTION_NAMES))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r}; options: {', '.join(_OPTION_NAMES)}")
    options = ImportOptions(**opts)
    if options.steps is not None and not 1 <= options.steps <= MAX_STEPS:
        raise ValueError(f"steps must be in [1, {MAX_STEPS}], got {options.steps}")
    if options.canvas_length is not None and not 1 <= options.canvas_length <= MAX_CANVAS:
        raise ValueError(f"canvas_length must be in [1, {MAX_CANVAS}], got {options.canvas_length}")
    spec = FORMATS[format]
    for knob in ("canvas_length", "steps"):  # a setting the format does not read is refused, not ignored
        if getattr(options, knob) is not None and knob not in spec.shape_options:
            readers = ", ".join(name for name, spec in FORMATS.items() if knob in spec.shape_options)
            raise ValueError(f"{knob}: the {format} capture records its own; only {readers} take{'s' if ',' not in readers else ''} it")
    path = Path(path)
    probabilities = make_rule(rule, Path(curves) if curves is not None else path.parent / "anim_curves.json") \
        if rule == "entropy" else make_rule(rule, None)
    runs = spec.read(path, options)
    if not runs:
        raise CaptureError(path.name, "(top level)", "no valid runs in the file" if options.on_invalid else "no runs in the file")
    traces = []
    for run in runs:
        extra = {}
        if isinstance(probabilities, EntropyRule):
            extra["curves"] = f"{probabilities.curves.source}:{probabilities.curves.for_run(run.curve_key)[2]}"
        traces.append(to_trace(run, probabilities, k=k, seed=options.seed, format_name=format,
                               source=path.name, extra=extra, signals=options.signals))
    return traces


__all__ = ["CaptureError", "CaptureFormat", "DEFAULT_K", "FORMATS", "ImportOptions", "RULES", "import_capture"]
