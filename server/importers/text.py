"""Text to Gemma ids for the captures that carry text instead of ids, and the placeholder ids.

Tokenising. bench_order.json and poem_order.json keep only `final_text` (the
first 300 characters), clean.json keeps `answer_traj` as strings. They are
tokenised with the project's default vocabulary (server.bottleneck.vocab:
`load_vocabulary(DEFAULT_TOKENIZER)`, the Gemma 3 tokenizer; any other
`tokenizer` spec works the same), with one addition: the Gemma 4 channel
markers `<|channel>` and `<channel|>` are the single ids 100 and 101 (the data's
README; the Gemma 3 tokenizer would spell them out in four pieces each). With
that, re-tokenising clean.json's `final_text` reproduces its `final_ids`
exactly, and a poem's text gives exactly as many ids as it has content
positions, which is what lets the importer put text ids on positions.

Placeholders. Where a capture has a content position but no token for it
(films_order.json has no text at all; bench_order.json's 300 characters end
long before its 256 positions), the position gets the placeholder id
`placeholder_base + position` (default base 256001: `<unused99>` onwards in the
Gemma 3 tokenizer, 6,143 such ids). A placeholder is in the vocabulary, reads
as a visible marker, matches no word list, and differs from its neighbours, so
it invents neither text nor repetition (a repeated token would look like
sequence smearing). Traces say which positions hold placeholders.
"""

from __future__ import annotations

import re
from typing import Protocol, Sequence

import numpy as np

CHANNEL_OPEN_ID = 100
CHANNEL_CLOSE_ID = 101
_MARKERS = {"<|channel>": CHANNEL_OPEN_ID, "<channel|>": CHANNEL_CLOSE_ID}
_MARKER_SPLIT = re.compile("(" + "|".join(re.escape(m) for m in _MARKERS) + ")")

PAD_ID = 0  # '<pad>': what the real canvases hold after the content (clean.json's final_ids)
GEMMA_VOCAB_SIZE = 262_144
PLACEHOLDER_BASE = 256_001
PLACEHOLDER_COUNT = GEMMA_VOCAB_SIZE - PLACEHOLDER_BASE
TEXT_LIMIT = 300  # bench_order/poem_order keep the first 300 characters of the output


class TextEncoder(Protocol):
    """What the importers need of a vocabulary: server.bottleneck.vocab.TokenizerVocabulary has it."""

    size: int

    def encode(self, text: str) -> list[int]: ...


def load_encoder(spec: str | None = None) -> TextEncoder:
    """The project's vocabulary (`spec` as in config `[vocab] tokenizer`; default: the Gemma tokenizer)."""
    from canvaswatch.server.bottleneck.vocab import DEFAULT_TOKENIZER, load_vocabulary

    return load_vocabulary(spec or DEFAULT_TOKENIZER)


def encode_text(encoder: TextEncoder, text: str) -> list[int]:
    """`text` as Gemma ids, the channel markers as their single ids."""
    ids: list[int] = []
    for part in _MARKER_SPLIT.split(text):
        if part in _MARKERS:
            ids.append(_MARKERS[part])
        elif part:
            ids.extend(encoder.encode(part))
    return ids


def placeholder_ids(positions: np.ndarray, base: int = PLACEHOLDER_BASE, vocab_size: int = GEMMA_VOCAB_SIZE) -> np.ndarray:
    """The placeholder id of each position: base + position, wrapping inside [base, vocab_size)."""
    count = vocab_size - base
    if count <= 0:
        raise ValueError(f"placeholder base {base} leaves no ids below the vocabulary size {vocab_size}")
    return base + np.asarray(positions, dtype=np.int64) % count


def ranges(positions: Sequence[int] | np.ndarray) -> str:
    """Positions as compact ranges: [0, 1, 2, 5, 7, 8] -> "0-2,5,7-8" (empty -> "")."""
    values = np.unique(np.asarray(positions, dtype=np.int64))
    if values.size == 0:
        return ""
    breaks = np.nonzero(np.diff(values) != 1)[0]
    starts = np.concatenate(([values[0]], values[breaks + 1]))
    ends = np.concatenate((values[breaks], [values[-1]]))
    return ",".join(str(s) if s == e else f"{s}-{e}" for s, e in zip(starts.tolist(), ends.tolist()))


def parse_ranges(text: str) -> list[int]:
    """The inverse of `ranges` (for readers of the attributes)."""
    out: list[int] = []
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        out.extend(range(int(first), int(last or first) + 1))
    return out
