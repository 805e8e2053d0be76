"""The token bottleneck for dense states: embeddings [L, d] or logits [L, V] to exact top-k / top-p.

embeddings: the self-conditioning vectors are projected onto the vocabulary
with the model's tied embedding matrix, logits = softcap(scale * H Eᵀ), where
softcap(x) = c * tanh(x / c) when configured (Gemma-family final logit
soft-capping). Probabilities are normalised over the FULL vocabulary with an
exact logsumexp, so the residual mass outside the kept set is exact.

Implementations:
- chunked (torch, CPU or CUDA): V is processed in chunks, keeping a running
  logsumexp and a running top-k, so memory is O(L x chunk), never O(L x V);
- fused (Triton, CUDA; canvaswatch.server.bottleneck.fused_triton): one pass over E that
  never writes the [L, V] logits (see that module for how it stays exact);
- screened (CPU, opt-in: backend = "screened"; canvaswatch.server.bottleneck.screened):
  int8 scores with provable error bounds exclude most of the vocabulary, the
  rest is rescored exactly. Same top-k ids and logits as a float64 brute
  force; the normalisation is an estimate whose error bound travels with the
  result (Bottleneck.residual_error).

Every backend returns `Candidates` and the bottleneck is made from them in one place
(contract.Candidates.to_bottleneck); DenseDecoder implements contract.Decoder.
"""

from __future__ import annotations

import time

import structlog
import torch

from canvaswatch.client.token_bottleneck import Bottleneck
from canvaswatch.server.bottleneck.contract import Candidates
from canvaswatch.server.bottleneck.projection import DEFAULT_CHUNK, Projection, chunked_topk, project_topk_chunked  # noqa: F401 (re-exported)

log = structlog.get_logger(__name__)

class DenseDecoder:
    """The contract.Decoder over one embedding matrix (or none: logits only), on the backend chosen."""

    def __init__(self, embeddings: torch.Tensor | None, vocab_size: int, *, k: int = 8, top_p: float | None = None,
                 projection: Projection = Projection(), chunk: int = DEFAULT_CHUNK, backend: str = "auto") -> None:
        if embeddings is not None and embeddings.shape[0] != vocab_size:
            raise ValueError(f"embedding matrix has {embeddings.shape[0]} rows, the vocabulary {vocab_size} tokens")
        if backend not in ("auto", "torch", "triton", "screened"):
            raise ValueError(f"backend must be auto, torch, triton or screened, got {backend!r}")
        self.embeddings = embeddings
        self.vocab_size = vocab_size
        self.k, self.top_p = k, top_p
        self.projection = projection
        self.chunk = chunk
        self.backend = self._choose(backend)
        self.screen = None
        if self.backend == "screened":
            from canvaswatch.server.bottleneck.screened import ScreenedIndex

            if projection.scale <= 0:
                raise ValueError("the screened backend needs a positive logit_scale")
            started = time.perf_counter()
            self.screen = ScreenedIndex(embeddings)
            log.info("screen_index_built", rows=int(embeddings.shape[0]), seconds=round(time.perf_counter() - started, 1))

    @property
    def hidden_size(self) -> int | None:
        return None if self.embeddings is None else int(self.embeddings.shape[1])

    @property
    def device(self) -> torch.device:
        return self.embeddings.device if self.embeddings is not None else torch.device("cpu")

    def decode_logits(self, logits: torch.Tensor) -> Bottleneck:
        """[..., V] logits (already projected) to the bottleneck, chunked over V."""
        if logits.shape[-1] != self.vocab_size:
            raise ValueError(f"logits have a vocabulary of {logits.shape[-1]}, expected {self.vocab_size}")
        found = chunked_topk(lambda a, b: logits[..., a:b].float(), self.vocab_size, self.k, self.chunk)
        return found.to_bottleneck(self.top_p)

    def decode_embeddings(self, hidden: torch.Tensor) -> Bottleneck:
        """[..., d] self-conditioning vectors to the bottleneck over the full vocabulary."""
        if self.embeddings is None:
            raise ValueError("no embedding matrix loaded")
        if hidden.shape[-1] != self.embeddings.shape[1]:
            raise ValueError(f"hidden size {hidden.shape[-1]}, but the embedding matrix has d = {self.embeddings.shape[1]}")
        lead = hidden.shape[:-1]
        flat = hidden.reshape(-1, hidden.shape[-1]).to(device=self.embeddings.device, dtype=self.embeddings.dtype)
        found: Candidates
        if self.backend == "triton":
            from canvaswatch.server.bottleneck.fused_triton import fused_topk

            found = fused_topk(flat, self.embeddings, self.k, self.projection)
        elif self.screen is not None:
            found = self.screen.topk(flat, self.k, self.projection)
        else:
            found = project_topk_chunked(flat, self.embeddings, self.k, self.projection, self.chunk)
        kept = found.to_bottleneck(self.top_p)
        error = None if kept.residual_error is None else kept.residual_error.reshape(lead)
        return Bottleneck(ids=kept.ids.reshape(*lead, -1), probs=kept.probs.reshape(*lead, -1),
                          residual=kept.residual.reshape(lead), top_p=kept.top_p, residual_error=error)

    def _choose(self, backend: str) -> str:
        on_cuda = self.embeddings is not None and self.embeddings.is_cuda
        if backend == "screened":
            if self.embeddings is None or on_cuda:
                raise ValueError("the screened backend needs the embedding matrix on the CPU (dense.device = \"cpu\")")
            return "screened"
        if backend == "torch" or not on_cuda:
            if backend == "triton":
                raise ValueError("the triton backend needs the embedding matrix on a CUDA device")
            return "torch"
        try:
            import triton  # noqa: F401
        except ImportError:
            if backend == "triton":
                raise
            return "torch"
        return "triton"


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_dense_decoder(section, vocab_size: int, embeddings: torch.Tensor | None = None) -> DenseDecoder:
    """The decoder a [dense] config section describes (section: canvaswatch.server.config.DenseSection).

    `embeddings`: the section's matrix, already loaded (a monitor worker gets the front's, shared).
    """
    from canvaswatch.server.bottleneck.embedding import load_embedding_matrix

    if embeddings is None and section.embeddings:
        embeddings = load_embedding_matrix(section.embeddings, tensor=section.tensor,
                                           dtype=_DTYPES[section.dtype], device=section.device)
        if embeddings.shape[0] != vocab_size:
            raise ValueError(
                f"dense.embeddings: the matrix has {embeddings.shape[0]} rows but vocab.tokenizer has {vocab_size} tokens"
            )
    return DenseDecoder(embeddings, vocab_size, k=section.k, top_p=section.top_p or None,
                        projection=Projection(section.logit_scale, section.softcap),
                        chunk=section.chunk, backend=section.backend)
