"""Finding watched phrases in a decoded step: one pass shared by every monitor that watches phrases.

A `PhraseSpec` is what one monitor watches (literal phrases, regexes, case
rule, the top-k probability a lattice token needs). A `PhraseMatcher` matches
the union of several specs in one pass per step:
  - literals: one Aho-Corasick pass over the step's top-1 tokens, compiled
    over their pieces' characters (canvaswatch.monitors.phrase_scan; lower-cased
    piece by piece for case-insensitive specs), with the word-edge rule;
  - regexes: one scan each of the top-1 text, matched as written; a
    case-sensitive regex with a literal every match contains (3+ characters,
    e.g. the default `AKIA...`, or punctuation such as an e-mail's "@") has it
    added to the Aho-Corasick pass as a gate and is scanned only on steps whose
    canvas holds it, so most steps never build the text;
  - literals across the top-k alternatives: one compiled walk of the canvas
    through a trie of every tokenisation of every pattern. A per-vocabulary
    table says which ids occur in some pattern at all; only kept slots holding
    one of those advance the walk, so the work follows the alternatives that
    could complete a pattern, not every alternative above `min_alt_prob`
    (realistic undecided positions keep 5-8 tokens over 0.05, and common
    words such as " the" belong to many phrases).
`OutputCheck` says which patterns a finished request's output holds, each by
its own rule (literal_regex for literals, the regex as written): one compiled
pass for all the literals (phrase_scan.TextScan), each hit's edges checked by its
own regex, and one search per regex.
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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import ahocorasick
import numpy as np
import structlog

from canvaswatch.monitors.base import DecodedStep, Vocabulary
from canvaswatch.monitors.compiled import is_large, kernel, prefetch
from canvaswatch.monitors.phrase_scan import CompiledScan, ScanCarry, TextScan, vocabulary_pieces

log = structlog.get_logger(__name__)

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
    """Token sequences of the literal patterns, and the trie of them the per-step walk follows."""

    tokens: np.ndarray  # [U] distinct token ids
    column_of: np.ndarray  # [V] uint8/int32: 1 + column of each vocabulary id, 0 = in no pattern
    sequences: np.ndarray  # [S, M] column indices into tokens, U = padding past a sequence's end
    pattern_of: np.ndarray  # [S] pattern index of each sequence
    lengths: np.ndarray  # [S]
    # The trie over the sequences' columns (node 0 = root), children of each node sorted by column:
    child_start: np.ndarray  # [N + 1] int64: node n's children are child_column/child_node[start[n]:start[n+1]]
    child_column: np.ndarray  # [E] int64
    child_node: np.ndarray  # [E] int64
    depth: np.ndarray  # [N] int64: tokens from the root
    out_start: np.ndarray  # [N + 1] int64: sequences ending at node n are out_sequence[out_start[n]:out_start[n+1]]
    out_sequence: np.ndarray  # [S] int64
    # The walk's scratch, reused by every step so a step costs nothing per trie node: two
    # generations of active nodes, each node's last stamp, and the next unused stamp. Safe to
    # share between streams: a kernel holds the GIL (canvaswatch.monitors.compiled), so one
    # walk runs at a time per process, and each walk takes fresh stamps.
    active: np.ndarray  # [2N] int64
    stamp: np.ndarray  # [N] int64
    next_stamp: np.ndarray  # [1] int64


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
        # contains, so the regex (and the text it needs) runs only on canvases that hold it.
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

    def match(self, step: DecodedStep, carry: ScanCarry | None = None) -> dict[int, Sighting]:
        """First sighting of every present pattern (global index), computed once per step.

        `carry`: the calling request's last scan, to reuse (phrase_scan.ScanCarry); the answer is the same without it.
        """
        memo = step.memo
        found = memo.get(self)
        if found is None:
            found = self._match_text(step, carry)
            for index, sighting in self._match_lattice(step).items():
                found.setdefault(index, sighting)
            memo[self] = found
        return found

    def _match_text(self, step: DecodedStep, carry: ScanCarry | None = None) -> dict[int, Sighting]:
        found: dict[int, Sighting] = {}
        gated: set[int] = set()
        for end, key in self._scan(step, carry):
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

    def _scan(self, step: DecodedStep, carry: ScanCarry | None = None) -> list[tuple[int, int]]:
        """(end character offset, key) of every key in the step's top-1 text, in text order."""
        if not self._keys:
            return []
        if self._automaton is not None:
            return list(self._automaton.iter(step.text if self.case_sensitive else step.text_lower))
        scan = self._scans.get(id(step.vocab))
        if scan is None:
            scan = self._scans.setdefault(id(step.vocab), CompiledScan(
                self._keys, vocabulary_pieces(step.vocab, lower=not self.case_sensitive)))
        return scan.scan(step.ids_np[:, 0], carry)

    def _match_lattice(self, step: DecodedStep) -> dict[int, Sighting]:
        lattice = self._lattice_for(step.vocab)
        if lattice is None:
            return {}
        starts, sequences = _lattice_hits(step.ids_np, step.probs_np, lattice, max(self.min_alt_prob, 1e-12))
        if not len(starts):
            return {}  # the usual step
        found: dict[int, Sighting] = {}
        # Smallest start first, then smallest sequence number: each pattern reports its leftmost sighting.
        for at in np.lexsort((sequences, starts)):
            position, sequence = int(starts[at]), int(sequences[at])
            index = int(lattice.pattern_of[sequence])
            if index in found:
                continue
            size = int(lattice.lengths[sequence])
            positions = tuple(range(position, position + size))
            phrase = step.vocab.decode(lattice.tokens[lattice.sequences[sequence, :size]].tolist())
            if not _lattice_at_word_edges(step, position, size, phrase, self._patterns[index]):
                continue  # "bomb" as the start of " bombastic": the top-1 text path's whole-word rule, here too
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

    def match(self, step: DecodedStep, carry: ScanCarry | None = None) -> dict[int, Sighting]:
        stop = self.offset + self.size
        return {index - self.offset: sighting for index, sighting in self.matcher.match(step, carry).items()
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


class OutputCheck:
    """Which patterns occur in a text: literals by literal_regex (case-folded unless case_sensitive), regexes as written.

    The same answer as searching the text with each pattern's own regex, which it does only where
    the compiled pass found the literal (and for each regex), so its cost does not grow with the
    number of literals. Where no compiled pass can be built it searches pattern by pattern.
    """

    def __init__(self, patterns: Sequence[str], regex: Sequence[str], case_sensitive: bool) -> None:
        flags = 0 if case_sensitive else re.IGNORECASE
        self.patterns = tuple(patterns)
        self.singles = [re.compile(literal_regex(p), flags) for p in self.patterns]
        self.singles += [re.compile(expression) for expression in regex]
        self._scan: TextScan | None = None
        if self.patterns:
            try:
                self._scan = TextScan(self.patterns, case_sensitive)
            except ValueError as err:
                log.warning("output_check_uncompiled", patterns=len(self.patterns), reason=str(err))

    def present(self, text: str, skip_regex: bool = False) -> set[int]:
        """Indices (literals, then regexes) of the patterns in `text`; `skip_regex`: literals only."""
        found: set[int] = set()
        literals = len(self.patterns)
        if self._scan is None:
            found.update(i for i in range(literals) if self.singles[i].search(text) is not None)
        else:
            for end, key in self._scan.scan(text):
                # the literal occurs at `start` (re's own character rule); its regex checks the edges
                if key not in found and self.singles[key].match(text, end - len(self.patterns[key]) + 1) is not None:
                    found.add(key)
        if not skip_regex:
            found.update(i for i in range(literals, len(self.singles)) if self.singles[i].search(text) is not None)
        return found


_LOWER_OR_DIGIT = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")


def _gate(compiled: re.Pattern, case_sensitive: bool) -> str | None:
    """A literal that every match of `compiled` contains, as the scan sees it; None if unsure or not worth a key.

    Read from the regex's parse: the longest run of plain literals at its top level (a top-level
    item is in every match), e.g. "AKIA" of `AKIA[0-9A-Z]{16}`, "@" of an e-mail address. Worth a
    key: 3+ characters, or punctuation only ("@", "-"), which prose holds far less often than a
    regex costs to run. Only case-sensitive regexes get one (under IGNORECASE, re also equates
    e.g. 'ſ' with 's', which lower-casing does not), and on a lower-cased scan only an ASCII run
    (its lower case is exact per character).
    """
    try:
        parsed = re._parser.parse(compiled.pattern, compiled.flags)
    except Exception:  # a private module: any surprise just means "no gate"
        return None
    runs, run = [], ""
    for op, argument in parsed:
        if op is re._constants.LITERAL:
            run += chr(argument)
            continue
        runs.append(run)
        run = ""
    runs.append(run)
    worth = [r for r in runs if len(r) >= 3 or (r and not any(c.isalnum() or c.isspace() for c in r))]
    if not worth or parsed.state.flags & re.IGNORECASE:
        return None
    gate = max(worth, key=len)  # the first of the longest
    if not (case_sensitive or gate.isascii()):
        return None
    return gate if case_sensitive else gate.lower()


def _at_word_edges(text: str, start: int, stop: int, pattern: str) -> bool:
    """literal_regex's edge rule, checked on a found occurrence."""
    if pattern[:1].isalnum() or pattern[:1] == "_":
        if start > 0 and (text[start - 1].isalnum() or text[start - 1] == "_"):
            return False
    if pattern[-1:].isalnum() or pattern[-1:] == "_":
        if stop < len(text) and text[stop] in _LOWER_OR_DIGIT:
            return False
    return True


def _lattice_at_word_edges(step: DecodedStep, position: int, size: int, phrase: str, pattern: str) -> bool:
    """_at_word_edges for a phrase found across the alternatives at positions [position, position + size):
    its neighbours are the top-1 tokens on either side (the canvas's most likely reading)."""
    ids = step.ids_np[:, 0]
    before = step.vocab.decode([int(ids[position - 1])]) if position > 0 else ""
    after = step.vocab.decode([int(ids[position + size])]) if position + size < len(ids) else ""
    return _at_word_edges(before + phrase + after, len(before) + (len(phrase) - len(phrase.lstrip())),
                          len(before) + len(phrase), pattern)


def _surface_forms(pattern: str, case_sensitive: bool) -> set[str]:
    forms = {pattern}
    if not case_sensitive:
        title = " ".join(word[:1].upper() + word[1:].lower() for word in pattern.split(" "))  # "Ignore All Previous"
        forms |= {pattern.lower(), pattern[:1].upper() + pattern[1:].lower(), pattern.upper(), title}
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
    # The per-step walk gathers a kept slot's entry from this table at random: a 1-byte table (up
    # to 255 pattern tokens) stays in cache, a 4-byte one does not.
    column_of = np.zeros(vocab.size, dtype=np.uint8 if len(distinct) < 256 else np.int32)
    column_of[distinct] = np.arange(1, len(distinct) + 1, dtype=np.int32)
    width = max(len(ids) for _, ids in sequences)
    matrix = np.full((len(sequences), width), len(distinct), dtype=np.int64)
    for row, (_, ids) in enumerate(sequences):
        matrix[row, : len(ids)] = [column[t] for t in ids]
    children: list[dict[int, int]] = [{}]
    depth = [0]
    ends: list[list[int]] = [[]]
    for row, (_, ids) in enumerate(sequences):
        node = 0
        for token in ids:
            child = children[node].get(column[token])
            if child is None:
                child = children[node][column[token]] = len(children)
                children.append({})
                depth.append(depth[node] + 1)
                ends.append([])
            node = child
        ends[node].append(row)
    child_start = np.zeros(len(children) + 1, dtype=np.int64)
    np.cumsum([len(c) for c in children], out=child_start[1:])
    pairs = [sorted(c.items()) for c in children]
    out_start = np.zeros(len(children) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in ends], out=out_start[1:])
    return _Lattice(
        tokens=distinct, column_of=column_of, sequences=matrix,
        pattern_of=np.array([index for index, _ in sequences]),
        lengths=np.array([len(ids) for _, ids in sequences]),
        child_start=child_start,
        child_column=np.array([c for p in pairs for c, _ in p], dtype=np.int64),
        child_node=np.array([n for p in pairs for _, n in p], dtype=np.int64),
        depth=np.array(depth, dtype=np.int64),
        out_start=out_start,
        out_sequence=np.array([row for e in ends for row in e], dtype=np.int64),
        active=np.zeros(2 * len(children), dtype=np.int64),
        stamp=np.full(len(children), -1, dtype=np.int64),
        next_stamp=np.zeros(1, dtype=np.int64),
    )


