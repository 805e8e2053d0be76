"""`canvaswatch eval`: how well each monitor separates a labelled trace set.

Labels: each trace's `info.attributes["labels"]` lists, comma-separated, the
monitors that should flag it (empty: none should). Per monitor, a trace is
*flagged* when the monitor raised any flag on it and *scored* by the highest
score among those flags (0 when none). Reported per monitor: precision,
recall, false-positive rate, and AUROC of the scores (Mann-Whitney, ties
count half).

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


def labels_of(trace: pb.Trace) -> set[str]:
    info = trace.info if trace.info.request_id else trace.steps[0].info
    return {label for label in info.attributes.get("labels", "").split(",") if label}


def evaluate(engine: Engine, traces: Iterable[pb.Trace]) -> list[MonitorScore]:
    monitors = [m.name for m in engine.monitors]
    scan = _output_only_scan(engine)
    rows: list[tuple[set[str], dict[str, float]]] = []
    for trace in traces:
        verdict = engine.check_trace(trace)
        scores: dict[str, float] = {}
        for flag in verdict.flags:
            scores[flag.monitor] = max(scores.get(flag.monitor, 0.0), flag.score if flag.score > 0 else 1e-6)
        if scan is not None:
            output = list(trace.steps[-1].output_ids)
            text = engine.vocab.decode(output)
            state = scan.start(RequestMeta("", "", "", (), 1, 0))
            if any(f.attributes.get("survived_to_output") == "true"
                   for f in scan.on_finish(state, FinalCanvas(tuple(output), text, 0, 0))):
                scores[OUTPUT_ONLY] = 1.0
        rows.append((labels_of(trace), scores))
    names = monitors + ([OUTPUT_ONLY] if scan is not None else [])
    return [_score(name, rows) for name in names]


def _output_only_scan(engine: Engine) -> LexiconMonitor | None:
    """The intermediate_context patterns, matched against the final output text only."""
    context = next((m for m in engine.monitors if m.name == "intermediate_context"), None)
    if context is None:
        return None
    p = context.params
    return LexiconMonitor(LexiconParams(patterns=p.patterns, regex=p.regex, case_sensitive=p.case_sensitive))


def _score(name: str, rows: list[tuple[set[str], dict[str, float]]]) -> MonitorScore:
    target = "intermediate_context" if name == OUTPUT_ONLY else name
    positives = [scores.get(name, 0.0) for labels, scores in rows if target in labels]
    negatives = [scores.get(name, 0.0) for labels, scores in rows if target not in labels]
    tp = sum(1 for s in positives if s > 0)
    fp = sum(1 for s in negatives if s > 0)
    return MonitorScore(
        monitor=name, positives=len(positives), negatives=len(negatives), true_positives=tp, false_positives=fp,
        precision=tp / (tp + fp) if tp + fp else 0.0,
        recall=tp / len(positives) if positives else 0.0,
        false_positive_rate=fp / len(negatives) if negatives else 0.0,
        auroc=_auroc(positives, negatives),
    )


def _auroc(positives: list[float], negatives: list[float]) -> float:
    if not positives or not negatives:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def as_table(scores: list[MonitorScore]) -> str:
    lines = ["| monitor | positives | negatives | precision | recall | FPR | AUROC |", "|---|---|---|---|---|---|---|"]
    for s in scores:
        label = f"{s.monitor} (intermediate_context's patterns, final output only)" if s.monitor == OUTPUT_ONLY else s.monitor
        lines.append(f"| {label} | {s.positives} | {s.negatives} | {s.precision:.3f} | {s.recall:.3f} | "
                     f"{s.false_positive_rate:.3f} | {s.auroc:.3f} |")
    return "\n".join(lines)


def as_json(scores: list[MonitorScore]) -> list[dict]:
    return [{k: (None if isinstance(v, float) and v != v else v) for k, v in asdict(s).items()} for s in scores]


__all__ = ["MonitorScore", "OUTPUT_ONLY", "evaluate", "as_table", "as_json", "labels_of"]
