"""The bottleneck math against a float64 brute force, and the Tensor wire form."""

from __future__ import annotations

import pytest
import torch

from canvaswatch.client.token_bottleneck import bottleneck, bottleneck_probs
from canvaswatch.client.tensors import TensorFormatError, decode_array, decode_tensor, encode_tensor
from canvaswatch.v1 import monitor_pb2 as pb


def _reference(logits: torch.Tensor, k: int):
    probs = torch.softmax(logits.double(), dim=-1)
    values, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    return ids[..., :k], values[..., :k]


def test_topk_matches_a_float64_brute_force():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 5000, generator=generator) * 4
    kept = bottleneck(logits, k=8)
    ids, probs = _reference(logits, 8)
    assert torch.equal(kept.ids.long(), ids)
    torch.testing.assert_close(kept.probs.double(), probs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(kept.residual.double(), 1 - probs.sum(-1), rtol=1e-4, atol=1e-6)


def test_top_p_keeps_the_minimal_prefix_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.9, 0.05, 0.03, 0.02], [0.25, 0.25, 0.25, 0.25]])
    kept = bottleneck_probs(probs, k=4, top_p=0.8)
    kept_counts = (kept.probs > 0).sum(-1).tolist()
    assert kept_counts == [2, 1, 4]
    for row, count in enumerate(kept_counts):
        mass = kept.probs[row, :count].sum()
        assert mass >= 0.8 - 1e-6
        if count > 1:
            assert kept.probs[row, : count - 1].sum() < 0.8  # one token fewer would not reach p
    assert torch.all(kept.ids[kept.probs == 0] == 0)  # padding


def test_batched_and_half_precision_inputs():
    logits = torch.randn(2, 16, 1000).to(torch.bfloat16)
    kept = bottleneck(logits, k=4)
    assert kept.ids.shape == (2, 16, 4) and kept.probs.dtype == torch.float32
    with pytest.raises(ValueError, match="single canvas"):
        kept.to_message()
    message = bottleneck(logits[0], k=4).to_message()
    assert list(message.ids.shape) == [16, 4] and message.ids.dtype == pb.INT32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64])
def test_tensor_round_trip(dtype):
    original = (torch.randn(5, 7) * 100).to(dtype)
    decoded = decode_tensor(encode_tensor(original), "t", ndim=2)
    assert decoded.dtype == dtype and torch.equal(decoded, original)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64])
def test_numpy_view_reads_the_same_values(dtype):
    original = (torch.randn(5, 7) * 100).to(dtype)
    array = decode_array(encode_tensor(original), "t", ndim=2)
    expected = original.float() if dtype == torch.bfloat16 else original  # NumPy has no bfloat16: widened
    assert array.shape == (5, 7) and torch.equal(torch.from_numpy(array.copy()), expected)
    with pytest.raises(TensorFormatError, match=r"t.data: shape \[5, 8\]"):
        decode_array(pb.Tensor(dtype=encode_tensor(original).dtype, shape=[5, 8], data=encode_tensor(original).data), "t")


def test_wire_bytes_are_little_endian_row_major():
    message = encode_tensor(torch.tensor([[1, 2], [3, 256]], dtype=torch.int32))
    assert message.data == bytes([1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 1, 0, 0])


def test_decode_rejects_bad_tensors_naming_the_field():
    good = encode_tensor(torch.zeros(2, 3))
    with pytest.raises(TensorFormatError, match=r"probs.shape: expected 2 dimensions"):
        decode_tensor(pb.Tensor(dtype=pb.FLOAT32, shape=[6], data=good.data), "probs", ndim=2)
    with pytest.raises(TensorFormatError, match=r"probs.data: shape \[2, 4\] of FLOAT32 needs 32 bytes, got 24"):
        decode_tensor(pb.Tensor(dtype=pb.FLOAT32, shape=[2, 4], data=good.data), "probs")
    with pytest.raises(TensorFormatError, match="probs.dtype: unsupported dtype DTYPE_UNSPECIFIED"):
        decode_tensor(pb.Tensor(shape=[2, 3], data=good.data), "probs")