def _lattice_hits(ids: np.ndarray, probs: np.ndarray, lattice: _Lattice,
                  threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(start position, sequence number) of every sequence whose tokens are kept at consecutive positions."""
    room = 64  # per call: streams may match at once on other threads
    walk, active, stamp, next_stamp = _walk_lattice, lattice.active, lattice.stamp, lattice.next_stamp
    if is_large(len(ids)):
        # The GIL-free twin may run beside another stream's walk: it gets scratch of its own, not the lattice's.
        walk, nodes = _walk_lattice.gil_free, len(lattice.stamp)
        active, stamp, next_stamp = np.empty(2 * nodes, np.int64), np.full(nodes, -1, np.int64), np.zeros(1, np.int64)
    while True:
        starts, sequences = np.empty(room, dtype=np.int64), np.empty(room, dtype=np.int64)
        count = walk(ids, probs, threshold, lattice.column_of, lattice.child_start, lattice.child_column,
                     lattice.child_node, lattice.depth, lattice.out_start, lattice.out_sequence,
                     active, stamp, next_stamp, starts, sequences)
        if count <= room:
            return starts[:count], sequences[:count]
        room = count  # a canvas full of watched phrases: walk again with room for every hit


@kernel(gil_free_twin=True)
def _walk_lattice(ids, probs, threshold, column_of, child_start, child_column, child_node, depth, out_start,
                  out_sequence, active, stamp, next_stamp, hits_start, hits_sequence):
    """Walk the canvas's kept pattern tokens through the trie; returns the hit count.

    At position i the active nodes are the trie's prefixes kept at positions i - depth + 1 .. i.
    Each kept slot (prob >= threshold) whose id is in some pattern extends the root and every
    node active at i - 1 by one token; any other slot costs one probability load and, if kept,
    one table lookup. So a step's work is L x k loads plus (active nodes + 1) x (kept pattern
    tokens), whatever the mass on the rest of the row. `active` holds two generations of at
    most N nodes each; `stamp[n] == base + i` marks n as already active at i (a token kept
    twice at one position, or two paths to one node, count once), `base` being this walk's
    first stamp, so no step clears the array.
    """
    length, k = ids.shape
    nodes = depth.shape[0]
    vocabulary = column_of.shape[0]
    base = next_stamp[0]
    next_stamp[0] = base + length
    previous, current = 0, nodes  # offsets of the two generations in `active`
    count_previous = 0
    count = 0
    room = hits_start.shape[0]
    for i in range(length):
        if i + 4 < length:  # the lookups of a row a few positions ahead, so their misses overlap
            for c in range(k):
                if probs[i + 4, c] >= threshold:
                    prefetch(column_of, ids[i + 4, c])
        count_current = 0
        for c in range(k):
            if not probs[i, c] >= threshold:  # NaN is not kept, as in the definition's `probs >= threshold`
                continue
            token = ids[i, c]
            if token < 0 or token >= vocabulary:  # no pattern token; never read outside the table
                continue
            column = np.int64(column_of[token]) - 1
            if column < 0:
                continue
            for a in range(-1, count_previous):
                node = 0 if a < 0 else active[previous + a]
                low, high = child_start[node], child_start[node + 1]
                while low < high:  # binary search of the node's children for the column
                    middle = (low + high) // 2
                    if child_column[middle] < column:
                        low = middle + 1
                    else:
                        high = middle
                if low == child_start[node + 1] or child_column[low] != column:
                    continue
                child = child_node[low]
                if stamp[child] == base + i:
                    continue
                stamp[child] = base + i
                active[current + count_current] = child
                count_current += 1
                for o in range(out_start[child], out_start[child + 1]):
                    if count < room:
                        hits_start[count] = i - depth[child] + 1
                        hits_sequence[count] = out_sequence[o]
                    count += 1
        previous, current = current, previous
        count_previous = count_current
    return count


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
