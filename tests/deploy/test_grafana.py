"""Every dashboard query names metrics the sidecar exports or recording rules that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import generate_latest

from canvaswatch.server.ops.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _exported_series() -> set[str]:
    metrics = Metrics()
    # make every labelled family produce samples, so the exposition lists all series names
    metrics.steps.labels("m").inc()
    metrics.requests.labels("m", "ok").inc()
    metrics.flags.labels("lexicon", "WARNING", "m").inc()
    metrics.monitor_seconds.labels("lexicon").observe(0.001)
    metrics.decode_seconds.labels("topk").observe(0.001)
    metrics.monitor_errors.labels("lexicon", "exception").inc()
    metrics.steps_dropped.labels("m").inc()
    text = generate_latest(metrics.registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_dashboard_queries_use_exported_metrics_and_existing_recording_rules():
    dashboard = json.loads((DEPLOY / "grafana" / "canvaswatch.json").read_text())
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    exported = _exported_series()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 11
    used_metrics = {name for e in exprs for name in re.findall(r"\bcanvaswatch_[a-z_]+", e)}
    used_rules = {name for e in exprs for name in re.findall(r"\bcanvaswatch:[a-z_0-9:]+", e)}
    assert used_metrics <= exported, used_metrics - exported
    assert used_rules <= recorded, used_rules - recorded
    # every rule's own inputs are exported metrics too
    rule_inputs = {name for g in rules["groups"] for r in g["rules"] for name in re.findall(r"\bcanvaswatch_[a-z_]+", r["expr"])}
    assert rule_inputs <= exported, rule_inputs - exported


def test_dashboard_covers_what_the_issue_asks():
    titles = " | ".join(p["title"].lower() for p in json.loads((DEPLOY / "grafana" / "canvaswatch.json").read_text())["panels"])
    for needed in ("flags", "top monitors", "monitor latency", "decode latency", "residual mass", "dropped", "active streams"):
        assert needed in titles, needed
