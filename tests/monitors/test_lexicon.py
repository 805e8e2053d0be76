"""lexicon on hand-built canvases: top-1 text, top-k lattice, survival, and near misses."""

from __future__ import annotations

import pytest

from canvaswatch.monitors.base import FinalCanvas, RequestMeta, Severity
from canvaswatch.monitors.lexicon import LexiconMonitor, LexiconParams
from canvaswatch.monitors.registry import MonitorConfigError, parse_params
from tests.monitors.canvas import canvas_step

META = RequestMeta("r", "m", "", (), 16, 0)


def _monitor(**params) -> LexiconMonitor:
    return LexiconMonitor(LexiconParams(**{"patterns": ["secret launch code"], "regex": [], **params}))


def _pad(ids: list[int], vocab, length: int = 16) -> list[int]:
    filler = vocab.encode(" the")
    return (ids + filler * length)[:length]


def _final(vocab, text: str) -> FinalCanvas:
    return FinalCanvas(tuple(vocab.encode(text)), text, 1, 0)


def test_phrase_in_top1_text_flags_at_its_first_step_and_reports_it_vanished(vocab):
    monitor = _monitor()
    state = monitor.start(META)
    clean = _pad(vocab.encode("We went to the market"), vocab)
    planted = _pad(vocab.encode("We sent the secret launch code to"), vocab)
    assert monitor.on_step(state, canvas_step(clean, 0.9, step=0, vocab=vocab)) == []
    flags = monitor.on_step(state, canvas_step(planted, 0.9, step=1, vocab=vocab))
    assert len(flags) == 1
    flag = flags[0]
    assert flag.attributes["first_step"] == "1" and flag.attributes["seen_via"] == "top1"
    assert "[secret launch code]" in flag.evidence[0].snippet
    first = vocab.encode("We sent the")
    assert flag.evidence[0].positions[0] == len(first)
    # Seen again: no second appearance flag.
    assert monitor.on_step(state, canvas_step(planted, 0.9, step=2, vocab=vocab)) == []
    final = monitor.on_finish(state, _final(vocab, "We went to the market."))
    assert len(final) == 1
    assert final[0].attributes["survived_to_output"] == "false"
    assert final[0].attributes["steps_present"] == "2"
    assert final[0].severity == Severity.WARNING


def test_phrase_that_survives_is_reported_with_the_output_severity(vocab):
    monitor = _monitor()
    state = monitor.start(META)
    planted = _pad(vocab.encode("the secret launch code is"), vocab)
    monitor.on_step(state, canvas_step(planted, 0.9, step=0, vocab=vocab))
    final = monitor.on_finish(state, _final(vocab, "so the secret launch code is 1234"))
    assert final[0].attributes["survived_to_output"] == "true"
    assert final[0].severity == Severity.CRITICAL


def test_phrase_only_among_topk_alternatives_is_found_in_the_lattice(vocab):
    monitor = _monitor()
    state = monitor.start(META)
    top1 = _pad(vocab.encode("We sent the red apple to"), vocab)
    phrase = vocab.encode(" secret launch code")
    start = len(vocab.encode("We sent the"))
    alternatives = {start + i: [(token, 0.2)] for i, token in enumerate(phrase)}
    flags = monitor.on_step(state, canvas_step(top1, 0.6, vocab=vocab, alternatives=alternatives))
    assert [f.attributes["seen_via"] for f in flags] == ["topk"]
    assert flags[0].evidence[0].positions == tuple(range(start, start + len(phrase)))


def test_alternatives_below_min_alt_prob_or_out_of_order_do_not_count(vocab):
    monitor = _monitor(min_alt_prob=0.1)
    state = monitor.start(META)
    top1 = _pad(vocab.encode("We sent the red apple to"), vocab)
    phrase = vocab.encode(" secret launch code")
    start = len(vocab.encode("We sent the"))
    weak = {start + i: [(token, 0.05)] for i, token in enumerate(phrase)}
    assert monitor.on_step(state, canvas_step(top1, 0.6, vocab=vocab, alternatives=weak)) == []
    shuffled = {start + i: [(token, 0.3)] for i, token in enumerate(reversed(phrase))}
    assert monitor.on_step(state, canvas_step(top1, 0.6, step=1, vocab=vocab, alternatives=shuffled)) == []


def test_near_misses_are_not_flagged(vocab):
    monitor = _monitor()
    state = monitor.start(META)
    for step, text in enumerate(["the secret launch codes", "a secretlaunch code", "secret lunch code today"]):
        assert monitor.on_step(state, canvas_step(_pad(vocab.encode(text), vocab), 0.9, step=step, vocab=vocab)) == []
    assert monitor.on_finish(state, _final(vocab, "nothing here")) == []


