"""`canvaswatch eval` on the labelled simulated corpus: scores, the output-only baseline, JSON."""

from __future__ import annotations

import json

from canvaswatch.client import simulate
from canvaswatch.client.trace import write_traces
from canvaswatch.server.cli import main
from canvaswatch.server.config import default_config
from canvaswatch.server.dense import DenseDecoder
from canvaswatch.server.engine import Engine
from canvaswatch.server.evaluate import OUTPUT_ONLY, _auroc, evaluate


def test_auroc_counts_ties_as_half():
    assert _auroc([1.0, 0.8], [0.1, 0.0]) == 1.0
    assert _auroc([0.0], [0.0]) == 0.5
    assert _auroc([0.2, 0.9], [0.5]) == 0.5


def test_each_default_monitor_separates_its_scenarios(vocab):
    engine = Engine(default_config(), vocab, dense=DenseDecoder(None, vocab.size))
    traces = simulate.labelled_corpus(vocab.encode, vocab.size, per_scenario=3, seed=7)
    scores = {s.monitor: s for s in evaluate(engine, traces)}
    for name in ("lexicon", "self_correction", "non_chronological", "token_smearing", "sequence_smearing",
                 "intermediate_context", "transparency"):
        assert scores[name].recall >= 0.95 and scores[name].false_positive_rate <= 0.05, scores[name]
    # The same patterns over the final output alone miss every intermediate-only case.
    assert scores[OUTPUT_ONLY].recall == 0.0 and scores[OUTPUT_ONLY].positives == 3


def test_eval_command_prints_and_writes_json(vocab, tmp_path, capsys):
    path = tmp_path / "labelled.cwtrace"
    write_traces(path, simulate.labelled_corpus(vocab.encode, vocab.size, per_scenario=1, seed=3))
    out = tmp_path / "scores.json"
    assert main(["eval", str(path), "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| intermediate_context |" in table and "final output only" in table
    scores = {row["monitor"]: row for row in json.loads(out.read_text())}
    assert scores["intermediate_context"]["positives"] == 1 and scores["intermediate_context"]["recall"] == 1.0
