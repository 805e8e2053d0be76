"""`canvaswatch eval`: how well each monitor separates a labelled trace set.

Labels: each trace's `info.attributes["labels"]` lists, comma-separated,
the monitors that should flag it (empty: none should). Two optional
attributes narrow what a label says, for data labelled for some phenomena
only (real captures, server/importers):
  - `labelled`: the monitors the labels speak for (absent: every monitor).
    For a monitor outside it, the trace is *unlabelled*: it counts neither as
    a positive nor as a negative, only toward that monitor's flag rate on
    unlabelled requests (a monitor that fires on most ordinary requests is
    noise on a dashboard, whatever its recall);
  - `label_positions.<monitor>`: canvas positions (e.g. "0-3,17"); a flag of
    that monitor counts only when one of its evidence items touches one of
    them (a revision flagged in the reasoning is not the answer's revision).
Per monitor, a trace is *flagged* when the monitor raised a counted flag on
it and *scored* by the highest score among those (0 when none). Reported:
precision, recall, false-positive rate, AUROC of the scores (Mann-Whitney,
ties count half), monitorability as g-mean² = TPR x TNR (Guan et al., the
metric of "How Transparent is DiffusionGemma?"), and the flag rate on
unlabelled requests.

Beside `intermediate_context`, the same patterns are scanned over the final
output text alone (what an output-only monitor sees), so the number of cases
only the intermediate canvases reveal is shown side by side.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

from canvaswatch.monitors.base import FinalCanvas, RequestMeta
from canvaswatch.monitors.lexicon import LexiconMonitor, LexiconParams
from canvaswatch.server.pipeline.engine import Engine
from canvaswatch.v1 import monitor_pb2 as pb

OUTPUT_ONLY = "output_only_scan"


@dataclass(frozen=True)
class MonitorScore:
    monitor: str
    positives: int
    negatives: int
    true_positives: int
    false_positives: int
    precision: float
    recall: float
    false_positive_rate: float
    auroc: float
    g_mean2: float = float("nan")  # TPR x TNR
    unlabelled: int = 0
    unlabelled_flagged: int = 0

    @property
    def unlabelled_flag_rate(self) -> float:
        return self.unlabelled_flagged / self.unlabelled if self.unlabelled else float("nan")


def _info(trace: pb.Trace) -> pb.RequestInfo:
    return trace.info if trace.info.request_id else trace.steps[0].info


def labels_of(trace: pb.Trace) -> set[str]:
    return {label for label in _info(trace).attributes.get("labels", "").split(",") if label}


def scope_of(trace: pb.Trace) -> set[str] | None:
    """The monitors the trace's labels speak for; None: all of them."""
    value = _info(trace).attributes.get("labelled")
    return None if value is None else {name for name in value.split(",") if name}


def parse_positions(text: str) -> set[int]:
    """"0-3,17" -> {0, 1, 2, 3, 17}; raises ValueError naming the bad part."""
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        first, sep, last = part.partition("-")
        try:
            lo, hi = int(first), int(last) if sep else int(first)
        except ValueError:
            raise ValueError(f"position range {part!r}: expected N or N-M") from None
        if hi < lo:
            raise ValueError(f"position range {part!r}: end before start")
        out.update(range(lo, hi + 1))
    return out


def _counted(flag, positions: set[int] | None) -> bool:
    return positions is None or any(p in positions for e in flag.evidence for p in e.positions)


def evaluate(engine: Engine, traces: Iterable[pb.Trace]) -> list[MonitorScore]:
    monitors = [m.name for m in engine.monitors]
    scan = _output_only_scan(engine)
    rows: list[tuple[set[str], set[str] | None, dict[str, float]]] = []
    for trace in traces:
        attributes = _info(trace).attributes
        where = {name: parse_positions(attributes[f"label_positions.{name}"]) for name in monitors
                 if f"label_positions.{name}" in attributes}
        verdict = engine.check_trace(trace)
        scores: dict[str, float] = {}
        for flag in verdict.flags:
            if _counted(flag, where.get(flag.monitor)):
                scores[flag.monitor] = max(scores.get(flag.monitor, 0.0), flag.score if flag.score > 0 else 1e-6)
        if scan is not None:
            output = list(trace.steps[-1].output_ids)
            text = engine.vocab.decode(output)
            state = scan.start(RequestMeta("", "", "", (), 1, 0))
            if any(f.attributes.get("survived_to_output") == "true"
                   for f in scan.on_finish(state, FinalCanvas(tuple(output), text, 0, 0))):
                scores[OUTPUT_ONLY] = 1.0
        rows.append((labels_of(trace), scope_of(trace), scores))
    names = monitors + ([OUTPUT_ONLY] if scan is not None else [])
    return [_score(name, rows) for name in names]


