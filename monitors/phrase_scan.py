"""A compiled Aho-Corasick scan of a canvas's top-1 text that never builds the text.

Why: reading a 1,024-position canvas as a Python string costs a cache miss per
token (its piece sits somewhere in a 262,144-entry table) and then the scan walks
the string again; together they were most of a step at L = 1,024. Here every
vocabulary piece is stored once as one small code per character (its index in
the watched phrases' alphabet, 0 for any other character, which no phrase
contains), and one compiled loop walks the canvas's tokens through an
Aho-Corasick automaton over those codes. A hit is (end character offset, key):
character offsets are those of the text (one code per character), so matches
map back to positions exactly as a scan of the text would.

The automaton is a full transition table (states x codes): used while the
phrases have at most 255 distinct characters and the table stays under
MAX_TABLE entries, which any hand-written lexicon does. Larger ones fall back
to pyahocorasick over the text (`PhraseMatcher` decides).
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

import numpy as np

from canvaswatch.monitors.base import Vocabulary, lower_keeping_length
from canvaswatch.monitors.compiled import kernel, prefetch

MAX_CODES = 255  # codes are bytes; 0 stands for every character outside the phrases
MAX_TABLE = 1 << 22  # states x (codes + 1) int32 entries: 16 MB


class CompiledScan:
    """Keys (strings, already case-folded as the caller matches) compiled for one vocabulary's pieces."""

    def __init__(self, keys: Sequence[str], pieces: Sequence[str]) -> None:
        alphabet = sorted({char for key in keys for char in key})
        code_of = {char: code for code, char in enumerate(alphabet, start=1)}
        self.delta, self.out_start, self.out_key = _automaton([[code_of[c] for c in key] for key in keys], len(alphabet))
        self.starts, self.codes = _piece_codes(pieces, code_of)

    @staticmethod
    def fits(keys: Sequence[str]) -> bool:
        alphabet = {char for key in keys for char in key}
        states = 1 + sum(len(key) for key in keys)  # an upper bound: the trie shares prefixes
        return len(alphabet) <= MAX_CODES and states * (len(alphabet) + 1) <= MAX_TABLE

    def scan(self, ids: np.ndarray) -> list[tuple[int, int]]:
        """Every (end character offset, key index) where a key ends in the text of `ids`, in text order."""
        room = 64  # per call, not per scanner: streams may scan at once on other threads
        while True:
            ends, keys = np.empty(room, dtype=np.int64), np.empty(room, dtype=np.int64)
            count = _scan(ids, self.starts, self.codes, self.delta, self.out_start, self.out_key, ends, keys)
            if count < 0:
                raise IndexError(f"token id outside the vocabulary [0, {len(self.starts) - 1})")
            if count <= room:
                return list(zip(ends[:count].tolist(), keys[:count].tolist()))
            room = count  # a canvas full of watched phrases: scan again with room for every hit


def vocabulary_pieces(vocab: Vocabulary, lower: bool) -> list[str]:
    """Every token's piece (lower-cased piece by piece, lengths kept, when `lower`), as decode() joins them."""
    pieces = getattr(vocab, "pieces", None)
    if callable(pieces):
        return pieces(lower)
    found = [vocab.piece(i) for i in range(vocab.size)]
    return [lower_keeping_length(p) for p in found] if lower else found


def _automaton(keys: list[list[int]], codes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Aho-Corasick as a full table: delta[state, code], and each state's keys (its own and its suffixes')."""
    goto: list[dict[int, int]] = [{}]
    outputs: list[list[int]] = [[]]
    for index, key in enumerate(keys):
        state = 0
        for code in key:
            if code not in goto[state]:
                goto.append({})
                outputs.append([])
                goto[state][code] = len(goto) - 1
            state = goto[state][code]
        outputs[state].append(index)
    delta = np.zeros((len(goto), codes + 1), dtype=np.int32)  # code 0 and every miss at the root: stay at the root
    fail = [0] * len(goto)
    queue = deque()
    for code, child in goto[0].items():
        delta[0, code] = child
        queue.append(child)
    while queue:  # breadth first: a state's fail target is shallower, so complete before it
        state = queue.popleft()
        outputs[state] = outputs[state] + outputs[fail[state]]
        delta[state] = delta[fail[state]]
        for code, child in goto[state].items():
            fail[child] = int(delta[fail[state], code])
            delta[state, code] = child
            queue.append(child)
    out_start = np.zeros(len(goto) + 1, dtype=np.int64)
    np.cumsum([len(o) for o in outputs], out=out_start[1:])
    out_key = np.array([k for o in outputs for k in o], dtype=np.int64)
    return delta, out_start, out_key


def _piece_codes(pieces: Sequence[str], code_of: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """All pieces as one code per character, and where each piece starts (int32: half the bytes to miss)."""
    lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    starts = np.zeros(len(pieces) + 1, dtype=np.int32)
    starts[1:] = np.cumsum(lengths)
    points = np.frombuffer("".join(pieces).encode("utf-32-le", "surrogatepass"), dtype="<u4")
    table = np.zeros(0x110000, dtype=np.uint8)
    for char, code in code_of.items():
        table[ord(char)] = code
    return starts, table[points]


# Tokens ahead to prefetch: a piece's offsets first, its codes once the offsets have arrived.
_AHEAD_OFFSETS, _AHEAD_CODES = 16, 8


@kernel
def _scan(ids, starts, codes, delta, out_start, out_key, hits_end, hits_key):
    """Walk the tokens' codes through the automaton; returns the hit count (-1: an id outside the table)."""
    count_ids = ids.shape[0]
    table = starts.shape[0] - 1
    for j in range(count_ids):
        if ids[j] < 0 or ids[j] >= table:
            return -1
    for j in range(min(count_ids, _AHEAD_OFFSETS)):
        prefetch(starts, ids[j])
    state = 0
    offset = 0
    count = 0
    room = hits_end.shape[0]
    for j in range(count_ids):
        if j + _AHEAD_OFFSETS < count_ids:
            prefetch(starts, ids[j + _AHEAD_OFFSETS])
        if j + _AHEAD_CODES < count_ids:
            prefetch(codes, starts[ids[j + _AHEAD_CODES]])
        token = ids[j]
        for at in range(starts[token], starts[token + 1]):
            state = delta[state, codes[at]]
            for o in range(out_start[state], out_start[state + 1]):
                if count < room:
                    hits_end[count] = offset
                    hits_key[count] = out_key[o]
                count += 1
            offset += 1
    return count
