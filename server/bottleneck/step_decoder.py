"""Turn a StepState's state into a DecodedStep, validating everything the client sent.

Three wire forms (canvaswatch.v1.StepState.state): `topk` is read as is;
`logits` [L, V] and `embeddings` [L, d] go through the dense token
bottleneck (canvaswatch.server.bottleneck.dense), the latter projected with the model's
tied embedding matrix. A sidecar configured without a matrix answers the
`embeddings` form with UNIMPLEMENTED. Whatever the form, the sampler's own
signals (accepted, entropy, argmax_ids, temperature) are read when present
(canvaswatch.server.bottleneck.sampler_signals).
"""

from __future__ import annotations

import time
from typing import NoReturn

import numpy as np
import torch

from canvaswatch.client.tensors import TensorFormatError, decode_array, decode_tensor
from canvaswatch.monitors.base import DecodedStep, Vocabulary
from canvaswatch.monitors.compiled import kernel, sized
from canvaswatch.server.errors import Refusal, StepError, invalid
from canvaswatch.server.bottleneck.contract import Decoder
from canvaswatch.server.bottleneck.sampler_signals import read_sampler_fields
from canvaswatch.server.ops.metrics import Metrics
from canvaswatch.v1 import monitor_pb2 as pb

# Probabilities are floats sent by clients in up to bf16; this much slack over 1 is rounding, more is a bug.
PROB_SUM_SLACK = 1e-2
# The dense forms' magnitude rule (docs/wire.md). Real models' logits stay within a few hundred (Gemma
# soft-caps at 30) and their final hidden states within a few thousand; values near float32's 3.4e38 make
# the softmax and the projection overflow to inf and NaN. 1e5 is far from both.
MAX_ABS_LOGIT = 1e5
MAX_ABS_HIDDEN = 1e5


_SORTED, _UNSORTED, _INVALID = 0, 1, 2


@kernel(gil_free_twin=True)
def _check_topk(ids, probs, vocab_size, max_sum, ids_out, probs_out, residual, residual_sum):
    """Validate a top-k state and copy it out: _SORTED, _UNSORTED (valid, not most probable first) or _INVALID.

    Valid: every probability in [0, 1] (NaN is not), every id with mass inside the vocabulary,
    every row summing to at most max_sum. Padding (probability 0) gets id 0; residual[r] is the
    mass outside the row's kept tokens, residual_sum[0] their sum (float64, as the mean needs).
    """
    verdict = _SORTED
    length, k = ids.shape
    for r in range(length):
        total = 0.0
        for c in range(k):
            p = probs[r, c]
            if not (p >= 0 and p <= 1):
                return _INVALID
            token = ids[r, c]
            if p > 0:
                if token < 0 or token >= vocab_size:
                    return _INVALID
                ids_out[r, c] = token
            else:
                ids_out[r, c] = 0
            probs_out[r, c] = p
            total += p
            if c > 0 and p > probs[r, c - 1]:
                verdict = _UNSORTED
        if total > max_sum:
            return _INVALID
        residual[r] = max(1.0 - total, 0.0)
        residual_sum[0] += residual[r]
    return verdict




