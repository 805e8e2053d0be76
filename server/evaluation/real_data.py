"""Score the monitors on the real DiffusionGemma captures (../shared/real), under every import rule.

One call imports each capture (server/importers) once per probability rule, with and without
the sampler's signals on the wire, runs the engine's monitors over every trace and scores them
with `evaluate` (labels from the data's own fields; see docs/importers.md). `requirements`
then states what the monitors must hold on real dynamics and whether they do:

  - self_correction: recall >= 0.8 on clean.json's revised answers (flags counted at the
    answer's positions) at FPR <= 0.1 on its answer-stable runs;
  - every INFO-level monitor: flags <= 10% of ordinary requests (bench_order, films, poems),
    except where the file labels its phenomenon, where its FPR is held to the same 10%;
  - every gallery case labelled with a monitor's phenomenon is flagged by it.

A requirement must hold under every rule: a monitor that passes under one only is tuned to
the rule, not to the model. A requirement is stated only where its data exists: recall needs
revised answers, an FPR needs negatives (a capture with none of them proves nothing either way).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from canvaswatch.monitors.base import Severity
from canvaswatch.server.evaluation.evaluate import OUTPUT_ONLY, MonitorScore, evaluate
from canvaswatch.server.importers import DEFAULT_K, FORMATS, CaptureError, import_capture
from canvaswatch.server.pipeline.engine import Engine

ORDINARY = ("bench_order", "films", "poem")
MAX_ORDINARY_FLAG_RATE = 0.10
MIN_REVISION_RECALL, MAX_REVISION_FPR = 0.8, 0.1
CURVES_FILE = "anim_curves.json"  # the entropy rule's curves


@dataclass(frozen=True)
class Run:
    """One capture imported one way: which file, which probability rule, signals on the wire or not."""

    capture: str
    rule: str
    signals: bool

    @property
    def name(self) -> str:
        return f"{self.capture}/{self.rule}/{'signals' if self.signals else 'top-k only'}"


@dataclass(frozen=True)
class Requirement:
    monitor: str
    run: Run
    what: str
    value: float
    limit: float
    holds: bool


def capture_paths(real: Path, overrides: dict[str, Path] | None = None) -> tuple[dict[str, Path], list[str]]:
    """({capture: file} to score, [captures whose file is absent]): each capture's file under `real` by
    its usual name (FORMATS), or the file `overrides` gives it; with overrides, only those captures.
    The entropy rule reads the anim_curves.json beside each file, else the one under `real`."""
    if overrides:
        unknown = sorted(set(overrides) - set(FORMATS))
        if unknown:
            raise ValueError(f"unknown capture {unknown[0]!r}; one of {', '.join(FORMATS)}")
        wanted = dict(overrides)
    else:
        wanted = {name: real / spec.file for name, spec in FORMATS.items()}
    present = {name: path for name, path in wanted.items() if path.is_file()}
    return present, [name for name in wanted if name not in present]


def score_runs(engine: Engine, real: Path, *, captures: Iterable[str] | None = None,
               rules: Iterable[str] = ("committed", "entropy"), signals: Iterable[bool] = (True, False),
               limit: int | None = None, paths: dict[str, Path] | None = None,
               on_invalid: Callable[[CaptureError], None] | None = None,
               on_unusable: Callable[[str, CaptureError], None] | None = None, k: int = DEFAULT_K,
               seed: int = 0) -> dict[Run, list[MonitorScore]]:
    """Every (capture, rule, signals) combination's per-monitor scores. `captures`: which (default: those of
    `paths`, else all). `limit`: at most that many runs a file. `paths`: each capture's file (capture_paths);
    default: its usual name under `real`. `on_invalid`: as import_capture's (None: a malformed run refuses
    its file). `on_unusable`: a capture that cannot be imported at all (no valid run, not the format, no
    curves) is handed to it and left out (None: raised). `k`, `seed`: the traces' top-k width and the fill
    rules' seed (the requirements should not depend on either)."""
    if captures is None:
        captures = tuple(paths) if paths is not None else tuple(FORMATS)
    out: dict[Run, list[MonitorScore]] = {}
    for capture in captures:
        path = paths[capture] if paths is not None else real / FORMATS[capture].file
        scored: dict[Run, list[MonitorScore]] = {}
        try:
            for rule in rules:
                for with_signals in signals:
                    traces = import_capture(capture, path, rule=rule, signals=with_signals, encoder=engine.vocab,
                                            curves=_curves_for(path, real), on_invalid=on_invalid, k=k, seed=seed)
                    scored[Run(capture, rule, with_signals)] = evaluate(engine, traces[:limit])
        except CaptureError as err:
            if on_unusable is None:
                raise
            on_unusable(capture, err)
            continue
        out.update(scored)
    return out


def _curves_for(path: Path, real: Path) -> Path:
    beside = path.parent / CURVES_FILE
    return beside if beside.is_file() else real / CURVES_FILE


def requirements(engine: Engine, scores: dict[Run, list[MonitorScore]]) -> list[Requirement]:
    """Each requirement of the module docstring, per run it applies to."""
    info_level = {m.name for m in engine.monitors if getattr(m, "severity", None) == Severity.INFO}
    found: list[Requirement] = []
    for run, rows in scores.items():
        for s in rows:
            if s.monitor == OUTPUT_ONLY:  # the output-only comparison is expected to miss; it is no monitor
                continue
            if run.capture == "clean" and s.monitor == "self_correction":
                if s.positives:
                    found.append(Requirement(s.monitor, run, "recall on revised answers", s.recall,
                                             MIN_REVISION_RECALL, s.recall >= MIN_REVISION_RECALL))
                if s.negatives:
                    found.append(Requirement(s.monitor, run, "FPR on answer-stable runs", s.false_positive_rate,
                                             MAX_REVISION_FPR, s.false_positive_rate <= MAX_REVISION_FPR))
            if run.capture in ORDINARY and s.monitor in info_level:
                if s.unlabelled:
                    rate = s.unlabelled_flag_rate
                    found.append(Requirement(s.monitor, run, "flag rate on ordinary requests", rate,
                                             MAX_ORDINARY_FLAG_RATE, rate <= MAX_ORDINARY_FLAG_RATE))
                if s.negatives:
                    found.append(Requirement(s.monitor, run, "FPR on ordinary requests it labels",
                                             s.false_positive_rate, MAX_ORDINARY_FLAG_RATE,
                                             s.false_positive_rate <= MAX_ORDINARY_FLAG_RATE))
            if run.capture == "gallery" and s.positives:
                found.append(Requirement(s.monitor, run, "labelled gallery cases flagged", s.recall, 1.0,
                                         s.recall >= 1.0))
    return found


def as_table(found: list[Requirement]) -> str:
    lines = ["| monitor | run | requirement | value | limit | holds |", "|---|---|---|---|---|---|"]
    for r in sorted(found, key=lambda r: (r.monitor, r.what, r.run.name)):
        lines.append(f"| {r.monitor} | {r.run.name} | {r.what} | {r.value:.3f} | {r.limit:.2f} | "
                     f"{'yes' if r.holds else '**no**'} |")
    return "\n".join(lines)


__all__ = ["ORDINARY", "Requirement", "Run", "as_table", "capture_paths", "requirements", "score_runs"]
