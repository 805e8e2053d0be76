"""The decoder contract: what every top-k backend returns, and what the step decoder calls.

Three backends find each position's top-k logits over the full vocabulary, each its own way:
chunked torch (projection.project_topk_chunked, CPU or CUDA), the int8-screened CPU index
(screened.ScreenedIndex.topk) and the fused Triton kernel (fused_triton.fused_topk). All return
`Candidates`; `Candidates.to_bottleneck` is the one place they become the client's `Bottleneck`,
the wire-facing value (the normalisation and the top-p cut are canvaswatch.client.token_bottleneck's).

`Decoder` is what callers hold (the step decoder, the engine): a `DenseDecoder` (dense.py), or the
micro-batching `DenseBatcher` (batching.py) in front of one. Both answer with a `Bottleneck`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from canvaswatch.client.token_bottleneck import Bottleneck, from_candidates


@dataclass(frozen=True)
class Candidates:
    """Each position's top-k logits, most probable first, and the full vocabulary's logsumexp.

    `log_z_error` bounds |log Z - log_z| where log_z is an estimate (the screened index); None
    when it is exact. `probs`/`residual`: the fused kernel normalises in the same pass that
    finds the top-k, and those values are what the bottleneck reports when no top-p cut is
    asked for (recomputing them from `values` would round differently). `rescored`: tokens
    per position the screened index had to score exactly, a measure of how well it screened.
    """

    values: torch.Tensor  # [L, k] logits, sorted descending
    ids: torch.Tensor  # [L, k] their token ids
    log_z: torch.Tensor | None  # [L] logsumexp over the vocabulary; None only when not asked for
    log_z_error: torch.Tensor | None = None  # [L]
    probs: torch.Tensor | None = None  # [L, k], normalised over the full vocabulary
    residual: torch.Tensor | None = None  # [L], 1 - sum(probs)
    rescored: torch.Tensor | None = None  # [L]

    def to_bottleneck(self, top_p: float | None = None) -> Bottleneck:
        """The kept tokens' probabilities and the residual mass, top-p cut when `top_p` is set."""
        if top_p is None and self.probs is not None and self.residual is not None:
            return Bottleneck(ids=self.ids, probs=self.probs, residual=self.residual)
        if self.log_z is None:
            raise ValueError("these candidates were found without log Z, so they cannot be normalised")
        return from_candidates(self.values, self.ids, self.log_z, top_p, self.log_z_error)


@runtime_checkable
class Decoder(Protocol):
    """Dense states ([L, V] logits or [L, d] self-conditioning vectors) to the token bottleneck."""

    @property
    def embeddings(self) -> torch.Tensor | None:
        """The tied embedding matrix [V, d], or None: then only logits can be decoded."""
        ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def hidden_size(self) -> int | None:
        """d of the embedding matrix, None without one."""
        ...

    @property
    def device(self) -> torch.device:
        """Where decode_embeddings computes: inputs are moved here."""
        ...

    def decode_logits(self, logits: torch.Tensor) -> Bottleneck:
        """[..., V] logits (already projected) to the bottleneck."""
        ...

    def decode_embeddings(self, hidden: torch.Tensor) -> Bottleneck:
        """[..., d] self-conditioning vectors to the bottleneck over the full vocabulary."""
        ...
