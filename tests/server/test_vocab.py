"""Vocabularies: the default Gemma one, and any tokenizer directory from the config."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from canvaswatch.server.vocab import VocabularyError, load_vocabulary


def test_default_vocabulary_is_the_real_gemma_tokenizer(vocab):
    assert vocab.size == 262_144
    ids = vocab.encode("Hello world, this is a test.")
    assert vocab.decode(ids) == "Hello world, this is a test."
    offsets = vocab.char_offsets(ids)
    assert len(offsets) == len(ids) + 1 and offsets[-1] == len(vocab.decode(ids))
    assert vocab.piece(ids[1]) == " world"


def test_a_tokenizer_directory_replaces_the_default(tmp_path):
    words = ["[UNK]", "alpha", "beta", "gamma"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    small = load_vocabulary(str(tmp_path))
    assert small.size == 4
    assert small.encode("beta gamma") == [2, 3]
    assert small.piece(1) == "alpha"


def test_a_missing_directory_names_the_key(tmp_path):
    with pytest.raises(VocabularyError, match="vocab.tokenizer: .* is neither 'gemma3-270m' nor a directory"):
        load_vocabulary(str(tmp_path / "absent"))
