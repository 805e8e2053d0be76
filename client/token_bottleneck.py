"""The token bottleneck: per position, keep the top-k (or top-p) tokens of a distribution.

"How Transparent is DiffusionGemma?" (2026) showed that passing the
self-conditioning state through this bottleneck (keep the top-k / top-p tokens,
renormalise, re-embed) costs nothing downstream, and makes every denoising step
a readable canvas. This module is the one implementation of that math: the
serving stack calls it on its own device to build the compact `TopK` message,
and the sidecar calls it for the dense `logits` form.

Probabilities are normalised over the FULL vocabulary (exact logsumexp), so
`residual = 1 - sum(kept)` is the mass the bottleneck throws away: the
transparency gauge exported as canvaswatch_bottleneck_residual_mass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from canvaswatch.client.tensors import encode_tensor
from canvaswatch.v1 import monitor_pb2 as pb


@dataclass(frozen=True)
class Bottleneck:
    """Kept tokens per position, most probable first; prob 0 marks padding (top-p)."""

    ids: torch.Tensor  # [..., k] int32
    probs: torch.Tensor  # [..., k] float32
    residual: torch.Tensor  # [...] float32, mass outside the kept set
    top_p: float = 0.0
    # [...] bound on |residual - true residual| when the normalisation was estimated (the int8-screened
    # CPU decoder); None when it is exact
    residual_error: torch.Tensor | None = None

    def to_message(self) -> pb.TopK:
        """The wire form of one canvas ([L, k]); batch rows are sent one stream each."""
        if self.ids.dim() != 2:
            raise ValueError(f"to_message needs a single canvas [L, k], got shape {list(self.ids.shape)}")
        return pb.TopK(ids=encode_tensor(self.ids), probs=encode_tensor(self.probs), top_p=self.top_p)


def bottleneck(logits: torch.Tensor, k: int = 8, top_p: float | None = None) -> Bottleneck:
    """Top-k, or top-p capped at k tokens, of softmax(logits) over the last dimension.

    Works on any device and batch shape ([L, V] or [B, L, V]); computes in
    float32 whatever the input dtype. With top_p, each position keeps the
    smallest prefix of its sorted top-k whose mass reaches p (at least one
    token); the rest of the k slots are padding (prob 0).
    """
    _check_k_p(k, top_p)
    k = min(k, logits.shape[-1])
    values, ids = torch.topk(logits, k, dim=-1, sorted=True)
    return from_candidates(values, ids, torch.logsumexp(logits.float(), dim=-1), top_p)


def from_candidates(values: torch.Tensor, ids: torch.Tensor, log_z: torch.Tensor, top_p: float | None = None,
                    log_z_error: torch.Tensor | None = None) -> Bottleneck:
    """The bottleneck from each position's kept logits (sorted, most probable first) and log-partition.

    Shared by every path that finds the top-k its own way (chunked over V, a
    fused GPU kernel, the int8 screen): only the normalisation and the top-p
    cut happen here. `log_z_error` bounds |log Z - log_z| where log_z is an
    estimate; it becomes the residual's error bound.
    """
    probs = torch.exp(values.float() - log_z.float().unsqueeze(-1))
    if top_p is not None:
        probs = _truncate_to_top_p(probs, top_p)
        ids = torch.where(probs > 0, ids, torch.zeros_like(ids))
    kept = probs.sum(dim=-1)
    residual = (1.0 - kept).clamp_min(0.0)
    residual_error = None
    if log_z_error is not None:
        # every kept probability is off by a factor within exp(+-error), so their sum is too
        residual_error = (kept.double() * torch.expm1(log_z_error.double())).clamp(0.0, 1.0).float()
    return Bottleneck(ids=ids.to(torch.int32), probs=probs, residual=residual, top_p=top_p or 0.0,
                      residual_error=residual_error)


def _check_k_p(k: int, top_p: float | None) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def bottleneck_probs(probs: torch.Tensor, k: int = 8, top_p: float | None = None) -> Bottleneck:
    """The same bottleneck for an already normalised distribution."""
    return bottleneck(torch.log(probs.float().clamp_min(torch.finfo(torch.float32).tiny)), k=k, top_p=top_p)


def _truncate_to_top_p(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    # mass strictly before each slot; a slot is kept while that mass is still below p,
    # which keeps the minimal prefix reaching p and always the first token.
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    return torch.where(mass_before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
