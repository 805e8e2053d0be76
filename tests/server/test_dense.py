"""Dense forms through the token bottleneck, against a float64 brute force; GPU kernel where CUDA is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from canvaswatch.server.bottleneck.dense import DenseDecoder
from canvaswatch.server.bottleneck.projection import Projection, project_topk_chunked
from canvaswatch.server.bottleneck.embedding import EmbeddingError, load_embedding_matrix

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _reference(hidden: torch.Tensor, embeddings: torch.Tensor, k: int, projection: Projection = Projection()):
    logits = projection.apply(hidden.double() @ embeddings.double().T)
    log_z = torch.logsumexp(logits, dim=-1)
    values, ids = torch.topk(logits, k, dim=-1)
    probs = torch.exp(values - log_z.unsqueeze(-1))
    return ids, probs, 1 - probs.sum(-1), logits


def _assert_matches(kept, hidden, embeddings, k, projection=Projection(), atol=1e-5):
    ids, probs, residual, logits = _reference(hidden, embeddings, k, projection)
    mismatch = kept.ids.long().cpu() != ids.cpu()
    if mismatch.any():
        # only allowed between near-equal logits (float32 vs float64 rounding): then the values must agree
        chosen = torch.gather(logits.cpu(), 1, kept.ids.long().cpu())
        torch.testing.assert_close(chosen, torch.topk(logits.cpu(), k, dim=-1).values, atol=1e-5, rtol=0)
    torch.testing.assert_close(kept.probs.double().cpu(), probs.cpu(), atol=atol, rtol=1e-4)
    torch.testing.assert_close(kept.residual.double().cpu(), residual.cpu(), atol=atol, rtol=1e-4)


@pytest.mark.parametrize("projection", [Projection(), Projection(scale=0.5, softcap=3.0)])
def test_chunked_projection_matches_brute_force_on_random_matrices(projection):
    generator = torch.Generator().manual_seed(1)
    embeddings = torch.randn(10_000, 48, generator=generator)
    hidden = torch.randn(12, 48, generator=generator) * 0.7
    decoder = DenseDecoder(embeddings, 10_000, k=8, projection=projection, chunk=1536)
    _assert_matches(decoder.decode_embeddings(hidden), hidden, embeddings, 8, projection)


def test_real_gemma_embeddings_decode_a_text_back_to_itself(gemma_embeddings, vocab):
    ids = vocab.encode("To reset your router, unplug it for thirty seconds.")
    hidden = gemma_embeddings[ids] * 40  # a confident self-conditioning state pointing at each token
    decoder = DenseDecoder(gemma_embeddings, vocab.size, k=8)
    kept = decoder.decode_embeddings(hidden)
    assert kept.ids[:, 0].tolist() == ids
    _assert_matches(kept, hidden, gemma_embeddings, 8)


def test_real_gemma_embeddings_random_states_match_brute_force(gemma_embeddings, vocab):
    hidden = torch.randn(6, 640, generator=torch.Generator().manual_seed(2)) * 3
    kept = DenseDecoder(gemma_embeddings, vocab.size, k=16).decode_embeddings(hidden)
    _assert_matches(kept, hidden, gemma_embeddings, 16)


def test_top_p_set_is_minimal_and_reaches_p():
    generator = torch.Generator().manual_seed(3)
    embeddings = torch.randn(4000, 32, generator=generator)
    hidden = torch.randn(20, 32, generator=generator) * 2
    kept = DenseDecoder(embeddings, 4000, k=64, top_p=0.5).decode_embeddings(hidden)
    _, probs, _, _ = _reference(hidden, embeddings, 64)
    for row in range(20):
        count = int((kept.probs[row] > 0).sum())
        mass = probs[row, :count].sum()
        reaches = mass >= 0.5 - 1e-6 or count == 64
        assert reaches and (count == 1 or probs[row, : count - 1].sum() < 0.5)


def test_logits_form_is_chunked_and_exact():
    logits = torch.randn(5, 70_000, generator=torch.Generator().manual_seed(4)) * 3
    kept = DenseDecoder(None, 70_000, k=8, chunk=4096).decode_logits(logits)
    ref_values, ref_ids = torch.topk(logits.double(), 8, dim=-1)
    ref_probs = torch.exp(ref_values - torch.logsumexp(logits.double(), -1, keepdim=True))
    assert torch.equal(kept.ids.long(), ref_ids)
    torch.testing.assert_close(kept.probs.double(), ref_probs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(kept.residual.double(), 1 - ref_probs.sum(-1), atol=1e-6, rtol=1e-5)


def test_mismatched_inputs_are_refused():
    decoder = DenseDecoder(torch.randn(100, 8), 100, k=4)
    with pytest.raises(ValueError, match="hidden size 9, but the embedding matrix has d = 8"):
        decoder.decode_embeddings(torch.randn(3, 9))
    with pytest.raises(ValueError, match="vocabulary of 99, expected 100"):
        decoder.decode_logits(torch.randn(3, 99))
    with pytest.raises(ValueError, match="100 rows, the vocabulary 101"):
        DenseDecoder(torch.randn(100, 8), 101)


def test_embedding_matrix_from_a_safetensors_checkpoint_directory(tmp_path: Path):
    from safetensors.torch import save_file

    matrix = torch.randn(50, 6)
    save_file({"model.language_model.embed_tokens.weight": matrix, "model.norm.weight": torch.ones(6)},
              str(tmp_path / "model.safetensors"))
    loaded = load_embedding_matrix(str(tmp_path), dtype=torch.float32)
    assert torch.equal(loaded, matrix)
    with pytest.raises(EmbeddingError, match="lacks 'lm_head.weight'; it has model.language_model.embed_tokens.weight"):
        load_embedding_matrix(str(tmp_path), tensor="lm_head.weight")


def test_embedding_source_that_does_not_exist_names_the_key(tmp_path: Path):
    with pytest.raises(EmbeddingError, match="dense.embeddings: .* is neither 'gemma3-270m', a .gguf file nor a checkpoint directory"):
        load_embedding_matrix(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmbeddingError, match="holds no safetensors files"):
        load_embedding_matrix(str(tmp_path / "empty"))


def test_default_matrix_is_the_real_gemma_one(gemma_embeddings):
    assert gemma_embeddings.shape == (262_144, 640)
    assert 0.5 < float(gemma_embeddings.norm(dim=1).mean()) < 2.0


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize(("rows", "dim", "vocab"), [(256, 640, 262_144), (1024, 640, 262_144), (37, 96, 50_001), (1, 2816, 32_768), (5, 64, 1000)])
@pytest.mark.parametrize("projection", [Projection(), Projection(softcap=30.0)])
def test_fused_kernel_matches_brute_force(rows, dim, vocab, projection):
    from canvaswatch.server.bottleneck.fused_triton import fused_topk

    generator = torch.Generator(device="cuda").manual_seed(5)
    embeddings = (torch.randn(vocab, dim, device="cuda", generator=generator) * 0.03).to(torch.bfloat16)
    hidden = torch.randn(rows, dim, device="cuda", generator=generator).to(torch.bfloat16)
    result = fused_topk(hidden, embeddings, 8, projection)
    _assert_matches(result, hidden.float(), embeddings.float(), 8, projection, atol=2e-5)


@needs_cuda
@pytest.mark.gpu
def test_gpu_decoder_picks_the_fused_kernel_and_agrees_with_chunked_torch():
    embeddings = (torch.randn(20_000, 64, device="cuda") * 0.1).to(torch.bfloat16)
    hidden = torch.randn(16, 64, device="cuda")
    fused = DenseDecoder(embeddings, 20_000, k=8)
    chunked = DenseDecoder(embeddings, 20_000, k=8, backend="torch")
    assert fused.backend == "triton" and chunked.backend == "torch"
    a, b = fused.decode_embeddings(hidden), chunked.decode_embeddings(hidden)
    assert torch.equal(a.ids, b.ids)
    torch.testing.assert_close(a.probs, b.probs, atol=1e-5, rtol=1e-4)
