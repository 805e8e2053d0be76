"""The int8-screened CPU decoder: the same top-k as a float64 brute force, and a log Z within its bound."""

from __future__ import annotations

import pytest
import torch

from canvaswatch.server.config import ConfigError, load_config
from canvaswatch.server.bottleneck.dense import DenseDecoder
from canvaswatch.server.bottleneck.projection import Projection
from canvaswatch.server.bottleneck.screened import ScreenedIndex


def _brute_force(hidden: torch.Tensor, embeddings: torch.Tensor, k: int, projection: Projection = Projection()):
    logits = projection.apply(hidden.double() @ embeddings.double().T)
    # ties to the smaller id, like the screen: stable sort of ids by descending logit
    order = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.gather(logits, 1, order), order, torch.logsumexp(logits, dim=1)


def _assert_exact(found, hidden, embeddings, k, projection=Projection()):
    values, ids, log_z = _brute_force(hidden, embeddings, k, projection)
    assert torch.equal(found.ids, ids)
    torch.testing.assert_close(found.values, values, atol=1e-9, rtol=0)
    if found.log_z is not None:
        assert bool(((found.log_z - log_z).abs() <= found.log_z_error).all()), (found.log_z - log_z, found.log_z_error)


@pytest.mark.parametrize("projection", [Projection(), Projection(scale=0.5, softcap=3.0)])
def test_random_matrices_give_the_brute_force_top_k(projection):
    generator = torch.Generator().manual_seed(1)
    embeddings = torch.randn(20_000, 48, generator=generator)
    hidden = torch.randn(16, 48, generator=generator) * 0.7
    index = ScreenedIndex(embeddings, chunk=1536)
    found = index.topk(hidden, 8, projection)
    _assert_exact(found, hidden, embeddings, 8, projection)
    # it screened: far fewer tokens rescored than the vocabulary
    assert int(found.rescored.max()) < 2_000


def test_hidden_states_with_massive_coordinates_stay_exact():
    # A few coordinates ~50x the rest, as in real hidden states: the case the rotation is for.
    generator = torch.Generator().manual_seed(2)
    embeddings = torch.randn(30_000, 64, generator=generator) / 8
    hidden = torch.randn(24, 64, generator=generator)
    hidden[:, 3] = 50.0
    hidden[:, 17] = -40.0
    _assert_exact(ScreenedIndex(embeddings).topk(hidden, 16), hidden, embeddings, 16)


def test_ties_go_to_the_smaller_id():
    generator = torch.Generator().manual_seed(3)
    embeddings = torch.randn(5_000, 32, generator=generator)
    embeddings[4_000] = embeddings[10]  # two tokens with identical rows: identical logits for every state
    embeddings[4_001] = embeddings[10]
    hidden = embeddings[10:11] * 5
    found = ScreenedIndex(embeddings).topk(hidden, 4)
    assert found.ids[0, :3].tolist() == [10, 4_000, 4_001]
    _assert_exact(found, hidden, embeddings, 4)


def test_rows_the_screen_cannot_screen_take_the_exact_path_with_bounded_work(monkeypatch):
    # An all-zero hidden state ties every logit: the screen excluded nothing and rescoring gathered a
    # [L x V, d] matrix (hundreds of GB for a Gemma step). Past the candidate bound: the exact chunked path.
    from canvaswatch.server.bottleneck import screened

    generator = torch.Generator().manual_seed(4)
    embeddings = torch.randn(16_384, 64, generator=generator)
    index = ScreenedIndex(embeddings)
    hidden = torch.zeros(4, 64)
    hidden[3] = torch.randn(64, generator=generator)  # one ordinary row among them
    gathered = []
    original = ScreenedIndex._score_in_float32
    monkeypatch.setattr(ScreenedIndex, "_score_in_float32",
                        lambda self, h, rows, ids: gathered.append(len(ids)) or original(self, h, rows, ids))
    found = index.topk(hidden, 8)
    assert not gathered  # nothing rescored one token at a time
    assert int(found.rescored.max()) == 16_384 <= screened.MAX_CANDIDATES_PER_POSITION * 4  # counted as all scored
    values, ids, log_z = _brute_force(hidden, embeddings, 8)
    assert torch.equal(found.ids[3], ids[3])
    torch.testing.assert_close(found.values, values, atol=1e-4, rtol=0)  # the exact path computes in float32
    torch.testing.assert_close(found.log_z.double(), log_z, atol=1e-4, rtol=0)


def test_real_gemma_embeddings_match_the_brute_force(gemma_embeddings, vocab):
    ids = vocab.encode("To reset your router, unplug it for thirty seconds.")
    generator = torch.Generator().manual_seed(4)
    confident = gemma_embeddings[ids].float() * 40 + torch.randn(len(ids), 640, generator=generator)
    diffuse = torch.randn(6, 640, generator=generator) * 3
    hidden = torch.cat([confident, diffuse])
    found = ScreenedIndex(gemma_embeddings).topk(hidden, 8)
    _assert_exact(found, hidden, gemma_embeddings, 8)
    assert found.ids[: len(ids), 0].tolist() == ids


def test_decoder_backend_reports_the_residual_error_bound():
    generator = torch.Generator().manual_seed(5)
    embeddings = torch.randn(8_000, 32, generator=generator)
    hidden = torch.randn(5, 32, generator=generator) * 2
    kept = DenseDecoder(embeddings, 8_000, k=8, top_p=0.9, backend="screened").decode_embeddings(hidden)
    exact = DenseDecoder(embeddings, 8_000, k=8, top_p=0.9, backend="torch").decode_embeddings(hidden)
    assert torch.equal(kept.ids, exact.ids)
    assert kept.residual_error is not None and exact.residual_error is None
    assert bool(((kept.residual - exact.residual).abs() <= kept.residual_error + 1e-6).all())


def test_a_broken_integer_gemm_is_refused(monkeypatch):
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: (a.float() @ b.float()).to(torch.int32) + 1)
    with pytest.raises(RuntimeError, match="not exact"):
        ScreenedIndex(torch.randn(100, 8))


def test_screened_backend_is_refused_off_the_cpu(tmp_path):
    path = tmp_path / "sidecar.toml"
    path.write_text('[dense]\nbackend = "screened"\ndevice = "cuda"\n')
    with pytest.raises(ConfigError, match="dense.backend.*screened.*cpu"):
        load_config(path)
    with pytest.raises(ValueError, match="positive logit_scale"):
        DenseDecoder(torch.randn(10, 4), 10, backend="screened", projection=Projection(scale=-1.0))


def test_sidecar_decoder_exports_the_residual_error_bound(vocab):
    from canvaswatch.client.tensors import encode_tensor
    from canvaswatch.server.bottleneck.step_decoder import StepDecoder
    from canvaswatch.server.ops.metrics import Metrics
    from canvaswatch.v1 import monitor_pb2 as pb

    generator = torch.Generator().manual_seed(6)
    embeddings = torch.randn(vocab.size, 16, generator=generator)
    metrics = Metrics()
    decoder = StepDecoder(vocab, metrics, DenseDecoder(embeddings, vocab.size, k=8, backend="screened"))
    hidden = embeddings[[5, 17, 300]] * 4
    step = decoder.decode(pb.StepState(embeddings=encode_tensor(hidden)), 3, "message[0]")
    expected = (hidden.double() @ embeddings.double().T).argmax(dim=1)
    assert step.ids_np[:, 0].tolist() == expected.tolist()
    observed = metrics.registry.get_sample_value("canvaswatch_bottleneck_residual_error_count")
    assert observed == 1.0
