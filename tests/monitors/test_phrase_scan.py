"""The compiled phrase scan: the same hits as a scan of the text, its fallback, and the regex gates."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from canvaswatch.monitors import phrase_scan
from canvaswatch.monitors.base import RequestMeta
from canvaswatch.monitors.lexicon import LexiconMonitor, LexiconParams
from canvaswatch.monitors.phrase_scan import CompiledScan, ScanCarry
from canvaswatch.monitors.phrases import PhraseMatcher, PhraseSpec
from tests.monitors.canvas import canvas_step

# Overlapping keys on purpose: one is a suffix of another, one a prefix, one inside another.
KEYS = ["he", "she", "hers", "his secret", "secret", "rm -rf /", "ß straße"]


def _text_hits(text: str, keys: list[str]) -> set[tuple[int, int]]:
    """Every (end offset, key) by brute force over the text."""
    return {(m.start() + len(key) - 1, number) for number, key in enumerate(keys)
            for m in re.finditer(f"(?={re.escape(key)})", text)}


def _canvases(vocab, count: int, length: int):
    generator = torch.Generator().manual_seed(11)
    planted = vocab.encode(" she said his secret: rm -rf / and hers, ß straße")
    for _ in range(count):
        ids = torch.randint(0, vocab.size, (length,), generator=generator)
        start = int(torch.randint(0, length - len(planted), (1,), generator=generator))
        ids[start : start + len(planted)] = torch.tensor(planted)
        yield ids.numpy()


def test_the_compiled_scan_finds_exactly_what_a_scan_of_the_text_finds(vocab):
    scan = CompiledScan(KEYS, vocab.pieces(lower=True))
    for ids in _canvases(vocab, 20, 512):
        text = vocab.decode_lower(ids)
        found = scan.scan(ids)
        assert set(found) == _text_hits(text, KEYS)
        assert [end for end, _ in found] == sorted(end for end, _ in found)  # text order


def _edits(vocab, start, steps: int, seed: int):
    """Canvases as a request's steps bring them: each the last with a few positions redrawn, the planted
    phrase now and then written over or back, sometimes a new block (all positions new) or a new length."""
    generator = torch.Generator().manual_seed(seed)
    planted = torch.tensor(vocab.encode(" she said his secret: rm -rf / and hers"))
    ids = torch.tensor(start)
    for _ in range(steps):
        draw = float(torch.rand(1, generator=generator))
        if draw < 0.05:
            ids = torch.randint(0, vocab.size, (len(ids),), generator=generator)  # a new block
        elif draw < 0.1:
            ids = torch.randint(0, vocab.size, (int(torch.randint(40, 300, (1,), generator=generator)),),
                                generator=generator)  # another canvas length
        else:
            ids = ids.clone()
            changed = torch.rand(len(ids), generator=generator) < 0.1
            ids[changed] = torch.randint(0, vocab.size, (int(changed.sum()),), generator=generator)
        if float(torch.rand(1, generator=generator)) < 0.5 and len(ids) > len(planted):
            at = int(torch.randint(0, len(ids) - len(planted), (1,), generator=generator))
            ids[at : at + len(planted)] = planted
        yield ids.numpy()


def test_a_scan_that_reuses_the_last_one_finds_exactly_what_a_fresh_scan_finds(vocab):
    scan = CompiledScan(KEYS, vocab.pieces(lower=True))
    chained, stale = ScanCarry(), ScanCarry()
    hits = 0
    for number, ids in enumerate(_edits(vocab, next(_canvases(vocab, 1, 256)), 120, seed=3)):
        fresh = scan.scan(ids)
        assert scan.scan(ids, chained) == fresh
        assert set(fresh) == _text_hits(vocab.decode_lower(ids), KEYS)
        if number % 7 == 0:  # a carry many steps old, or from another canvas length: still the same answer
            assert scan.scan(ids, stale) == fresh
        hits += len(fresh)
    assert hits > 100  # the planted phrases came and went


def test_a_carry_survives_a_refused_canvas_and_another_scanner(vocab):
    scan, other = CompiledScan(KEYS, vocab.pieces(lower=True)), CompiledScan(["secret"], vocab.pieces(lower=True))
    carry = ScanCarry()
    ids = next(_canvases(vocab, 1, 128))
    assert scan.scan(ids, carry) == scan.scan(ids)
    kept = (carry.walk, carry.walk.copy(), carry.hits, carry.count)
    with pytest.raises(IndexError, match="outside the vocabulary"):
        scan.scan(torch.tensor([3] * 127 + [vocab.size]).numpy(), carry)
    assert carry.walk is kept[0] and (carry.walk == kept[1]).all() and carry.hits is kept[2] and carry.count == kept[3]
    assert scan.scan(ids, carry) == scan.scan(ids)
    assert other.scan(ids, carry) == other.scan(ids)  # its states are another automaton's: not reused
    assert scan.scan(ids, carry) == scan.scan(ids)


def test_an_unchanged_canvas_is_copied_from_the_carry_not_read_again(vocab):
    scan = CompiledScan(KEYS, vocab.pieces(lower=True))
    carry = ScanCarry()
    ids = next(_canvases(vocab, 1, 256))
    found = scan.scan(ids, carry)
    assert found
    scan.codes[:] = 0  # every piece now reads as characters in no key: only a copy still finds the phrases
    assert scan.scan(ids, carry) == found
    assert scan.scan(ids) == []


def test_the_lexicon_keeps_its_request_s_scan_between_steps(vocab):
    monitor = LexiconMonitor(LexiconParams(patterns=["his secret"]))
    state = monitor.start(META)
    monitor.on_step(state, canvas_step((vocab.encode(" she said his secret") * 8)[:32], 0.9, vocab=vocab))
    assert state.scan.owner is not None and state.scan.walk.shape == (3, 33)


def test_scans_stay_inside_their_arrays(vocab, tmp_path):
    """numba does not check indices: run fresh, carried, resized and refused scans with its bounds check on
    (a kernel of its own, compiled into a cache of its own), where a read past an array raises."""
    script = tmp_path / "bounds.py"
    script.write_text(
        "import numpy as np\n"
        "from canvaswatch.monitors.phrase_scan import CompiledScan, ScanCarry\n"
        "pieces = ['he', ' she', 'rs', ' his', ' secret', 'x', '', 'ß', ' straße', ' rm -rf /']\n"
        f"scan = CompiledScan({KEYS!r}, pieces)\n"
        "carry = ScanCarry()\n"
        "rng = np.random.default_rng(5)\n"
        "ids = rng.integers(0, len(pieces), 300)\n"
        "for step in range(60):\n"
        "    if step % 10 == 9:\n"
        "        ids = rng.integers(0, len(pieces), int(rng.integers(1, 400)))\n"
        "    else:\n"
        "        ids = ids.copy(); changed = rng.random(len(ids)) < 0.1\n"
        "        ids[changed] = rng.integers(0, len(pieces), int(changed.sum()))\n"
        "    assert scan.scan(ids, carry) == scan.scan(ids), step\n"
        "try:\n"
        "    scan.scan(np.array([0, len(pieces)]), carry)\n"
        "except IndexError as err:\n"
        "    assert 'outside the vocabulary' in str(err)\n"
        "print('ok')\n")
    env = {**os.environ, "NUMBA_BOUNDSCHECK": "1", "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_a_canvas_whose_text_could_pass_int32_offsets_is_refused_not_wrapped():
    scan = CompiledScan(["ab"], ["a" * 2**20, "b"])  # a vocabulary with a 1M-character piece
    assert scan.scan(np.array([1, 0, 1])) == [(2**20 + 1, 0)]  # "b", a million "a", "b": one "ab", at its end
    with pytest.raises(ValueError, match="int32"):
        scan.scan(np.zeros(2048, dtype=np.int64))


def test_a_carried_scan_with_more_hits_than_its_buffer_returns_every_hit(vocab):
    scan = CompiledScan(["ab", "b"], vocab.pieces())
    carry = ScanCarry()
    ids = torch.tensor(vocab.encode("ab" * 300)).numpy()
    assert scan.scan(ids, carry) == scan.scan(ids, carry) == scan.scan(ids)
    assert len(scan.scan(ids)) == 600


def test_a_canvas_with_more_hits_than_the_first_buffer_returns_every_hit(vocab):
    scan = CompiledScan(["ab", "b"], vocab.pieces())
    ids = torch.tensor(vocab.encode("ab" * 300)).numpy()
    assert len(scan.scan(ids)) == len(_text_hits(vocab.decode(ids), ["ab", "b"])) == 600


def test_an_id_outside_the_vocabulary_raises_instead_of_reading_past_the_table(vocab):
    scan = CompiledScan(KEYS, vocab.pieces())
    with pytest.raises(IndexError, match="outside the vocabulary"):
        scan.scan(torch.tensor([3, vocab.size]).numpy())


def test_a_lexicon_too_large_for_the_table_falls_back_and_matches_the_same(vocab, monkeypatch):
    spec = PhraseSpec(patterns=("his secret", "rm -rf /", "Straße"), regex=(r"AKIA[0-9A-Z]{4}",),
                      case_sensitive=False, min_alt_prob=0.05)
    compiled = PhraseMatcher([spec])
    monkeypatch.setattr(phrase_scan, "MAX_CODES", 2)  # as if the phrases had more characters than codes
    fallback = PhraseMatcher([spec])
    assert compiled._automaton is None and fallback._automaton is not None
    for ids in _canvases(vocab, 10, 256):
        step = canvas_step(ids.tolist(), 0.9, vocab=vocab)
        assert compiled._match_text(step) == fallback._match_text(step)
        assert compiled._match_text(step)  # the planted phrases are found


META = RequestMeta("r", "m", "", (), 32, 0)


def test_a_regex_runs_only_on_canvases_that_hold_its_literal_prefix(vocab):
    monitor = LexiconMonitor(LexiconParams(patterns=["untraceable poison"], regex=[r"AKIA[0-9A-Z]{16}(?![0-9A-Z])"]))
    state = monitor.start(META)
    quiet = canvas_step((vocab.encode("nothing to see here, just words") * 4)[:32], 0.9, vocab=vocab)
    assert monitor.on_step(state, quiet) == []
    assert "text" not in quiet.__dict__  # no match, no gate: the canvas was never read as a string
    keyed = canvas_step((vocab.encode("the key AKIAABCDEFGHIJKLMNOP was") + vocab.encode(" the") * 32)[:32],
                        0.9, step=1, vocab=vocab)
    (flag,) = monitor.on_step(state, keyed)
    assert flag.attributes["pattern"] == r"AKIA[0-9A-Z]{16}(?![0-9A-Z])"
    assert "[AKIAABCDEFGHIJKLMNOP]" in flag.evidence[0].snippet
    lower = canvas_step((vocab.encode("the key akiaabcdefghijklmnop was") + vocab.encode(" the") * 32)[:32],
                        0.9, step=2, vocab=vocab)
    assert monitor.on_step(monitor.start(META), lower) == []  # the gate is seen; the regex, case-sensitive, refuses
    assert "text" in lower.__dict__


@pytest.mark.parametrize("expression, gate", [
    (r"AKIA[0-9A-Z]{16}", "akia"),
    (r"(?i)password\s*=", None),  # IGNORECASE: re equates more than lower-casing does
    (r"ab[0-9]", None),  # too short to be worth a key
    (r"abc*d", None),  # only "ab" is certain
    (r"secret|token", None),  # no single prefix
    (r"Ärger!", None),  # not ASCII: its lower case is not certain per character
    (r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+\.[A-Za-z]{2,}", "@"),  # contained, not a prefix: punctuation is worth a key
    (r"\b\d{3}-\d{2}-\d{4}\b", "-"),
    (r"https?://[^\s]+", "http"),  # the longest run
    (r"\b(?:\d{4}[ -]?){3}\d{4}\b", None),  # nothing literal at the top level
    (r"a(?:-|b)c", None),  # 1-letter runs, and "-" only in one branch
])
def test_regex_gates_are_taken_only_when_certain(expression, gate):
    from canvaswatch.monitors.phrases import _gate

    assert _gate(re.compile(expression), case_sensitive=False) == gate
