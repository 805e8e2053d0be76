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

Cost. One matcher pass per step (canvaswatch.monitors.phrases): a compiled
Aho-Corasick pass over the top-1 tokens for the literals (and regexes' literal
prefixes), a scan per regex only where its prefix is present, and one pass
over the top-k lattice; the pass is shared with
`intermediate_context` when both run in one engine. At the end, one compiled
pass over the output for every literal (phrases.OutputCheck), and one search
per regex unless the output is the text the last step's regexes were already
run on (one canvas per request). State per request is one record per pattern
seen, and the last step's top-1 text where the matcher built it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

from canvaswatch.monitors.base import DecodedStep, Evidence, FinalCanvas, Flag, Monitor, RequestMeta, Severity
from canvaswatch.monitors.phrase_scan import ScanCarry
from canvaswatch.monitors.phrases import OutputCheck, PhraseSpec, Sighting, WatchesPhrases

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
                compiled = re.compile(expression)
            except re.error as err:
                raise ValueError(f"regex[{i}]: invalid regular expression {expression!r}: {err}") from None
            if compiled.search("") is not None:  # it would match everywhere, with no text to point at
                raise ValueError(f"regex[{i}]: {expression!r} matches the empty string, so it matches every canvas")
        Severity.parse(self.severity, "severity")
        Severity.parse(self.output_severity, "output_severity")
        if not 0.0 <= self.min_alt_prob <= 1.0:
            raise ValueError(f"min_alt_prob: must be in [0, 1], got {self.min_alt_prob}")


@dataclass
class _Seen:
    first: Sighting
    steps_present: int = 1
    last_block: int = -1
    last_step: int = -1


@dataclass
class LexiconState:
    seen: dict[int, _Seen] = field(default_factory=dict)
    # The last step's top-1 text if the matcher built it (it does to run an ungated regex), and the
    # regexes found in it: an output equal to that text needs no regex searched again.
    last_text: str | None = None
    last_regex: frozenset[int] = frozenset()
    scan: ScanCarry = field(default_factory=ScanCarry)  # the last top-1 scan, to reuse where the canvas held


class LexiconMonitor(WatchesPhrases, Monitor):
    """Watched phrases (literal or regex) in every intermediate canvas's top-1 text and in its
    top-k alternatives; says when each first appeared and whether it survived to the output."""

    name: ClassVar[str] = "lexicon"
    Params: ClassVar[type] = LexiconParams

    def __init__(self, params: LexiconParams) -> None:
        super().__init__(params)
        self.labels: list[str] = list(params.patterns) + list(params.regex)
        self.phrase_spec = PhraseSpec(tuple(params.patterns), tuple(params.regex), params.case_sensitive,
                                      params.min_alt_prob)
        # The output check: each pattern by its own rule, literals with the matcher's word-edge rule.
        self._output = OutputCheck(params.patterns, params.regex, params.case_sensitive)
        self._literals = len(params.patterns)
        self.severity = Severity.parse(params.severity)
        self.output_severity = Severity.parse(params.output_severity)

    def start(self, request: RequestMeta) -> LexiconState:
        return LexiconState()

    def on_step(self, state: LexiconState, step: DecodedStep) -> list[Flag]:
        flags = []
        found = self.phrases.match(step, state.scan)
        if self._literals < len(self.labels):
            # `text` is a cached property: present in the step's __dict__ only if something built it;
            # reading it through vars() never builds it here.
            state.last_text = vars(step).get("text")
            state.last_regex = frozenset(i for i in found if i >= self._literals) if state.last_text is not None \
                else frozenset()
        for index, sighting in sorted(found.items()):
            seen = state.seen.get(index)
            if seen is None:
                state.seen[index] = seen = _Seen(sighting, steps_present=0)
                flags.append(self._appearance_flag(index, sighting))
            seen.steps_present += 1
            seen.last_block, seen.last_step = step.block, step.step
        return flags

    def on_finish(self, state: LexiconState, final: FinalCanvas) -> list[Flag]:
        flags = []
        reuse = state.last_text is not None and state.last_text == final.text
        present = self._output.present(final.text, skip_regex=reuse)
        if reuse:
            present |= state.last_regex  # the same regexes on the same text
        for index in sorted(present | state.seen.keys()):
            in_output = index in present
            seen = state.seen.get(index)
            attributes = {"pattern": self.labels[index], "survived_to_output": str(in_output).lower()}
            evidence: tuple[Evidence, ...] = ()
            if seen is not None:
                first = seen.first
                attributes.update(
                    first_block=str(first.block),
                    first_step=str(first.step),
                    last_block=str(seen.last_block),
                    last_step=str(seen.last_step),
                    steps_present=str(seen.steps_present),
                    seen_via=first.via,
                )
                evidence = (Evidence(first.block, first.step, first.positions, first.snippet),)
            where = "survived into the output" if in_output else "was in intermediate canvases only, gone from the output"
            flags.append(self.flag(self.output_severity if in_output else self.severity,
                                   f"pattern {self.labels[index]!r} {where}", *evidence, **attributes))
        return flags

    def _appearance_flag(self, index: int, sighting: Sighting) -> Flag:
        return self.flag(
            self.severity,
            f"pattern {self.labels[index]!r} appeared at block {sighting.block} step {sighting.step} "
            f"({'top-1 text' if sighting.via == 'top1' else 'top-k alternatives'})",
            Evidence(sighting.block, sighting.step, sighting.positions, sighting.snippet),
            pattern=self.labels[index], first_block=sighting.block, first_step=sighting.step, seen_via=sighting.via,
            survived_to_output="unknown",
        )
