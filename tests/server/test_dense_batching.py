"""Concurrent dense steps share launches and each caller gets exactly its own rows back."""

from __future__ import annotations

import threading

import torch

from canvaswatch.server.bottleneck.dense import DenseDecoder
from canvaswatch.server.bottleneck.batching import DenseBatcher


def test_concurrent_requests_are_coalesced_and_split_back_exactly():
    generator = torch.Generator().manual_seed(0)
    decoder = DenseDecoder(torch.randn(3000, 32, generator=generator), 3000, k=4)
    batcher = DenseBatcher(decoder, window_s=0.2)
    inputs = [torch.randn(rows, 32, generator=generator) for rows in (3, 7, 1, 5, 2, 4)]
    results: dict[int, object] = {}
    barrier = threading.Barrier(len(inputs))

    def worker(index: int) -> None:
        barrier.wait()
        results[index] = batcher.decode_embeddings(inputs[index])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    batcher.close()
    assert batcher.requests == len(inputs)
    assert batcher.launches < len(inputs)
    for index, hidden in enumerate(inputs):
        alone = decoder.decode_embeddings(hidden)
        assert torch.equal(results[index].ids, alone.ids)
        torch.testing.assert_close(results[index].probs, alone.probs)


def test_a_failing_launch_reaches_every_waiter():
    decoder = DenseDecoder(torch.randn(100, 8), 100, k=2)
    batcher = DenseBatcher(decoder, window_s=0.01)
    try:
        batcher.decode_embeddings(torch.randn(2, 9))
    except ValueError as err:
        assert "hidden size 9" in str(err)
    else:
        raise AssertionError("expected the decoder's error")
    finally:
        batcher.close()
