"""The output check: one compiled pass that answers exactly what one regex search per pattern answered."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from canvaswatch.monitors.base import FinalCanvas, RequestMeta
from canvaswatch.monitors.lexicon import LexiconMonitor, LexiconParams
from canvaswatch.monitors.phrase_scan import TextScan
from canvaswatch.monitors.phrases import OutputCheck, literal_regex
from tests.monitors.canvas import canvas_step

# Overlapping on purpose (suffix, prefix, inside another), a case-only duplicate, non-word edges, and
# characters whose case rule in `re` is not str.lower()'s ('ı', 'ſ', the Kelvin sign, 'İ', final sigma).
PHRASES = ["the cat", "cat sat", "the cat sat", "at", "The Cat", "rm -rf /", "-rf", "kiss", "İstanbul", "σοφία",
           "straße", "a_b", "x"]
REGEX = [r"AKIA[0-9A-Z]{16}(?![0-9A-Z])", r"\b\d{3}-\d{2}-\d{4}\b"]
TEXTS = [
    "the cat sat on the mat", "THE CAT SAT", "concatenate", "the catsat", "the cat_sat", "the catSat",
    "rm -rf / now", "rm -rf /x", "x-rf-", "KİSS ĸiss ſ kıss", "ıstanbul and istanbul", "ΣΟΦΊΑ σοφίας",
    "STRASSE strasse STRAẞE", "a_b a_bc _a_b", "x", "xx x1 xX", "key AKIAABCDEFGHIJKLMNOP!", "ssn 123-45-6789",
    "", "at", "attic", "that", "cat\u212a sat",
]


def _singles(patterns: list[str], regex: list[str], case_sensitive: bool) -> list[re.Pattern]:
    """The definition: each pattern's own regex (what the lexicon searched the output with, one by one)."""
    flags = 0 if case_sensitive else re.IGNORECASE
    return [re.compile(literal_regex(p), flags) for p in patterns] + [re.compile(e) for e in regex]


def _by_regex(singles: list[re.Pattern], text: str) -> set[int]:
    return {i for i, single in enumerate(singles) if single.search(text) is not None}


@pytest.mark.parametrize("case_sensitive", [False, True])
def test_the_output_check_answers_what_a_search_per_pattern_answers(case_sensitive):
    check = OutputCheck(PHRASES, REGEX, case_sensitive)
    assert check._scan is not None  # compiled, not the fallback
    rng = random.Random(3)
    pieces = TEXTS + [p.upper() for p in PHRASES] + PHRASES
    texts = TEXTS + [" ".join(rng.choice(pieces) for _ in range(rng.randint(1, 8))) for _ in range(400)]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 6))) for _ in range(400)]  # glued: no spaces
    singles = _singles(PHRASES, REGEX, case_sensitive)
    for text in texts:
        assert check.present(text) == _by_regex(singles, text), text


def test_word_edges_case_folding_and_overlaps():
    check = OutputCheck(["the cat", "cat sat", "the cat sat", "at"], [], case_sensitive=False)
    assert check.present("The Cat Sat") == {0, 1, 2}
    assert check.present("concatenate") == set()  # inside words
    assert check.present("the catsat") == set()  # "the cat" is followed by a lower-case letter
    assert check.present("the catSat") == {0}  # the end rule refuses only a lower-case letter or digit
    assert check.present("at at") == {3}
    assert check.present("that") == set()


def test_the_case_classes_are_re_s_own():
    """Every character of the sample matches, under re.IGNORECASE, exactly the code points given its code."""
    sample = "abcikszAKSZ09 -_/.İıſ\u212aßẞσςΣ"
    scan = TextScan([sample], case_sensitive=False)
    code_of = {char: int(scan.table[ord(char)]) for char in sample}
    every = "".join(map(chr, range(0x110000)))
    for char in sample:
        expected = {m.start() for m in re.finditer(re.escape(char), every, re.IGNORECASE)}
        assert set(np.flatnonzero(scan.table == code_of[char]).tolist()) == expected, char


def test_ten_thousand_phrases_stay_compiled_and_exact():
    rng = random.Random(7)
    words = ["the", "of", "and", "to", "a", "in", "is", "that", "for", "it", "as", "with", "be", "on", "not",
             "this", "by", "are", "or", "from", "value", "object", "return", "file", "name", "list", "type"]
    chosen: set[str] = set()
    while len(chosen) < 10_000:
        chosen.add(" ".join(rng.choice(words) for _ in range(rng.randint(2, 4))))
    phrases = sorted(chosen)
    check = OutputCheck(phrases, REGEX, case_sensitive=False)
    assert check._scan is not None
    singles = _singles(phrases, REGEX, case_sensitive=False)
    for _ in range(5):
        text = " ".join(rng.choice(words + ["Value", "OBJECT", "x"]) for _ in range(200))
        found = check.present(text)
        assert len(found) > 10 and found == _by_regex(singles, text)


def test_an_output_that_is_the_last_canvas_reuses_its_regex_results_and_only_then(vocab):
    monitor = LexiconMonitor(LexiconParams(patterns=["secret plan"], regex=[r"\b\d{3}-\d{2}-\d{4}\b"]))
    text = "the secret plan is 123-45-6789 ok"
    ids = vocab.encode(text)
    meta = RequestMeta("r", "m", "", (), len(ids), 0)

    def run(final_text: str) -> dict[str, str]:
        state = monitor.start(meta)
        monitor.on_step(state, canvas_step(ids, 0.9, vocab=vocab))
        flags = monitor.on_finish(state, FinalCanvas(tuple(vocab.encode(final_text)), final_text, 1, 0))
        return {f.attributes["pattern"]: f.attributes["survived_to_output"] for f in flags}

    assert run(vocab.decode(ids)) == {"secret plan": "true", r"\b\d{3}-\d{2}-\d{4}\b": "true"}
    assert run("the secret plan is gone") == {"secret plan": "true", r"\b\d{3}-\d{2}-\d{4}\b": "false"}
    assert run("nothing left") == {"secret plan": "false", r"\b\d{3}-\d{2}-\d{4}\b": "false"}
