"""The phrase matcher lexicon and intermediate_context share: one pass per step, each monitor its own patterns."""

from __future__ import annotations

from canvaswatch.monitors.base import FinalCanvas, RequestMeta
from canvaswatch.monitors.intermediate_context import IntermediateContextMonitor, IntermediateContextParams
from canvaswatch.monitors.lexicon import LexiconMonitor, LexiconParams
from canvaswatch.monitors.phrases import PhraseMatcher, link_phrase_matchers
from tests.monitors.canvas import canvas_step

META = RequestMeta("r", "m", "", (), 24, 0)


def _canvas(vocab, text: str, length: int = 24) -> list[int]:
    return (vocab.encode(text) + vocab.encode(" the") * length)[:length]


def _pair(lexicon_patterns: list[str], context_patterns: list[str]):
    lexicon = LexiconMonitor(LexiconParams(patterns=lexicon_patterns, regex=[r"AKIA[0-9A-Z]{16}"]))
    context = IntermediateContextMonitor(IntermediateContextParams(patterns=context_patterns))
    link_phrase_matchers([lexicon, context])
    return lexicon, context


def test_linked_monitors_match_each_step_once_and_keep_their_own_patterns(vocab, monkeypatch):
    lexicon, context = _pair(["secret launch code"], ["untraceable poison"])
    shared = lexicon.phrases.matcher
    assert context.phrases.matcher is shared
    calls = []
    original = PhraseMatcher._match_text
    monkeypatch.setattr(PhraseMatcher, "_match_text", lambda self, step, carry=None: calls.append(step) or original(self, step, carry))

    lexicon_state, context_state = lexicon.start(META), context.start(META)
    for number, text in enumerate(["the secret launch code and an untraceable poison",
                                   "nothing to see here at all"]):
        step = canvas_step(_canvas(vocab, text), 0.9, step=number, vocab=vocab)
        appeared = lexicon.on_step(lexicon_state, step)
        context.on_step(context_state, step)
        if number == 0:
            # The lexicon flags its own phrase, not the one only intermediate_context watches.
            assert [f.attributes["pattern"] for f in appeared] == ["secret launch code"]
    assert len(calls) == 2  # two steps, two passes, whatever the number of monitors

    final = FinalCanvas((), "a harmless answer", 2, 0)
    assert [f.attributes["pattern"] for f in context.on_finish(context_state, final)] == ["untraceable poison"]
    assert [f.attributes["pattern"] for f in lexicon.on_finish(lexicon_state, final)] == ["secret launch code"]


def test_a_phrase_both_monitors_watch_is_reported_to_both(vocab):
    lexicon, context = _pair(["untraceable poison"], ["untraceable poison"])
    lexicon_state, context_state = lexicon.start(META), context.start(META)
    step = canvas_step(_canvas(vocab, "buy an untraceable poison today"), 0.9, vocab=vocab)
    assert len(lexicon.on_step(lexicon_state, step)) == 1
    context.on_step(context_state, step)
    final = FinalCanvas((), "nothing", 1, 0)
    assert len(context.on_finish(context_state, final)) == 1


def test_monitors_under_different_case_rules_get_separate_matchers(vocab):
    lexicon = LexiconMonitor(LexiconParams(patterns=["Secret"], regex=[], case_sensitive=True))
    context = IntermediateContextMonitor(IntermediateContextParams(patterns=["secret"]))
    link_phrase_matchers([lexicon, context])
    assert lexicon.phrases.matcher is not context.phrases.matcher
    step = canvas_step(_canvas(vocab, "a secret plan"), 0.9, vocab=vocab)
    assert lexicon.on_step(lexicon.start(META), step) == []  # case-sensitive: "secret" is not "Secret"


def test_a_character_whose_lower_case_is_longer_keeps_match_positions_right(vocab):
    # 'İ'.lower() is two characters; the lower-cased text must keep offsets aligned with the canvas.
    monitor = LexiconMonitor(LexiconParams(patterns=["secret launch code"], regex=[]))
    prefix = vocab.encode("İİİ İstanbul")
    ids = _canvas(vocab, "İİİ İstanbul secret launch code")
    step = canvas_step(ids, 0.9, vocab=vocab)
    assert len(step.text_lower) == len(step.text)
    (flag,) = monitor.on_step(monitor.start(META), step)
    assert flag.evidence[0].positions[0] == len(prefix)
    assert "[secret launch code]" in flag.evidence[0].snippet


