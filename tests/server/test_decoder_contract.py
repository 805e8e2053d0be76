"""One decoder contract: every top-k backend returns Candidates, both decoders are a Decoder."""

from __future__ import annotations

import pytest
import torch

from canvaswatch.client.token_bottleneck import from_candidates
from canvaswatch.server.bottleneck.batching import DenseBatcher
from canvaswatch.server.bottleneck.contract import Candidates, Decoder
from canvaswatch.server.bottleneck.dense import DenseDecoder
from canvaswatch.server.bottleneck.projection import Projection, project_topk_chunked
from canvaswatch.server.bottleneck.screened import ScreenedIndex


def _inputs():
    generator = torch.Generator().manual_seed(11)
    return torch.randn(6_000, 24, generator=generator), torch.randn(7, 24, generator=generator) * 1.5


def test_the_dense_decoder_and_the_batcher_are_decoders():
    embeddings, _ = _inputs()
    decoder = DenseDecoder(embeddings, 6_000, k=4)
    batcher = DenseBatcher(decoder, window_s=0.01)
    try:
        for candidate in (decoder, batcher):
            assert isinstance(candidate, Decoder)
            assert (candidate.vocab_size, candidate.hidden_size, candidate.device) == (6_000, 24, torch.device("cpu"))
            assert candidate.embeddings is embeddings
    finally:
        batcher.close()


def test_the_cpu_backends_return_candidates_with_the_same_top_k():
    embeddings, hidden = _inputs()
    projection = Projection(scale=0.5, softcap=3.0)
    chunked = project_topk_chunked(hidden, embeddings, 8, projection, chunk=1024)
    screened = ScreenedIndex(embeddings).topk(hidden, 8, projection)
    assert isinstance(chunked, Candidates) and isinstance(screened, Candidates)
    assert chunked.log_z_error is None and screened.log_z_error is not None
    assert torch.equal(chunked.ids, screened.ids)
    torch.testing.assert_close(chunked.values.double(), screened.values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("top_p", [None, 0.6])
@pytest.mark.parametrize("backend", ["torch", "screened"])
def test_the_decoder_answers_its_backends_candidates_normalised(backend, top_p):
    embeddings, hidden = _inputs()
    decoder = DenseDecoder(embeddings, 6_000, k=8, top_p=top_p, chunk=1024, backend=backend)
    if backend == "screened":
        found = ScreenedIndex(embeddings).topk(hidden, 8)
    else:
        found = project_topk_chunked(hidden, embeddings, 8, Projection(), chunk=1024)
    kept, direct = decoder.decode_embeddings(hidden), found.to_bottleneck(top_p)
    assert torch.equal(kept.ids, direct.ids) and torch.equal(kept.probs, direct.probs)
    assert torch.equal(kept.residual, direct.residual) and kept.top_p == direct.top_p


def test_probabilities_a_backend_normalised_itself_are_kept_unless_top_p_cuts():
    values = torch.tensor([[2.0, 1.0, 0.5]])
    ids = torch.tensor([[4, 9, 1]], dtype=torch.int32)
    log_z = torch.tensor([3.0])
    own = torch.tensor([[0.25, 0.125, 0.0625]])
    found = Candidates(values, ids, log_z, probs=own, residual=torch.tensor([0.5625]))
    assert torch.equal(found.to_bottleneck().probs, own)
    cut = found.to_bottleneck(0.1)
    assert torch.equal(cut.probs, from_candidates(values, ids, log_z, 0.1).probs)


def test_candidates_found_without_log_z_cannot_be_normalised():
    embeddings, hidden = _inputs()
    found = ScreenedIndex(embeddings).topk(hidden, 4, with_log_z=False)
    with pytest.raises(ValueError, match="without log Z"):
        found.to_bottleneck()
