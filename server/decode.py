"""Turn a StepState's state into a DecodedStep, validating everything the client sent.

Three wire forms (canvaswatch.v1.StepState.state): `topk` is read as is;
`logits` [L, V] and `embeddings` [L, d] go through the dense token
bottleneck (canvaswatch.server.dense), the latter projected with the model's
tied embedding matrix. A sidecar configured without a matrix answers the
`embeddings` form with UNIMPLEMENTED.
"""

from __future__ import annotations

import functools
import time

import grpc
import numpy as np
import torch

from canvaswatch.client.tensors import TensorFormatError, decode_array, decode_tensor
from canvaswatch.monitors.base import DecodedStep, Vocabulary
from canvaswatch.server.dense import DenseDecoder
from canvaswatch.server.metrics import Metrics
from canvaswatch.v1 import monitor_pb2 as pb

# Probabilities are floats sent by clients in up to bf16; this much slack over 1 is rounding, more is a bug.
PROB_SUM_SLACK = 1e-2


@functools.cache
def _descent_matrix(k: int, dtype: np.dtype) -> np.ndarray:
    """[k, k-1] with p @ D = p[:, :-1] - p[:, 1:] (each difference rounded once, so its sign is exact)."""
    matrix = np.zeros((k, k - 1), dtype=dtype)
    matrix[np.arange(k - 1), np.arange(k - 1)] = 1
    matrix[np.arange(1, k), np.arange(k - 1)] = -1
    return matrix


