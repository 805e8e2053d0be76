"""Finding watched phrases in a decoded step: one pass shared by every monitor that watches phrases.

A `PhraseSpec` is what one monitor watches (literal phrases, regexes, case
rule, the top-k probability a lattice token needs). A `PhraseMatcher` matches
the union of several specs in one pass per step:
  - literals: one Aho-Corasick pass over the step's top-1 tokens, compiled
    over their pieces' characters (canvaswatch.monitors.phrase_scan; lower-cased
    piece by piece for case-insensitive specs), with the word-edge rule;
  - regexes: one scan each of the top-1 text, matched as written; a
    case-sensitive regex with a literal prefix of 3+ characters (the default
    `AKIA...`) has it added to the Aho-Corasick pass as a gate and is scanned
    only on steps whose canvas holds it, so most steps never build the text;
  - literals across the top-k alternatives: one vectorised lattice pass (a
    lookup table maps each vocabulary id to a pattern-token column, then one
    AND per token offset over every tokenisation of every pattern at once).
The result is memoised on the step, so `lexicon` and `intermediate_context`
together cost one matcher pass, not two. `link_phrase_matchers` gives the
monitors of one engine their shared matcher; a monitor used alone matches with
its own.

Pattern index: a matcher numbers the patterns of its specs consecutively
(each spec's literals, then its regexes); a `PhraseView` translates back to
the spec's own numbering.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import ahocorasick
import numpy as np

from canvaswatch.monitors.base import DecodedStep, Vocabulary
from canvaswatch.monitors.compiled import kernel, prefetch
from canvaswatch.monitors.phrase_scan import CompiledScan, vocabulary_pieces

CONTEXT_POSITIONS = 4  # tokens of context either side of a match in evidence


@dataclass(frozen=True)
class PhraseSpec:
    patterns: tuple[str, ...]
    regex: tuple[str, ...]
    case_sensitive: bool
    min_alt_prob: float

    @property
    def size(self) -> int:
        return len(self.patterns) + len(self.regex)


@dataclass
class Sighting:
    """Where a pattern was present in one step."""

    block: int
    step: int
    positions: tuple[int, ...]
    snippet: str
    via: str  # "top1" or "topk"


@dataclass(frozen=True)
class _Lattice:
    """Token sequences of the literal patterns, padded into one matrix for a vectorised match."""

    tokens: np.ndarray  # [U] distinct token ids
    column_of: np.ndarray  # [V] int32: 1 + column of each vocabulary id, 0 = in no pattern
    sequences: np.ndarray  # [S, M] column indices into tokens, U = padding (always matches)
    pattern_of: np.ndarray  # [S] pattern index of each sequence
    lengths: np.ndarray  # [S]


class PhraseMatcher:
    """The union of specs that share a case rule and a lattice threshold, matched in one pass per step."""

    def __init__(self, specs: Iterable[PhraseSpec]) -> None:
        self.specs = tuple(specs)
        rules = {(spec.case_sensitive, spec.min_alt_prob) for spec in self.specs}
        if len(rules) != 1:
            raise ValueError(f"one matcher needs one case rule and one min_alt_prob, got {sorted(rules)}")
        self.case_sensitive, self.min_alt_prob = rules.pop()
        self.offsets: list[int] = []
        self.literals: list[tuple[int, str]] = []  # (global index, pattern)
        self.regexes: list[tuple[int, re.Pattern]] = []
        literal_keys: dict[str, list[int]] = {}
        offset = 0
        for spec in self.specs:
            self.offsets.append(offset)
            self.literals += [(offset + i, pattern) for i, pattern in enumerate(spec.patterns)]
            first_in_spec: dict[str, int] = {}
            for i, pattern in enumerate(spec.patterns):
                # The same phrase twice in one spec: its first index reports it; in two specs, each does.
                first_in_spec.setdefault(self._fold(pattern), offset + i)
            for key, index in first_in_spec.items():
                literal_keys.setdefault(key, []).append(index)
            self.regexes += [(offset + len(spec.patterns) + i, re.compile(expression))
                             for i, expression in enumerate(spec.regex)]
            offset += spec.size
        self._patterns = dict(self.literals)
        # One scan finds the literals and each regex's gate: a literal every match of the regex
        # starts with, so the regex (and the text it needs) runs only on canvases that hold it.
        self._gates = [_gate(compiled, self.case_sensitive) for _, compiled in self.regexes]
        keys: dict[str, tuple[list[int], list[int]]] = {key: (indices, []) for key, indices in literal_keys.items()}
        for number, gate in enumerate(self._gates):
            if gate is not None:
                keys.setdefault(gate, ([], []))[1].append(number)
        self._keys = list(keys)
        self._key_literals = [tuple(indices) for indices, _ in keys.values()]
        self._key_gates = [tuple(gated) for _, gated in keys.values()]
        self._automaton = None  # pyahocorasick over the text, only for lexicons too large to compile
        if self._keys and not CompiledScan.fits(self._keys):
            self._automaton = ahocorasick.Automaton()
            for number, key in enumerate(self._keys):
                self._automaton.add_word(key, number)
            self._automaton.make_automaton()
        self._scans: dict[int, CompiledScan] = {}
        self._lattices: dict[int, _Lattice | None] = {}

    def _fold(self, text: str) -> str:
        return text if self.case_sensitive else text.lower()

    def _spec_of(self, index: int) -> int:
        return bisect.bisect_right(self.offsets, index) - 1

    def view(self, spec_index: int) -> "PhraseView":
        return PhraseView(self, self.offsets[spec_index], self.specs[spec_index].size)

    def match(self, step: DecodedStep) -> dict[int, Sighting]:
        """First sighting of every present pattern (global index), computed once per step."""
        memo = step.memo
        found = memo.get(self)
        if found is None:
            found = self._match_text(step)
            for index, sighting in self._match_lattice(step).items():
                found.setdefault(index, sighting)
            memo[self] = found
        return found

    def _match_text(self, step: DecodedStep) -> dict[int, Sighting]:
        found: dict[int, Sighting] = {}
        gated: set[int] = set()
        for end, key in self._scan(step):
            gated.update(self._key_gates[key])
            size = len(self._keys[key])
            start = end - size + 1
            for index in self._key_literals[key]:
                if index in found or not _at_word_edges(step.text, start, end + 1, self._patterns[index]):
                    continue
                found[index] = _sighting(step, start, end + 1, step.text[start : end + 1], "top1")
        for number, (index, compiled) in enumerate(self.regexes):
            if index in found or (self._gates[number] is not None and number not in gated):
                continue
            if (match := compiled.search(step.text)) is not None:
                found[index] = _sighting(step, match.start(), match.end(), match.group(0), "top1")
        return found

    def _scan(self, step: DecodedStep) -> list[tuple[int, int]]:
        """(end character offset, key) of every key in the step's top-1 text, in text order."""
        if not self._keys:
            return []
        if self._automaton is not None:
            return list(self._automaton.iter(step.text if self.case_sensitive else step.text_lower))
        scan = self._scans.get(id(step.vocab))
        if scan is None:
            scan = self._scans.setdefault(id(step.vocab), CompiledScan(
                self._keys, vocabulary_pieces(step.vocab, lower=not self.case_sensitive)))
        return scan.scan(step.ids_np[:, 0])

    def _match_lattice(self, step: DecodedStep) -> dict[int, Sighting]:
        lattice = self._lattice_for(step.vocab)
        if lattice is None:
            return {}
        ids, probs = step.ids_np, step.probs_np
        threshold = max(self.min_alt_prob, 1e-12)
        if not _any_kept(ids, probs, lattice.column_of, threshold):
            return {}  # the usual step: no pattern token kept anywhere
        columns = lattice.column_of[ids]  # [L, k]: 1 + pattern-token column, 0 = none
        present = (columns > 0) & (probs >= threshold)
        length, width = ids.shape[0], lattice.sequences.shape[1]
        distinct = len(lattice.tokens)
        # member[pos, u]: pattern token u is kept at pos; rows past the canvas never match, the
        # extra last column (sequence padding) always does.
        member = np.zeros((length + width - 1, distinct + 1), dtype=bool)
        rows, slots = np.nonzero(present)
        member[rows, columns[rows, slots] - 1] = True
        member[:, distinct] = True
        hits = np.ones((length, lattice.sequences.shape[0]), dtype=bool)
        for offset in range(width):
            hits &= member[offset : offset + length][:, lattice.sequences[:, offset]]
        found: dict[int, Sighting] = {}
        for position, sequence in np.argwhere(hits):
            index = int(lattice.pattern_of[sequence])
            if index in found:
                continue
            size = int(lattice.lengths[sequence])
            positions = tuple(range(int(position), int(position) + size))
            phrase = step.vocab.decode(lattice.tokens[lattice.sequences[sequence, :size]].tolist())
            found[index] = Sighting(step.block, step.step, positions, _snippet(step, positions, phrase), "topk")
        return found

    def _lattice_for(self, vocab: Vocabulary) -> _Lattice | None:
        key = id(vocab)
        if key not in self._lattices:
            self._lattices[key] = _build_lattice(self.literals, self.case_sensitive, vocab, self._spec_of)
        return self._lattices[key]


