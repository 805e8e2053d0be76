"""Micro-batching: concurrent streams' dense steps decoded in one launch.

A GPU decode of one small canvas (L = 16..256) leaves most of the device idle;
rows from different requests are independent, so steps that arrive within a
short window (`dense.batch_window_ms`) are concatenated along the row axis,
decoded together, and split back. Callers block only for their own result;
the window bounds the latency added to any step.
"""

from __future__ import annotations

import torch

from canvaswatch.client.token_bottleneck import Bottleneck
from canvaswatch.monitors.batching import WindowBatcher
from canvaswatch.server.bottleneck.contract import Decoder


class DenseBatcher:
    """A contract.Decoder that batches decode_embeddings calls in front of another decoder."""

    def __init__(self, decoder: Decoder, window_s: float, max_rows: int = 8192) -> None:
        self.decoder = decoder
        self._batcher: WindowBatcher[torch.Tensor, Bottleneck] = WindowBatcher(
            self._launch, window_s=window_s, max_weight=max_rows, weight=lambda hidden: int(hidden.shape[0]),
            name="canvaswatch-dense-batcher",
        )

    @property
    def launches(self) -> int:
        return self._batcher.batches

    @property
    def requests(self) -> int:
        return self._batcher.items

    @property
    def embeddings(self) -> torch.Tensor | None:
        return self.decoder.embeddings

    @property
    def vocab_size(self) -> int:
        return self.decoder.vocab_size

    @property
    def hidden_size(self) -> int | None:
        return self.decoder.hidden_size

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    def decode_logits(self, logits: torch.Tensor) -> Bottleneck:
        return self.decoder.decode_logits(logits)

    def decode_embeddings(self, hidden: torch.Tensor) -> Bottleneck:
        """Queue [L, d] and wait for its share of the next batched launch."""
        return self._batcher.submit(hidden).result()

    def close(self) -> None:
        self._batcher.close(timeout=5)

    def _launch(self, batch: list[torch.Tensor]) -> list[Bottleneck]:
        device = self.decoder.device
        kept = self.decoder.decode_embeddings(torch.cat([h.to(device) for h in batch], dim=0))
        out, start = [], 0
        for hidden in batch:
            stop = start + hidden.shape[0]
            error = None if kept.residual_error is None else kept.residual_error[start:stop]
            out.append(Bottleneck(ids=kept.ids[start:stop], probs=kept.probs[start:stop],
                                  residual=kept.residual[start:stop], top_p=kept.top_p, residual_error=error))
            start = stop
        return out