class StepError(Exception):
    """A step the sidecar refuses; carries the gRPC status and a message naming the field."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> StepError:
    return StepError(grpc.StatusCode.INVALID_ARGUMENT, message)


class StepDecoder:
    def __init__(self, vocab: Vocabulary, metrics: Metrics, dense: DenseDecoder) -> None:
        self.vocab = vocab
        self.metrics = metrics
        self.dense = dense
        self._timers = {form: metrics.decode_seconds.labels(form) for form in ("topk", "logits", "embeddings")}

    def decode(self, message: pb.StepState, canvas_length: int, where: str) -> DecodedStep | None:
        """The decoded canvas of `message`, or None for a final message that carries no state.

        `where` prefixes error messages (e.g. "steps[3]") so a client can find the bad message.
        """
        form = message.WhichOneof("state")
        started = time.perf_counter()
        if form is None:
            if message.final:
                return None
            raise invalid(f"{where}.state: a non-final step needs one of topk, embeddings, logits")
        if form == "embeddings" and self.dense.embeddings is None:
            raise StepError(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{where}.embeddings: this sidecar has no embedding matrix configured (dense.embeddings); send topk or logits",
            )
        hidden = None
        try:
            if form == "topk":
                ids, probs, residual = self._read_topk(message.topk, canvas_length, where)
            elif form == "logits":
                ids, probs, residual = self._read_logits(message.logits, canvas_length, where)
            else:
                ids, probs, residual, hidden = self._read_embeddings(message.embeddings, canvas_length, where)
        except TensorFormatError as err:
            raise invalid(f"{where}.{form}.{err}") from None
        canvas = self._read_canvas(message, canvas_length, where)
        self._timers[form].observe(time.perf_counter() - started)
        return DecodedStep(
            block=message.block, step=message.step, ids=ids, probs=probs, vocab=self.vocab,
            residual=residual, canvas_ids=canvas, hidden=hidden,
        )

    def _read_topk(self, topk: pb.TopK, length: int, where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not topk.HasField("ids") or not topk.HasField("probs"):
            raise invalid(f"{where}.topk: both ids and probs are required")
        # In NumPy, straight from the message's bytes: a handful of reductions over [L, k], where
        # torch's per-call overhead would dominate. The common case (all valid) costs two range
        # checks; the diagnosis runs only on failure.
        i = decode_array(topk.ids, "ids", ndim=2)
        p = decode_array(topk.probs, "probs", ndim=2)
        if i.dtype.kind != "i":
            raise invalid(f"{where}.topk.ids.dtype: expected INT32 or INT64, got {_wire_dtype(topk.ids)}")
        if p.dtype.kind != "f":
            raise invalid(f"{where}.topk.probs.dtype: expected FLOAT32, FLOAT16 or BFLOAT16, got {_wire_dtype(topk.probs)}")
        if i.shape != p.shape:
            raise invalid(f"{where}.topk: ids shape {list(i.shape)} differs from probs shape {list(p.shape)}")
        if i.shape[0] != length:
            raise invalid(f"{where}.topk.ids.shape: {i.shape[0]} positions, but info.canvas_length is {length}")
        if i.shape[1] < 1:
            raise invalid(f"{where}.topk.ids.shape: k must be >= 1")
        p = p.astype(np.float32, copy=False)
        if not (p.min() >= 0 and p.max() <= 1):  # also false for NaN
            if not np.isfinite(p).all():
                bad = np.argwhere(~np.isfinite(p))[0]
                raise invalid(f"{where}.topk.probs: non-finite probability at position {bad[0]}, slot {bad[1]}")
            bad = np.argwhere((p < 0) | (p > 1))[0]
            raise invalid(f"{where}.topk.probs: probability {p[bad[0], bad[1]]:g} outside [0, 1] at position {bad[0]}, slot {bad[1]}")
        if i.min() < 0 or i.max() >= self.vocab.size:
            out_of_vocab = (p > 0) & ((i < 0) | (i >= self.vocab.size))
            if out_of_vocab.any():
                bad = np.argwhere(out_of_vocab)[0]
                raise invalid(
                    f"{where}.topk.ids: token id {i[bad[0], bad[1]]} at position {bad[0]} is outside the vocabulary [0, {self.vocab.size})"
                )
        # Row sums and neighbour differences as small matrix products: on [L, k] rows of k ~ 8,
        # BLAS is ~8x faster than NumPy's reductions along the short axis.
        k = p.shape[1]
        sums = p @ np.ones(k, dtype=p.dtype)
        if sums.max() > 1 + PROB_SUM_SLACK:
            position = int(np.argmax(sums > 1 + PROB_SUM_SLACK))
            raise invalid(f"{where}.topk.probs: position {position} sums to {sums[position]:.4f} > 1")
        if k > 1 and (p @ _descent_matrix(k, p.dtype)).min() < 0:
            # Most probable first, whatever order the client used; padding sorts last.
            order = np.argsort(-p, axis=1, kind="stable")
            p = np.take_along_axis(p, order, axis=1)
            i = np.take_along_axis(i, order, axis=1)
        i = np.where(p > 0, i, 0).astype(np.int64, copy=False)  # a new array: owned and writable
        if not p.flags.writeable:  # still the message's bytes: torch needs its own
            p = p.copy()
        residual = np.clip(1.0 - sums, 0.0, None).astype(np.float32)
        return torch.from_numpy(i), torch.from_numpy(p), torch.from_numpy(residual)

    def _read_logits(self, logits_msg: pb.Tensor, length: int, where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self._dense_rows(logits_msg, "logits", length, where)
        if logits.shape[1] != self.vocab.size:
            raise invalid(f"{where}.logits.shape: vocabulary of {logits.shape[1]}, but the sidecar's is {self.vocab.size}")
        if bool(torch.isnan(logits).any()) or bool(torch.isposinf(logits).any()):
            raise invalid(f"{where}.logits: NaN or +inf present")
        kept = self.dense.decode_logits(logits)
        return kept.ids.long(), kept.probs, kept.residual

    def _read_embeddings(self, tensor: pb.Tensor, length: int, where: str) -> tuple[torch.Tensor, ...]:
        hidden = self._dense_rows(tensor, "embeddings", length, where)
        if hidden.shape[1] != self.dense.hidden_size:
            raise invalid(
                f"{where}.embeddings.shape: hidden size {hidden.shape[1]}, but the loaded embedding matrix has d = {self.dense.hidden_size}"
            )
        if not bool(torch.isfinite(hidden).all()):
            position = int((~torch.isfinite(hidden)).any(dim=1).nonzero()[0])
            raise invalid(f"{where}.embeddings: NaN or Inf at position {position}")
        kept = self.dense.decode_embeddings(hidden)
        if kept.residual_error is not None:
            self.metrics.residual_error.observe(float(kept.residual_error.max()))
        return kept.ids.long().cpu(), kept.probs.cpu(), kept.residual.cpu(), hidden

    @staticmethod
    def _dense_rows(tensor: pb.Tensor, form: str, length: int, where: str) -> torch.Tensor:
        """A dense [L, ...] float tensor with one row per canvas position (logits or embeddings)."""
        values = decode_tensor(tensor, form, ndim=2)
        if not values.dtype.is_floating_point:
            raise invalid(f"{where}.{form}.dtype: expected FLOAT32, FLOAT16 or BFLOAT16, got {values.dtype}")
        if values.shape[0] != length:
            raise invalid(f"{where}.{form}.shape: {values.shape[0]} positions, but info.canvas_length is {length}")
        return values

    def _read_canvas(self, message: pb.StepState, length: int, where: str) -> torch.Tensor | None:
        if not message.canvas_ids:
            return None
        canvas = torch.tensor(list(message.canvas_ids), dtype=torch.long)
        if canvas.numel() != length:
            raise invalid(f"{where}.canvas_ids: {canvas.numel()} ids, but info.canvas_length is {length}")
        if bool(((canvas < 0) | (canvas >= self.vocab.size)).any()):
            raise invalid(f"{where}.canvas_ids: id outside the vocabulary [0, {self.vocab.size})")
        return canvas


def _wire_dtype(tensor: pb.Tensor) -> str:
    return pb.DType.Name(tensor.dtype)