def test_a_phrase_listed_twice_in_one_monitor_flags_once(vocab):
    monitor = LexiconMonitor(LexiconParams(patterns=["secret launch code", "Secret launch code"], regex=[]))
    step = canvas_step(_canvas(vocab, "the secret launch code is"), 0.9, vocab=vocab)
    assert [f.attributes["pattern"] for f in monitor.on_step(monitor.start(META), step)] == ["secret launch code"]


def test_the_default_engine_shares_one_matcher_between_lexicon_and_intermediate_context(vocab):
    from canvaswatch.server.config import default_config
    from canvaswatch.server.bottleneck.dense import DenseDecoder
    from canvaswatch.server.pipeline.engine import Engine

    engine = Engine(default_config(), vocab, dense=DenseDecoder(None, vocab.size))
    monitors = {m.name: m for m in engine.monitors}
    assert monitors["lexicon"].phrases.matcher is monitors["intermediate_context"].phrases.matcher


def _lattice_by_definition(matcher: PhraseMatcher, step) -> dict[int, tuple[int, ...]]:
    """The top-k lattice's first sightings straight from the definition: every tokenisation of every
    literal, at every start, each token kept (>= min_alt_prob, any slot) at consecutive positions, whole
    words against the top-1 tokens beside them; per pattern the leftmost start, ties to the earlier
    tokenisation."""
    from canvaswatch.monitors.phrases import _lattice_at_word_edges

    lattice = matcher._lattice_for(step.vocab)
    ids, probs = step.ids_np, step.probs_np
    found: dict[int, tuple[int, ...]] = {}
    for position in range(ids.shape[0]):
        for sequence in range(len(lattice.lengths)):
            index = int(lattice.pattern_of[sequence])
            size = int(lattice.lengths[sequence])
            if index in found or position + size > ids.shape[0]:
                continue
            tokens = lattice.tokens[lattice.sequences[sequence, :size]]
            if all(((ids[position + j] == tokens[j]) & (probs[position + j] >= matcher.min_alt_prob)).any()
                   for j in range(size)) and _lattice_at_word_edges(
                       step, position, size, step.vocab.decode(tokens.tolist()), matcher._patterns[index]):
                found[index] = tuple(range(position, position + size))
    return found


def test_the_lattice_walk_finds_what_the_definition_finds_on_crowded_top_k_rows(vocab):
    # Rows where most kept slots hold pattern tokens (common words that several phrases share),
    # in any slot order, some under the threshold: the trie walk must report exactly the
    # definition's first sightings, whatever the mass on the rows.
    import numpy as np
    import torch

    from canvaswatch.monitors.base import DecodedStep

    patterns = ["on the mat", "the cat sat on the mat", "the the the", "mix bleach and ammonia", "cat"]
    matcher = PhraseMatcher([LexiconMonitor(LexiconParams(patterns=patterns, regex=[])).phrase_spec])
    lattice = matcher._lattice_for(vocab)
    rng = np.random.default_rng(12)
    pool = np.concatenate([lattice.tokens, [5000, 5001, 5002]])
    outside = np.array([-1, vocab.size, vocab.size + 7])  # never a pattern token, and never read past the table
    checked = 0
    for number in range(300):
        length, k = int(rng.integers(1, 40)), 8
        ids = rng.choice(pool, size=(length, k))
        ids[:, 1:] = np.where(rng.random((length, k - 1)) < 0.05, rng.choice(outside, size=(length, k - 1)), ids[:, 1:])
        probs = rng.choice([0.0, 0.01, 0.049, 0.05, 0.1, 0.3, np.nan], size=(length, k)).astype(np.float32)
        step = DecodedStep(block=0, step=number, ids=torch.from_numpy(ids), probs=torch.from_numpy(probs), vocab=vocab)
        expected = _lattice_by_definition(matcher, step)
        got = {index: sighting.positions for index, sighting in matcher._match_lattice(step).items()}
        assert got == expected, number
        checked += len(expected)
    assert checked > 200  # the rows are crowded enough that most steps hold several patterns (whole words)