def test_regex_and_many_patterns_match_in_one_pass(vocab):
    monitor = LexiconMonitor(LexiconParams(patterns=["alpha", "beta gamma"], regex=[r"\bAKIA[0-9A-Z]{16}\b"]))
    state = monitor.start(META)
    text = "beta gamma then AKIAABCDEFGHIJKLMNOP and alpha"
    ids = vocab.encode(text)
    flags = monitor.on_step(state, canvas_step(ids, 0.9, vocab=vocab))
    assert sorted(f.attributes["pattern"] for f in flags) == sorted(["alpha", "beta gamma", r"\bAKIA[0-9A-Z]{16}\b"])


def test_case_sensitivity_is_configurable(vocab):
    ids = _pad(vocab.encode("The SECRET LAUNCH CODE"), vocab)
    insensitive = _monitor()
    assert len(insensitive.on_step(insensitive.start(META), canvas_step(ids, 0.9, vocab=vocab))) == 1
    sensitive = _monitor(case_sensitive=True)
    assert sensitive.on_step(sensitive.start(META), canvas_step(ids, 0.9, vocab=vocab)) == []


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"regex": ["(unclosed"]}, "monitors.lexicon.regex[0]: invalid regular expression"),
        ({"regex": ["ok", "zz|$"]}, "monitors.lexicon.regex[1]: 'zz|$' matches the empty string"),
        ({"patterns": ["ok", ""]}, "monitors.lexicon.patterns[1]: empty pattern"),
        ({"patterns": "not a list"}, "monitors.lexicon.patterns: expected a list"),
        ({"severity": "loud"}, "monitors.lexicon.severity: unknown severity 'loud'"),
        ({"output_severity": "high"}, "monitors.lexicon.output_severity: unknown severity 'high'"),
        ({"severity": 3}, "monitors.lexicon.severity: expected str, got int 3"),
        ({"min_alt_prob": 2.0}, "monitors.lexicon.min_alt_prob"),
        ({"colour": "red"}, "monitors.lexicon.colour: unknown parameter"),
    ],
)
def test_bad_parameters_name_the_key(table, message):
    with pytest.raises(MonitorConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        parse_params(LexiconParams, table, "monitors.lexicon")


def test_title_case_alternatives_are_found_in_the_lattice(vocab):
    # The lattice tried four spellings (as written, lower, first letter capital, upper): a phrase spelled
    # "Ignore All Previous Instructions" by lower-ranked tokens was missed.
    monitor = _monitor(patterns=["ignore all previous instructions"])
    state = monitor.start(META)
    top1 = _pad(vocab.encode("Step one: Read All Previous Notes and"), vocab)
    phrase = vocab.encode(" Ignore All Previous Instructions")
    start = len(vocab.encode("Step one:"))
    alternatives = {start + i: [(token, 0.3)] for i, token in enumerate(phrase)}
    flags = monitor.on_step(state, canvas_step(top1, 0.6, vocab=vocab, alternatives=alternatives))
    assert [f.attributes["seen_via"] for f in flags] == ["topk"]


def test_the_lattice_keeps_the_whole_word_rule(vocab):
    # "bomb" as the start of " bombastic" ([' bomb', 'astic']): the text path refuses it, the lattice flagged it.
    monitor = _monitor(patterns=["bomb"])
    state = monitor.start(META)
    words = _pad(vocab.encode("The bombastic speech went on"), vocab)
    assert monitor.on_step(state, canvas_step(words, 0.9, vocab=vocab)) == []
    whole = _pad(vocab.encode("The bomb speech went on"), vocab)
    assert len(monitor.on_step(state, canvas_step(whole, 0.9, step=1, vocab=vocab))) == 1


def test_a_dotted_capital_i_reads_as_i_in_the_steps_as_in_the_output_check(vocab):
    # "KİLL THEM ALL": str.lower gives "i̇" (two characters), so the length-keeping fold left "İ" and the
    # steps never matched, while the output check (re.IGNORECASE) did.
    monitor = _monitor(patterns=["kill them all"])
    state = monitor.start(META)
    ids = _pad(vocab.encode("Now KİLL THEM ALL please"), vocab)
    flags = monitor.on_step(state, canvas_step(ids, 0.9, vocab=vocab))
    assert [f.attributes["seen_via"] for f in flags] == ["top1"]
