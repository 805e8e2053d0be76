"""Hidden states to logits over the vocabulary, and the exact chunked top-k every backend is checked against.

logits = softcap(scale * H Eᵀ) (Gemma-family final logit soft-capping when `softcap` > 0). The
chunked pass keeps a running logsumexp and a running top-k over chunks of V, so its memory is
O(L x chunk), never O(L x V); the screened and fused backends fall back to it and are tested
against it. Results are `Candidates` (contract.py), like every backend's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from canvaswatch.server.bottleneck.contract import Candidates

DEFAULT_CHUNK = 32768


@dataclass(frozen=True)
class Projection:
    """How hidden states become logits: softcap(scale * H Eᵀ)."""

    scale: float = 1.0
    softcap: float = 0.0

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits * self.scale if self.scale != 1.0 else logits
        if self.softcap > 0:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits


def project_topk_chunked(hidden: torch.Tensor, embeddings: torch.Tensor, k: int, projection: Projection,
                         chunk: int = DEFAULT_CHUNK) -> Candidates:
    """Top-k logits (sorted), their ids and the logsumexp of softcap(scale * H Eᵀ), never materialising [L, V]."""
    if embeddings.dtype == torch.float32:
        def block(start: int, stop: int) -> torch.Tensor:
            return projection.apply(hidden.float() @ embeddings[start:stop].T)
    else:
        # Half-precision products round each logit to 8 (bf16) bits of mantissa, which reorders
        # near-ties; the chunk is upcast so the top-k is exact for the matrix as stored.
        def block(start: int, stop: int) -> torch.Tensor:
            return projection.apply(hidden.float() @ embeddings[start:stop].float().T)

    return chunked_topk(block, embeddings.shape[0], k, chunk)


def chunked_topk(block: Callable[[int, int], torch.Tensor], vocab_size: int, k: int, chunk: int) -> Candidates:
    """Top-k and logsumexp over V of the logits `block(start, stop)` returns for columns [start, stop)."""
    k = min(k, vocab_size)
    best_values = best_ids = log_z = None
    for start in range(0, vocab_size, chunk):
        stop = min(start + chunk, vocab_size)
        logits = block(start, stop)
        chunk_z = torch.logsumexp(logits, dim=-1)
        log_z = chunk_z if log_z is None else torch.logaddexp(log_z, chunk_z)
        values, ids = torch.topk(logits, min(k, stop - start), dim=-1)
        ids = ids + start
        if best_values is not None:
            values, ids = torch.cat([best_values, values], -1), torch.cat([best_ids, ids], -1)
        best_values, order = torch.topk(values, min(k, values.shape[-1]), dim=-1)
        best_ids = torch.gather(ids, -1, order)
    return Candidates(best_values, best_ids, log_z)