@dataclass(frozen=True)
class PhraseView:
    """One spec's window onto a (possibly shared) matcher: its own pattern numbering."""

    matcher: PhraseMatcher
    offset: int
    size: int

    def match(self, step: DecodedStep) -> dict[int, Sighting]:
        stop = self.offset + self.size
        return {index - self.offset: sighting for index, sighting in self.matcher.match(step).items()
                if self.offset <= index < stop}


class WatchesPhrases:
    """Mixin for monitors that watch a PhraseSpec: a matcher of their own until an engine links a shared one."""

    phrase_spec: PhraseSpec
    _phrase_view: PhraseView | None = None

    @property
    def phrases(self) -> PhraseView:
        if self._phrase_view is None:
            self._phrase_view = PhraseMatcher([self.phrase_spec]).view(0)
        return self._phrase_view

    def share_phrases(self, view: PhraseView) -> None:
        self._phrase_view = view


def link_phrase_matchers(monitors: Iterable[object]) -> None:
    """Give monitors that watch phrases under the same rules one shared matcher (one pass per step)."""
    groups: dict[tuple[bool, float], list[WatchesPhrases]] = {}
    for monitor in monitors:
        if isinstance(monitor, WatchesPhrases):
            spec = monitor.phrase_spec
            groups.setdefault((spec.case_sensitive, spec.min_alt_prob), []).append(monitor)
    for members in groups.values():
        if len(members) < 2:
            continue
        matcher = PhraseMatcher(member.phrase_spec for member in members)
        for index, member in enumerate(members):
            member.share_phrases(matcher.view(index))