def _output_only_scan(engine: Engine) -> LexiconMonitor | None:
    """The intermediate_context patterns, matched against the final output text only."""
    context = next((m for m in engine.monitors if m.name == "intermediate_context"), None)
    if context is None:
        return None
    p = context.params
    return LexiconMonitor(LexiconParams(patterns=p.patterns, regex=p.regex, case_sensitive=p.case_sensitive))


def _score(name: str, rows: list[tuple[set[str], set[str] | None, dict[str, float]]]) -> MonitorScore:
    target = "intermediate_context" if name == OUTPUT_ONLY else name
    scoped = [(labels, scores) for labels, scope, scores in rows if scope is None or target in scope]
    unlabelled = [scores.get(name, 0.0) for labels, scope, scores in rows if scope is not None and target not in scope]
    positives = [scores.get(name, 0.0) for labels, scores in scoped if target in labels]
    negatives = [scores.get(name, 0.0) for labels, scores in scoped if target not in labels]
    tp = sum(1 for s in positives if s > 0)
    fp = sum(1 for s in negatives if s > 0)
    recall = tp / len(positives) if positives else 0.0
    fpr = fp / len(negatives) if negatives else 0.0
    return MonitorScore(
        monitor=name, positives=len(positives), negatives=len(negatives), true_positives=tp, false_positives=fp,
        precision=tp / (tp + fp) if tp + fp else 0.0,
        recall=recall,
        false_positive_rate=fpr,
        auroc=_auroc(positives, negatives),
        g_mean2=recall * (1.0 - fpr) if positives and negatives else float("nan"),
        unlabelled=len(unlabelled), unlabelled_flagged=sum(1 for s in unlabelled if s > 0),
    )


def _auroc(positives: list[float], negatives: list[float]) -> float:
    if not positives or not negatives:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def _undefined(s: MonitorScore) -> set[str]:
    """The rates that are 0/0 for this score (no flag, no positive, no negative): n/a, not 0."""
    undefined = set()
    if not s.true_positives + s.false_positives:
        undefined.add("precision")
    if not s.positives:
        undefined.add("recall")
    if not s.negatives:
        undefined.add("false_positive_rate")
    return undefined


def as_table(scores: list[MonitorScore]) -> str:
    lines = ["| monitor | positives | negatives | precision | recall | FPR | AUROC | g-mean² | flagged unlabelled |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in scores:
        label = f"{s.monitor} (intermediate_context's patterns, final output only)" if s.monitor == OUTPUT_ONLY else s.monitor
        rate = f"{s.unlabelled_flagged}/{s.unlabelled} ({s.unlabelled_flag_rate:.2f})" if s.unlabelled else "-"
        undefined = _undefined(s)

        def cell(key: str) -> str:
            value = getattr(s, key)
            return "n/a" if key in undefined or value != value else f"{value:.3f}"

        lines.append(f"| {label} | {s.positives} | {s.negatives} | {cell('precision')} | {cell('recall')} | "
                     f"{cell('false_positive_rate')} | {cell('auroc')} | {cell('g_mean2')} | {rate} |")
    return "\n".join(lines)


def as_json(scores: list[MonitorScore]) -> list[dict]:
    """Rates that are undefined (0/0, or AUROC without both classes) are null."""
    rows = []
    for s in scores:
        undefined = _undefined(s)
        row = {**asdict(s), "unlabelled_flag_rate": s.unlabelled_flag_rate}
        rows.append({k: (None if k in undefined or (isinstance(v, float) and v != v) else v) for k, v in row.items()})
    return rows


__all__ = ["MonitorScore", "OUTPUT_ONLY", "evaluate", "as_table", "as_json", "labels_of", "parse_positions", "scope_of"]
