"""Scoring rules for partly labelled data: label scope, label positions, g-mean², flag rate."""

from __future__ import annotations

import math

import pytest

from canvaswatch.server.evaluation.evaluate import _counted, _score, parse_positions
from canvaswatch.monitors.base import Evidence, Flag, Severity


def _flag(*positions: int) -> Flag:
    return Flag("self_correction", Severity.WARNING, "r", 1.0, (Evidence(0, 3, tuple(positions), ""),))


def test_positions_parse_and_refuse():
    assert parse_positions("0-3,17, 20-20") == {0, 1, 2, 3, 17, 20}
    assert parse_positions("") == set()
    with pytest.raises(ValueError, match="'4-2'"):
        parse_positions("4-2")
    with pytest.raises(ValueError, match="'a'"):
        parse_positions("a")


def test_a_flag_counts_only_where_the_label_points():
    assert _counted(_flag(5, 6), None)
    assert _counted(_flag(5, 6), {6, 7})
    assert not _counted(_flag(5, 6), {0, 1})


def test_unlabelled_traces_count_only_toward_the_flag_rate():
    m = "token_smearing"
    rows = [
        ({m}, None, {m: 1.0}),  # positive, flagged
        (set(), None, {m: 0.0}),  # negative, quiet
        (set(), None, {m: 1.0}),  # negative, flagged
        (set(), {"self_correction"}, {m: 1.0}),  # labelled for another monitor only: unlabelled here
        (set(), {"self_correction"}, {}),
    ]
    s = _score(m, rows)
    assert (s.positives, s.negatives, s.true_positives, s.false_positives) == (1, 2, 1, 1)
    assert (s.unlabelled, s.unlabelled_flagged) == (2, 1) and s.unlabelled_flag_rate == 0.5
    assert s.g_mean2 == pytest.approx(1.0 * 0.5)  # TPR x TNR


def test_g_mean2_needs_both_classes():
    s = _score("x", [({"x"}, None, {"x": 1.0})])
    assert math.isnan(s.g_mean2) and math.isnan(_score("x", [({"x"}, None, {})]).unlabelled_flag_rate)
