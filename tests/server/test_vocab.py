"""Vocabularies: the default Gemma one, and any tokenizer directory from the config."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from canvaswatch.server.bottleneck.vocab import VocabularyError, load_vocabulary


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


def test_decoding_random_canvases_joins_exactly_the_pieces(vocab):
    # The compiled gather over one UTF-8 buffer must give what joining the Python pieces gives,
    # for every script and byte-fallback piece a random canvas draws, and lower-case piece by piece.
    generator = torch.Generator().manual_seed(3)
    pieces, lowered = vocab.pieces(), vocab.pieces(lower=True)
    for length in (0, 1, 256, 1024):
        ids = torch.randint(0, vocab.size, (length,), generator=generator).tolist()
        assert vocab.decode(ids) == "".join(pieces[i] for i in ids)
        assert vocab.decode_lower(ids) == "".join(lowered[i] for i in ids)
        assert len(vocab.decode_lower(ids)) == len(vocab.decode(ids))


@pytest.mark.parametrize("bad", [-1, 262_144])
def test_decoding_an_id_outside_the_vocabulary_raises_instead_of_reading_past_the_table(vocab, bad):
    with pytest.raises(IndexError, match=f"token id {bad} is outside the vocabulary"):
        vocab.decode([5, bad])


def test_a_long_first_start_step_says_what_it_does_and_that_it_is_alive(monkeypatch, capsys):
    import time

    from canvaswatch.server.bottleneck import vocab as vocab_module

    monkeypatch.setattr(vocab_module, "PROGRESS_EVERY_S", 0.05)
    with vocab_module._progress("converting something: about 1 s"):
        time.sleep(0.2)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "canvaswatch: converting something: about 1 s ..."
    assert any("still converting" in line for line in lines[1:-1])
    assert lines[-1].startswith("canvaswatch: ... done in ")