class StepDecoder:
    def __init__(self, vocab: Vocabulary, metrics: Metrics, dense: Decoder) -> None:
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
                f"{where}.embeddings: this sidecar has no embedding matrix configured (dense.embeddings); send topk or logits",
                Refusal.UNSUPPORTED,
            )
        hidden = residual_sum = None
        try:
            if form == "topk":
                ids_np, probs_np, residual_np, residual_sum = self._read_topk(message.topk, canvas_length, where)
            elif form == "logits":
                ids, probs, residual = self._read_logits(message.logits, canvas_length, where)
            else:
                ids, probs, residual, hidden = self._read_embeddings(message.embeddings, canvas_length, where)
        except TensorFormatError as err:
            raise invalid(f"{where}.{form}.{err}") from None
        canvas = self._read_canvas(message, canvas_length, where)
        try:
            signals = read_sampler_fields(message, canvas_length, self.vocab.size)
        except TensorFormatError as err:
            raise invalid(f"{where}.{err}") from None
        self._timers[form].observe(time.perf_counter() - started)
        if form == "topk":  # the hot path: NumPy all the way (monitors read NumPy views)
            return DecodedStep.from_numpy(
                ids_np, probs_np, block=message.block, step=message.step, vocab=self.vocab,
                residual=residual_np, canvas_ids=None if canvas is None else canvas.numpy(), residual_sum=residual_sum,
                accepted=signals.accepted, entropy=signals.entropy, argmax_ids=signals.argmax_ids,
                temperature=signals.temperature,
            )
        return DecodedStep(
            block=message.block, step=message.step, ids=ids, probs=probs, vocab=self.vocab,
            residual=residual, canvas_ids=canvas, hidden=hidden, residual_sum=residual_sum,
            accepted=signals.accepted, entropy=signals.entropy, argmax_ids=signals.argmax_ids,
            temperature=signals.temperature,
        )

    def _read_topk(self, topk: pb.TopK, length: int, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """ids [L, k] int64, probs [L, k] float32 (owned, writable), residual [L] float32 and its sum."""
        if not topk.HasField("ids") or not topk.HasField("probs"):
            raise invalid(f"{where}.topk: both ids and probs are required")
        if not 0.0 <= topk.top_p <= 1.0:  # NaN fails this too
            raise invalid(f"{where}.topk.top_p: must be in [0, 1] (0: plain top-k), got {topk.top_p:g}")
        # Straight from the message's bytes (NumPy views); the diagnosis of a bad state runs only on failure.
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
        # One compiled pass validates every entry and writes the owned, writable arrays torch wraps.
        ids = np.empty(i.shape, dtype=np.int64)
        probs = np.empty(p.shape, dtype=np.float32)
        residual = np.empty(i.shape[0], dtype=np.float32)
        residual_sum = np.zeros(1, dtype=np.float64)
        verdict = sized(_check_topk, i.shape[0])(i, p, self.vocab.size, 1 + PROB_SUM_SLACK, ids, probs, residual, residual_sum)
        if verdict == _INVALID:
            self._refuse_topk(i, p, where)
        if verdict == _UNSORTED:
            # Most probable first, whatever order the client used; padding sorts last.
            order = np.argsort(-probs, axis=1, kind="stable")
            probs = np.take_along_axis(probs, order, axis=1)
            ids = np.take_along_axis(ids, order, axis=1)
        return ids, probs, residual, float(residual_sum[0])

    def _refuse_topk(self, i: np.ndarray, p: np.ndarray, where: str) -> NoReturn:
        """Raise the error for the first thing wrong with a top-k state the kernel refused."""
        if not np.isfinite(p).all():
            bad = np.argwhere(~np.isfinite(p))[0]
            raise invalid(f"{where}.topk.probs: non-finite probability at position {bad[0]}, slot {bad[1]}")
        if ((p < 0) | (p > 1)).any():
            bad = np.argwhere((p < 0) | (p > 1))[0]
            raise invalid(f"{where}.topk.probs: probability {p[bad[0], bad[1]]:g} outside [0, 1] at position {bad[0]}, slot {bad[1]}")
        out_of_vocab = (p > 0) & ((i < 0) | (i >= self.vocab.size))
        if out_of_vocab.any():
            bad = np.argwhere(out_of_vocab)[0]
            raise invalid(
                f"{where}.topk.ids: token id {i[bad[0], bad[1]]} at position {bad[0]} is outside the vocabulary [0, {self.vocab.size})"
            )
        sums = p.sum(axis=1, dtype=np.float64)
        position = int(np.argmax(sums > 1 + PROB_SUM_SLACK))
        raise invalid(f"{where}.topk.probs: position {position} sums to {sums[position]:.4f} > 1")

    def _read_logits(self, logits_msg: pb.Tensor, length: int, where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self._dense_rows(logits_msg, "logits", length, where)
        if logits.shape[1] != self.vocab.size:
            raise invalid(f"{where}.logits.shape: vocabulary of {logits.shape[1]}, but the sidecar's is {self.vocab.size}")
        # One pass over [L, V]: a row's max is NaN if it holds a NaN, +inf if it holds one, -inf if every
        # logit is -inf (a fully masked position: nothing to sample), and above the bound if one is.
        row_max = logits.amax(dim=1)
        bad = ~((row_max > -float("inf")) & (row_max <= MAX_ABS_LOGIT))
        if bool(bad.any()):
            position = int(bad.nonzero()[0])
            value = float(row_max[position])
            if value != value or value == float("inf"):
                raise invalid(f"{where}.logits: NaN or +inf at position {position}")
            if value == -float("inf"):
                raise invalid(f"{where}.logits: every logit is -inf at position {position}; a position needs a finite logit")
            raise invalid(f"{where}.logits: logit {value:g} at position {position} is above {MAX_ABS_LOGIT:g}")
        kept = self.dense.decode_logits(logits)
        # A slot of probability 0 (a row with fewer finite logits than k) is empty, id 0, as in the topk form
        return kept.ids.long().masked_fill(kept.probs <= 0, 0), kept.probs, kept.residual

    def _read_embeddings(self, tensor: pb.Tensor, length: int, where: str) -> tuple[torch.Tensor, ...]:
        hidden = self._dense_rows(tensor, "embeddings", length, where)
        if hidden.shape[1] != self.dense.hidden_size:
            raise invalid(
                f"{where}.embeddings.shape: hidden size {hidden.shape[1]}, but the loaded embedding matrix has d = {self.dense.hidden_size}"
            )
        if not bool(torch.isfinite(hidden).all()):
            position = int((~torch.isfinite(hidden)).any(dim=1).nonzero()[0])
            raise invalid(f"{where}.embeddings: NaN or Inf at position {position}")
        if bool((hidden.abs() > MAX_ABS_HIDDEN).any()):
            position = int((hidden.abs() > MAX_ABS_HIDDEN).any(dim=1).nonzero()[0])
            raise invalid(f"{where}.embeddings: a value above {MAX_ABS_HIDDEN:g} in magnitude at position {position}")
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