def literal_regex(pattern: str) -> str:
    """The regex a literal pattern is checked with in final text: the word-edge rule of the matcher.

    Word edges only where the pattern starts/ends with a word character, so
    "ass" does not fire inside "class" while "rm -rf /" still matches. The
    end only refuses a following lower-case letter: intermediate canvases
    often glue a noise token straight onto a word ("instructionsAttorney").
    """
    expression = re.escape(pattern)
    if re.match(r"\w", pattern):
        expression = r"\b" + expression
    if re.search(r"\w$", pattern):
        expression = expression + r"(?-i:(?![a-z0-9]))"
    return expression


_LOWER_OR_DIGIT = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")


def _gate(compiled: re.Pattern, case_sensitive: bool) -> str | None:
    """A literal of 3+ characters that every match of `compiled` starts with, as the scan sees it; None if unsure.

    Read from the regex's parse: its leading run of plain literals. Only case-sensitive regexes
    get one (under IGNORECASE, re also equates e.g. 'ſ' with 's', which lower-casing does not),
    and on a lower-cased scan only an ASCII prefix (its lower case is exact per character).
    """
    try:
        parsed = re._parser.parse(compiled.pattern, compiled.flags)
    except Exception:  # a private module: any surprise just means "no gate"
        return None
    prefix = ""
    for op, argument in parsed:
        if op is not re._constants.LITERAL:
            break
        prefix += chr(argument)
    if len(prefix) < 3 or parsed.state.flags & re.IGNORECASE or not (case_sensitive or prefix.isascii()):
        return None
    return prefix if case_sensitive else prefix.lower()


