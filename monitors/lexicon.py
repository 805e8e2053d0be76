"""lexicon: watched phrases in every intermediate canvas, and whether they reached the output.

Definition. A pattern (a literal phrase, or a regular expression) is *present*
at a step when either
  1. it matches the step's top-1 canvas text (literals and regexes), or
  2. (literals only) some tokenisation of it occupies consecutive positions in
     the kept top-k, each token holding at least `min_alt_prob` at its
     position: a phrase the model is weighing but that is not (yet) top-1.
The first step a pattern is present raises a flag at once (so the serving stack
can act mid-generation); at the end of the request a second flag per present
pattern says whether it survived into the final output. A pattern that is only
in intermediate canvases is the paper's intermediate-context case: an
output-only filter never sees it.

Case. `case_sensitive` applies to literal patterns; a regex is matched as
written (add `(?i)` to it for case-insensitivity), which keeps its literal
prefix fast to scan for.

Cost. Literal patterns are matched in one Aho-Corasick pass over the canvas
text, each regex in one scan (C-speed where it starts with a literal), and
the top-k lattice in one vectorised
pass: a lookup table maps every vocabulary id to its pattern-token column, so
membership is a gather over the [L, k] ids, then one AND per token offset
over all tokenisations at once. Not pattern by pattern. State per request is
one record per pattern seen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

import ahocorasick
import numpy as np

from canvaswatch.monitors.base import DecodedStep, Evidence, FinalCanvas, Flag, RequestMeta, Severity, Vocabulary

# Shipped so that the default configuration watches something useful with no
# external file: unambiguous markers of prompt injection, credential leaks and
# mass-harm instructions. Real deployments replace these in the TOML config.
DEFAULT_PATTERNS: tuple[str, ...] = (
    "ignore all previous instructions",
    "ignore previous instructions",
    "BEGIN RSA PRIVATE KEY",
    "rm -rf /",
    "synthesize sarin",
    "build a pipe bomb",
    "disable the safety interlock",
)
# Starts with a literal, so `re` scans for "AKIA" at C speed (a leading \b would make it try every position).
DEFAULT_REGEX: tuple[str, ...] = (r"AKIA[0-9A-Z]{16}(?![0-9A-Z])",)

CONTEXT_POSITIONS = 4  # tokens of context either side of a match in evidence


@dataclass(frozen=True)
class LexiconParams:
    patterns: list[str] = field(default_factory=lambda: list(DEFAULT_PATTERNS))
    regex: list[str] = field(default_factory=lambda: list(DEFAULT_REGEX))
    case_sensitive: bool = False
    severity: str = "warning"
    output_severity: str = "critical"
    min_alt_prob: float = 0.05

    def __post_init__(self) -> None:
        if not self.patterns and not self.regex:
            raise ValueError("patterns: at least one pattern or regex is needed")
        for i, pattern in enumerate(self.patterns):
            if not pattern.strip():
                raise ValueError(f"patterns[{i}]: empty pattern")
        for i, expression in enumerate(self.regex):
            try:
                re.compile(expression)
            except re.error as err:
                raise ValueError(f"regex[{i}]: invalid regular expression {expression!r}: {err}") from None
        Severity.parse(self.severity)
        Severity.parse(self.output_severity)
        if not 0.0 <= self.min_alt_prob <= 1.0:
            raise ValueError(f"min_alt_prob: must be in [0, 1], got {self.min_alt_prob}")


@dataclass
class _Sighting:
    block: int
    step: int
    positions: tuple[int, ...]
    snippet: str
    via: str  # "top1" or "topk"
    steps_present: int = 1
    last_block: int = -1
    last_step: int = -1


@dataclass
class LexiconState:
    seen: dict[int, _Sighting] = field(default_factory=dict)


@dataclass(frozen=True)
class _Lattice:
    """Token sequences of the literal patterns, padded into one matrix for a vectorised match."""

    tokens: np.ndarray  # [U] distinct token ids
    column_of: np.ndarray  # [V] int32: 1 + column of each vocabulary id, 0 = in no pattern
    sequences: np.ndarray  # [S, M] column indices into tokens, U = padding (always matches)
    pattern_of: np.ndarray  # [S] pattern index of each sequence
    lengths: np.ndarray  # [S]


class LexiconMonitor:
    name: ClassVar[str] = "lexicon"
    description: ClassVar[str] = (
        "Watched phrases (literal or regex) in every intermediate canvas's top-1 text and in its "
        "top-k alternatives; says when each first appeared and whether it survived to the output."
    )
    Params: ClassVar[type] = LexiconParams

    def __init__(self, params: LexiconParams) -> None:
        self.params = params
        self.labels: list[str] = list(params.patterns) + list(params.regex)
        flags = 0 if params.case_sensitive else re.IGNORECASE
        alternatives = [_literal_regex(p) for p in params.patterns] + list(params.regex)
        # Lookahead groups report every start offset, so overlapping patterns are all found in one pass.
        self._combined = _combined(alternatives, 0, flags)
        self._regexes = [(len(params.patterns) + i, re.compile(expr)) for i, expr in enumerate(params.regex)]
        self._singles = [re.compile(expr, flags) for expr in alternatives[: len(params.patterns)]]
        self._singles += [compiled for _, compiled in self._regexes]
        self._literals = ahocorasick.Automaton()
        for index, pattern in enumerate(params.patterns):
            key = pattern if params.case_sensitive else pattern.lower()
            if self._literals.exists(key):
                continue  # the same phrase twice: the first index reports it
            self._literals.add_word(key, (index, len(key)))
        if len(self._literals):
            self._literals.make_automaton()
        self.severity = Severity.parse(params.severity)
        self.output_severity = Severity.parse(params.output_severity)
        self._lattices: dict[int, _Lattice | None] = {}

    def start(self, request: RequestMeta) -> LexiconState:
        return LexiconState()

    def on_step(self, state: LexiconState, step: DecodedStep) -> list[Flag]:
        found = self._match_text(step)
        for index, sighting in self._match_lattice(step).items():
            found.setdefault(index, sighting)
        flags = []
        for index, sighting in sorted(found.items()):
            previous = state.seen.get(index)
            if previous is not None:
                previous.steps_present += 1
                previous.last_block, previous.last_step = step.block, step.step
                continue
            sighting.last_block, sighting.last_step = step.block, step.step
            state.seen[index] = sighting
            flags.append(self._appearance_flag(index, sighting))
        return flags

    def on_finish(self, state: LexiconState, final: FinalCanvas) -> list[Flag]:
        flags = []
        for index, single in enumerate(self._singles):
            in_output = single.search(final.text) is not None
            sighting = state.seen.get(index)
            if sighting is None and not in_output:
                continue
            attributes = {"pattern": self.labels[index], "survived_to_output": str(in_output).lower()}
            evidence: tuple[Evidence, ...] = ()
            if sighting is not None:
                attributes.update(
                    first_block=str(sighting.block),
                    first_step=str(sighting.step),
                    last_block=str(sighting.last_block),
                    last_step=str(sighting.last_step),
                    steps_present=str(sighting.steps_present),
                    seen_via=sighting.via,
                )
                evidence = (Evidence(sighting.block, sighting.step, sighting.positions, sighting.snippet),)
            where = "survived into the output" if in_output else "was in intermediate canvases only, gone from the output"
            flags.append(
                Flag(
                    monitor=self.name,
                    severity=self.output_severity if in_output else self.severity,
                    reason=f"pattern {self.labels[index]!r} {where}",
                    score=1.0,
                    evidence=evidence,
                    attributes=attributes,
                )
            )
        return flags

    def _appearance_flag(self, index: int, sighting: _Sighting) -> Flag:
        return Flag(
            monitor=self.name,
            severity=self.severity,
            reason=(
                f"pattern {self.labels[index]!r} appeared at block {sighting.block} step {sighting.step} "
                f"({'top-1 text' if sighting.via == 'top1' else 'top-k alternatives'})"
            ),
            score=1.0,
            evidence=(Evidence(sighting.block, sighting.step, sighting.positions, sighting.snippet),),
            attributes={
                "pattern": self.labels[index],
                "first_block": str(sighting.block),
                "first_step": str(sighting.step),
                "seen_via": sighting.via,
                "survived_to_output": "unknown",
            },
        )

    def _match_text(self, step: DecodedStep) -> dict[int, _Sighting]:
        text = step.text
        searched = text if self.params.case_sensitive else step.text_lower
        if len(searched) != len(text):
            # A lower-casing that changes length (rare Unicode) would shift offsets: use the regex pass.
            return self._regex_sightings(step, self._combined)
        found: dict[int, _Sighting] = {}
        if len(self._literals):
            for end, (index, size) in self._literals.iter(searched):
                start = end - size + 1
                if index in found or not _at_word_edges(text, start, end + 1, self.params.patterns[index]):
                    continue
                found[index] = self._sighting(step, start, end + 1, text[start : end + 1], "top1")
        for index, compiled in self._regexes:
            if index not in found and (match := compiled.search(text)) is not None:
                found[index] = self._sighting(step, match.start(), match.end(), match.group(0), "top1")
        return found

    def _regex_sightings(self, step: DecodedStep, combined: re.Pattern) -> dict[int, _Sighting]:
        found: dict[int, _Sighting] = {}
        for match in combined.finditer(step.text):
            for name, value in match.groupdict().items():
                index = int(name[1:])
                if value is not None and index not in found:
                    found[index] = self._sighting(step, match.start(), match.start() + len(value), value, "top1")
        return found

    def _sighting(self, step: DecodedStep, start: int, stop: int, matched: str, via: str) -> _Sighting:
        offsets = step.vocab.char_offsets(step.ids_np[:, 0])
        first = int(np.searchsorted(offsets, start, side="right")) - 1
        last = int(np.searchsorted(offsets, stop, side="left")) - 1
        positions = tuple(range(max(first, 0), max(last, first) + 1))
        return _Sighting(step.block, step.step, positions, _snippet(step, positions, matched), via)

    def _match_lattice(self, step: DecodedStep) -> dict[int, _Sighting]:
        lattice = self._lattice_for(step.vocab)
        if lattice is None:
            return {}
        ids, probs = step.ids_np, step.probs_np
        columns = lattice.column_of[ids]  # [L, k]: 1 + pattern-token column, 0 = none
        present = (columns > 0) & (probs >= max(self.params.min_alt_prob, 1e-12))
        if not present.any():
            return {}
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
        found: dict[int, _Sighting] = {}
        for position, sequence in np.argwhere(hits):
            index = int(lattice.pattern_of[sequence])
            if index in found:
                continue
            size = int(lattice.lengths[sequence])
            positions = tuple(range(int(position), int(position) + size))
            phrase = step.vocab.decode(lattice.tokens[lattice.sequences[sequence, :size]].tolist())
            found[index] = _Sighting(step.block, step.step, positions, _snippet(step, positions, phrase), "topk")
        return found

    def _lattice_for(self, vocab: Vocabulary) -> _Lattice | None:
        key = id(vocab)
        if key not in self._lattices:
            self._lattices[key] = _build_lattice(self.params, vocab)
        return self._lattices[key]


def _literal_regex(pattern: str) -> str:
    # Word edges only where the pattern starts/ends with a word character, so
    # "ass" does not fire inside "class" while "rm -rf /" still matches. The
    # end only refuses a following lower-case letter: intermediate canvases
    # often glue a noise token straight onto a word ("instructionsAttorney").
    expression = re.escape(pattern)
    if re.match(r"\w", pattern):
        expression = r"\b" + expression
    if re.search(r"\w$", pattern):
        expression = expression + r"(?-i:(?![a-z0-9]))"
    return expression


def _surface_forms(pattern: str, case_sensitive: bool) -> set[str]:
    forms = {pattern}
    if not case_sensitive:
        forms |= {pattern.lower(), pattern[:1].upper() + pattern[1:].lower(), pattern.upper()}
    # A phrase mid-sentence is tokenised with its leading space.
    return forms | {" " + form for form in forms}


def _build_lattice(params: LexiconParams, vocab: Vocabulary) -> _Lattice | None:
    sequences: list[tuple[int, list[int]]] = []
    for index, pattern in enumerate(params.patterns):
        for form in sorted(_surface_forms(pattern, params.case_sensitive)):
            ids = vocab.encode(form)
            if ids:
                sequences.append((index, ids))
    if not sequences:
        return None
    distinct = np.array(sorted({token for _, ids in sequences for token in ids}), dtype=np.int64)
    column = {int(token): i for i, token in enumerate(distinct)}
    column_of = np.zeros(vocab.size, dtype=np.int32)
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


_LOWER_OR_DIGIT = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")


def _combined(expressions: list[str], first_index: int, flags: int) -> re.Pattern:
    return re.compile("|".join(f"(?=(?P<p{first_index + i}>{e}))" for i, e in enumerate(expressions)), flags)


def _at_word_edges(text: str, start: int, stop: int, pattern: str) -> bool:
    """The literal-pattern edge rule of _literal_regex, checked on a found occurrence."""
    if pattern[:1].isalnum() or pattern[:1] == "_":
        if start > 0 and (text[start - 1].isalnum() or text[start - 1] == "_"):
            return False
    if pattern[-1:].isalnum() or pattern[-1:] == "_":
        if stop < len(text) and text[stop] in _LOWER_OR_DIGIT:
            return False
    return True


def _snippet(step: DecodedStep, positions: tuple[int, ...], matched: str) -> str:
    """Top-1 context either side of the match, the matched text in brackets."""
    left = step.span_text(positions[0] - CONTEXT_POSITIONS, positions[0])
    right = step.span_text(positions[-1] + 1, positions[-1] + 1 + CONTEXT_POSITIONS)
    return f"{left}[{matched}]{right}"
