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
MAX_TABLE entries, which lexicons of 10,000 phrases of common words do (~110k
states x 28 codes). Larger ones fall back to pyahocorasick over the text
(`PhraseMatcher` decides).

Successive steps of one request share most of their top-1 tokens (6-10% of positions change a
step in the calibrated profiles), so a request may keep a `ScanCarry`: the previous scan's token,
automaton state after each position, character offsets and hits. A position whose token and
incoming state equal the previous scan's walks exactly as it did then, so its state and hits are
copied instead of walked, and its piece (a cache miss into the vocabulary's tables) is never read.
Exact whatever the carry holds (another step, another block): a position only copies where both
inputs of its walk are equal.

`TextScan` is the same automaton over a str (the request's final output): each
character becomes its code through a table over every code point, built from
`re`'s own per-character case rule, so a key's hits are exactly where
`re.escape(key)` matches under re.IGNORECASE (or as written); the caller checks
word edges on those few hits. It replaces one regex search per phrase (a leading
`\b` keeps `re` from scanning for the literal, ~0.2 ms per phrase on a
1,300-character text) with one pass whatever the number of phrases.
"""

from __future__ import annotations

import functools
from collections import deque
from typing import Sequence

import numpy as np

from canvaswatch.monitors.base import Vocabulary, lower_keeping_length
from canvaswatch.monitors.compiled import kernel, prefetch, sized

MAX_CODES = 255  # codes are bytes; 0 stands for every character outside the phrases
MAX_TABLE = 1 << 22  # states x (codes + 1) int32 entries: 16 MB


class CompiledScan:
    """Keys (strings, already case-folded as the caller matches) compiled for one vocabulary's pieces."""

    def __init__(self, keys: Sequence[str], pieces: Sequence[str]) -> None:
        alphabet = sorted({char for key in keys for char in key})
        code_of = {char: code for code, char in enumerate(alphabet, start=1)}
        self.delta, self.out_start, self.out_key = _automaton([[code_of[c] for c in key] for key in keys], len(alphabet))
        self.starts, self.codes = _piece_codes(pieces, code_of)
        self.longest = max(int(np.diff(self.starts).max(initial=0)), 1)  # characters in the longest piece

    @staticmethod
    def fits(keys: Sequence[str]) -> bool:
        return _fits(keys, len({char for key in keys for char in key}))

    def scan(self, ids: np.ndarray, carry: "ScanCarry | None" = None) -> list[tuple[int, int]]:
        """Every (end character offset, key index) where a key ends in the text of `ids`, in text order.

        With a `carry` (one request's), positions that walk as in the carry's scan are copied from
        it, and the carry then holds this scan.
        """
        if carry is None:
            carry = ScanCarry()
        if carry.owner is not self:
            carry.reset(self)
        length = len(ids)
        if length * self.longest >= 2**31:  # far beyond server.max_message_bytes' default (~25M positions at k = 1)
            raise ValueError(f"canvas of {length} positions: its character offsets may not fit the scan's int32")
        walk = carry.spare_walk  # the next carry's token, state after, first character; swapped in on success
        if walk.shape[1] != length + 1:
            walk = np.empty((3, length + 1), dtype=np.int32)
        hits = carry.spare_hits  # position, end character offset, key
        while True:
            count = sized(_scan, length)(ids, self.starts, self.codes, self.delta, self.out_start, self.out_key,
                                         carry.walk, carry.hits, carry.count, walk, hits)
            if count < 0:
                raise IndexError(f"token id outside the vocabulary [0, {len(self.starts) - 1})")
            if count <= hits.shape[1]:
                break
            # a canvas full of watched phrases: again, with room for each hit (and more, if the count keeps rising)
            hits = np.empty((3, 2 * count), dtype=np.int64)
        carry.spare_walk, carry.walk = carry.walk, walk
        carry.spare_hits, carry.hits, carry.count = carry.hits, hits, count
        if not count:
            return []  # the usual step
        return list(zip(hits[1, :count].tolist(), hits[2, :count].tolist()))


class ScanCarry:
    """One request's last `CompiledScan.scan`, O(L): `walk` [3, L + 1] (int32: token ids, automaton states and
    character offsets all fit, 12 bytes a position) holds per position its token, the automaton state after
    it and its first character offset (row 2 ends with the text's length);
    `hits[:, :count]` each hit's position, end character offset and key, in text order. The spares
    are the buffers the next scan writes (a request scans one step at a time)."""

    def __init__(self) -> None:
        self.owner: CompiledScan | None = None  # the first scan sets the buffers up: a request start allocates nothing

    def reset(self, owner: "CompiledScan | None") -> None:
        self.owner = owner  # the scan whose automaton the states belong to
        self.walk = np.zeros((3, 1), dtype=np.int32)  # no positions: nothing to copy
        self.spare_walk = np.zeros((3, 1), dtype=np.int32)
        self.hits, self.spare_hits = np.empty((3, 64), dtype=np.int64), np.empty((3, 64), dtype=np.int64)
        self.count = 0


class TextScan:
    """Keys found in a str with `re`'s character rule: under re.IGNORECASE (case_sensitive False) or as written.

    Raises ValueError when the keys do not fit a compiled table (`fits`) or the case rule cannot be
    read from `re` (a private module changed): the caller then searches key by key.
    """

    def __init__(self, keys: Sequence[str], case_sensitive: bool) -> None:
        classes = _case_classes({char for key in keys for char in key}, case_sensitive)
        codes = {members: code for code, members in enumerate(sorted(set(classes.values())), start=1)}
        if not _fits(keys, len(codes)):
            raise ValueError(f"keys: {len(keys)} keys do not fit a compiled table")
        code_of = {char: codes[members] for char, members in classes.items()}
        self.delta, self.out_start, self.out_key = _automaton([[code_of[c] for c in key] for key in keys], len(codes))
        self.table = np.zeros(0x110000, dtype=np.uint8)
        if case_sensitive:
            for members, code in codes.items():
                self.table[list(members)] = code
        else:
            lower = _simple_lower()
            for members, code in codes.items():  # members: the simple lower cases that match the character
                self.table[np.isin(lower, np.array(sorted(members), dtype=np.uint32))] = code

    def scan(self, text: str) -> list[tuple[int, int]]:
        """Every (end character offset, key index) where a key occurs in `text`, in text order."""
        points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        codes = self.table[points]
        room = 64
        while True:
            ends, keys = np.empty(room, dtype=np.int64), np.empty(room, dtype=np.int64)
            count = _scan_codes(codes, self.delta, self.out_start, self.out_key, ends, keys)
            if count <= room:
                return list(zip(ends[:count].tolist(), keys[:count].tolist()))
            room = count


def _fits(keys: Sequence[str], codes: int) -> bool:
    """Whether the full table (trie states x (codes + 1)) stays under MAX_TABLE; the states counted exactly."""
    if codes > MAX_CODES:
        return False
    bound = 1 + sum(len(key) for key in keys)
    if bound * (codes + 1) <= MAX_TABLE:
        return True
    states = 1 + len({key[:end] for key in keys for end in range(1, len(key) + 1)})  # the trie shares prefixes
    return states * (codes + 1) <= MAX_TABLE


def _case_classes(alphabet: set[str], case_sensitive: bool) -> dict[str, frozenset[int]]:
    """Per character of the keys, what `re` compares it by: its code point, or under IGNORECASE the set of
    simple lower cases a text character may have to match it (sre's rule: its lower case plus
    re._casefix's extra cases, e.g. 'i' matches 'I', 'İ' and 'ı'). Two characters share a code only
    when their sets are equal; sets that overlap without being equal would make the table ambiguous."""
    if case_sensitive:
        return {char: frozenset((ord(char),)) for char in alphabet}
    try:
        import _sre
        from re._casefix import _EXTRA_CASES
    except ImportError as err:  # private modules: without them the caller searches key by key
        raise ValueError(f"case rule: {err}") from None
    classes = {}
    for char in alphabet:
        lower = _sre.unicode_tolower(ord(char))
        classes[char] = frozenset((lower, *_EXTRA_CASES.get(lower, ())))
    seen: dict[int, frozenset[int]] = {}
    for members in set(classes.values()):
        for point in members:
            if seen.setdefault(point, members) != members:
                raise ValueError(f"case rule: overlapping case classes at U+{point:04X}")
    return classes


@functools.lru_cache(maxsize=1)
def _simple_lower() -> np.ndarray:
    """Every code point's simple lower case as `re` computes it (0.2 s once per process)."""
    import _sre

    return np.fromiter(map(_sre.unicode_tolower, range(0x110000)), dtype=np.uint32, count=0x110000)


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


@kernel(gil_free_twin=True)
def _scan(ids, starts, codes, delta, out_start, out_key, last_walk, last_hits, last_count, walk, hits):
    """Walk the tokens' codes through the automaton, copying from the last scan (ScanCarry's walk, hits and
    count) each position whose token and incoming state are the same as there; writes this scan's walk
    and hits (with positions). Returns the hit count (-1: an id outside the table)."""
    count_ids = ids.shape[0]
    table = starts.shape[0] - 1
    for j in range(count_ids):
        if ids[j] < 0 or ids[j] >= table:
            return -1
    carried = last_walk.shape[1] == count_ids + 1
    for j in range(min(count_ids, _AHEAD_OFFSETS)):
        if not (carried and ids[j] == last_walk[0, j]):
            prefetch(starts, ids[j])
    state = 0
    offset = 0
    count = 0
    room = hits.shape[1]
    h = 0  # the last scan's hits are in position order: walk them alongside
    for j in range(count_ids):
        # prefetch the pieces of positions whose token changed (a position with the same token whose
        # incoming state differs is read too, unprefetched: it follows a change, usually within a few)
        ahead = j + _AHEAD_OFFSETS
        if ahead < count_ids and not (carried and ids[ahead] == last_walk[0, ahead]):
            prefetch(starts, ids[ahead])
        ahead = j + _AHEAD_CODES
        if ahead < count_ids and not (carried and ids[ahead] == last_walk[0, ahead]):
            prefetch(codes, starts[ids[ahead]])
        token = ids[j]
        walk[0, j] = token
        walk[2, j] = offset
        if carried and token == last_walk[0, j] and state == (last_walk[1, j - 1] if j > 0 else 0):
            while h < last_count and last_hits[0, h] < j:
                h += 1
            shift = offset - last_walk[2, j]
            while h < last_count and last_hits[0, h] == j:
                if count < room:
                    hits[0, count] = j
                    hits[1, count] = last_hits[1, h] + shift
                    hits[2, count] = last_hits[2, h]
                count += 1
                h += 1
            state = last_walk[1, j]
            offset += last_walk[2, j + 1] - last_walk[2, j]
        else:
            for at in range(starts[token], starts[token + 1]):
                state = delta[state, codes[at]]
                for o in range(out_start[state], out_start[state + 1]):
                    if count < room:
                        hits[0, count] = j
                        hits[1, count] = offset
                        hits[2, count] = out_key[o]
                    count += 1
                offset += 1
        walk[1, j] = state
    walk[0, count_ids] = 0
    walk[1, count_ids] = 0
    walk[2, count_ids] = offset
    return count


@kernel
def _scan_codes(codes, delta, out_start, out_key, hits_end, hits_key):
    """Walk a text's codes through the automaton; returns the hit count."""
    state = 0
    count = 0
    room = hits_end.shape[0]
    for at in range(codes.shape[0]):
        state = delta[state, codes[at]]
        for o in range(out_start[state], out_start[state + 1]):
            if count < room:
                hits_end[count] = at
                hits_key[count] = out_key[o]
            count += 1
    return count