def _at_word_edges(text: str, start: int, stop: int, pattern: str) -> bool:
    """literal_regex's edge rule, checked on a found occurrence."""
    if pattern[:1].isalnum() or pattern[:1] == "_":
        if start > 0 and (text[start - 1].isalnum() or text[start - 1] == "_"):
            return False
    if pattern[-1:].isalnum() or pattern[-1:] == "_":
        if stop < len(text) and text[stop] in _LOWER_OR_DIGIT:
            return False
    return True


def _surface_forms(pattern: str, case_sensitive: bool) -> set[str]:
    forms = {pattern}
    if not case_sensitive:
        forms |= {pattern.lower(), pattern[:1].upper() + pattern[1:].lower(), pattern.upper()}
    # A phrase mid-sentence is tokenised with its leading space.
    return forms | {" " + form for form in forms}


def _build_lattice(literals: list[tuple[int, str]], case_sensitive: bool, vocab: Vocabulary,
                   spec_of: Callable[[int], int]) -> _Lattice | None:
    sequences: list[tuple[int, list[int]]] = []
    seen: set[tuple[int, tuple[int, ...]]] = set()  # (spec, tokens): one pattern per spec reports a tokenisation
    for index, pattern in literals:
        for form in sorted(_surface_forms(pattern, case_sensitive)):
            ids = vocab.encode(form)
            if ids and (spec_of(index), tuple(ids)) not in seen:
                seen.add((spec_of(index), tuple(ids)))
                sequences.append((index, ids))
    if not sequences:
        return None
    distinct = np.array(sorted({token for _, ids in sequences for token in ids}), dtype=np.int64)
    column = {int(token): i for i, token in enumerate(distinct)}
    # The per-step lookup gathers L x k entries from this table at random: a 1-byte table (up to 255
    # pattern tokens) stays in cache, a 4-byte one does not.
    column_of = np.zeros(vocab.size, dtype=np.uint8 if len(distinct) < 256 else np.int32)
    column_of[distinct] = np.arange(1, len(distinct) + 1, dtype=np.int32)
    width = max(len(ids) for _, ids in sequences)
    matrix = np.full((len(sequences), width), len(distinct), dtype=np.int64)
    for row, (_, ids) in enumerate(sequences):
        matrix[row, : len(ids)] = [column[t] for t in ids]
    return _Lattice(
        tokens=distinct, column_of=column_of, sequences=matrix,
        pattern_of=np.array([index for index, _ in sequences]),
        lengths=np.array([len(ids) for _, ids in sequences]),
    )


@kernel
def _any_kept(ids, probs, column_of, threshold):
    """Whether any pattern token (column_of > 0) is kept with at least `threshold` somewhere.

    Slots are most probable first, so a row is read only down to its first slot under the
    threshold: most slots never cost a (random, cache-missing) table lookup.
    """
    length, k = ids.shape
    for i in range(length):
        if i + 4 < length:  # the lookups of a row a few positions ahead, so their misses overlap
            for c in range(k):
                if probs[i + 4, c] < threshold:
                    break
                prefetch(column_of, ids[i + 4, c])
        for c in range(k):
            if probs[i, c] < threshold:
                break
            if column_of[ids[i, c]] > 0:
                return True
    return False


def _sighting(step: DecodedStep, start: int, stop: int, matched: str, via: str) -> Sighting:
    offsets = step.char_offsets
    first = int(np.searchsorted(offsets, start, side="right")) - 1
    last = int(np.searchsorted(offsets, stop, side="left")) - 1
    positions = tuple(range(max(first, 0), max(last, first) + 1))
    return Sighting(step.block, step.step, positions, _snippet(step, positions, matched), via)


def _snippet(step: DecodedStep, positions: tuple[int, ...], matched: str) -> str:
    """Top-1 context either side of the match, the matched text in brackets."""
    left = step.span_text(positions[0] - CONTEXT_POSITIONS, positions[0])
    right = step.span_text(positions[-1] + 1, positions[-1] + 1 + CONTEXT_POSITIONS)
    return f"{left}[{matched}]{right}"
