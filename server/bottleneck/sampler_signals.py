"""Read and validate the sampler's own signals on a StepState (fields 24-27): accepted, entropy, argmax_ids, temperature.

They are optional (docs/wire.md, monitor.proto): an absent field reads as None
and the step decodes from its state alone. A present field is checked before a
monitor sees it, and anything wrong raises TensorFormatError naming the field,
which the step decoder turns into INVALID_ARGUMENT like every other bad field.
All four are [L]-sized, so the checks are a few vectorised NumPy passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from canvaswatch.client.tensors import TensorFormatError, decode_array
from canvaswatch.v1 import monitor_pb2 as pb


@dataclass(frozen=True)
class SamplerFields:
    """The validated signals of one step; each None when the client did not send it."""

    accepted: np.ndarray | None = None  # [L] bool
    entropy: np.ndarray | None = None  # [L] float32, finite, >= 0 (nats)
    argmax_ids: np.ndarray | None = None  # [L] int64, in [0, vocabulary size)
    temperature: float | None = None  # finite, > 0


NONE = SamplerFields()


def read_sampler_fields(message: pb.StepState, length: int, vocab_size: int) -> SamplerFields:
    """The signals `message` carries, checked against the canvas length and the vocabulary.

    Raises TensorFormatError(field, ...) for a shape other than [L], a dtype of the wrong kind,
    a mask value other than 0/1, a non-finite or negative entropy, an id outside the
    vocabulary, or a temperature that is not finite and > 0.
    """
    has_accepted = message.HasField("accepted")
    has_entropy = message.HasField("entropy")
    has_argmax = message.HasField("argmax_ids")
    has_temperature = message.HasField("temperature")
    if not (has_accepted or has_entropy or has_argmax or has_temperature):
        return NONE
    return SamplerFields(
        accepted=_accepted(message.accepted, length) if has_accepted else None,
        entropy=_entropy(message.entropy, length) if has_entropy else None,
        argmax_ids=_argmax_ids(message.argmax_ids, length, vocab_size) if has_argmax else None,
        temperature=_temperature(message.temperature) if has_temperature else None,
    )


def _positions(tensor: pb.Tensor, field: str, length: int, kinds: str, expected: str) -> np.ndarray:
    values = decode_array(tensor, field, ndim=1)
    if values.dtype.kind not in kinds:
        raise TensorFormatError(f"{field}.dtype", f"expected {expected}, got {pb.DType.Name(tensor.dtype)}")
    if values.shape[0] != length:
        raise TensorFormatError(f"{field}.shape", f"{values.shape[0]} positions, but info.canvas_length is {length}")
    return values


def _accepted(tensor: pb.Tensor, length: int) -> np.ndarray:
    values = _positions(tensor, "accepted", length, "iu", "UINT8, INT32 or INT64")
    bad = (values != 0) & (values != 1)
    if bad.any():
        position = int(np.argmax(bad))
        raise TensorFormatError("accepted", f"value {values[position]} at position {position}; the mask holds 0 or 1")
    return values.astype(bool)


def _entropy(tensor: pb.Tensor, length: int) -> np.ndarray:
    values = _positions(tensor, "entropy", length, "f", "FLOAT16, FLOAT32 or BFLOAT16")
    finite = np.isfinite(values)
    if not finite.all():
        raise TensorFormatError("entropy", f"non-finite entropy at position {int(np.argmin(finite))}")
    negative = values < 0
    if negative.any():
        position = int(np.argmax(negative))
        raise TensorFormatError("entropy", f"negative entropy {float(values[position]):g} at position {position}")
    return values.astype(np.float32)  # a copy: owned and writable, not a view of the message


def _argmax_ids(tensor: pb.Tensor, length: int, vocab_size: int) -> np.ndarray:
    values = _positions(tensor, "argmax_ids", length, "i", "INT32 or INT64")
    outside = (values < 0) | (values >= vocab_size)
    if outside.any():
        position = int(np.argmax(outside))
        raise TensorFormatError(
            "argmax_ids",
            f"token id {values[position]} at position {position} is outside the vocabulary [0, {vocab_size})",
        )
    return values.astype(np.int64)


def _temperature(value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise TensorFormatError("temperature", f"must be finite and > 0, got {value:g}")
    return float(value)
