"""The monitor contract: what a monitor sees and what it returns.

A monitor sees decoded steps (tensors plus a vocabulary to read them), never
protobuf, and returns `Flag` values. The server owns transport, decoding,
isolation (exceptions and time budgets) and metrics; a monitor owns only its
definition of a phenomenon and its per-request state, which must stay bounded
by canvas size, not by the number of steps.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch


class Severity(enum.IntEnum):
    """Same numbers as canvaswatch.v1.Severity."""

    INFO = 1
    WARNING = 2
    CRITICAL = 3

    @classmethod
    def parse(cls, name: str) -> "Severity":
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown severity {name!r}; expected one of info, warning, critical") from None


@dataclass(frozen=True)
class Evidence:
    """Where a flag was seen: a step of a block, positions on its canvas, the decoded text."""

    block: int
    step: int
    positions: tuple[int, ...] = ()
    snippet: str = ""


@dataclass(frozen=True)
class Flag:
    """What a monitor raises. `reason` and `attributes` must hold no decoded
    text (they go to logs and metrics-adjacent places); text goes in evidence
    snippets, which logs keep only where the config allows content."""

    monitor: str
    severity: Severity
    reason: str
    score: float = 1.0
    evidence: tuple[Evidence, ...] = ()
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestMeta:
    """What the first message of a stream says about the request."""

    request_id: str
    model: str
    tenant: str
    prompt_ids: tuple[int, ...]
    canvas_length: int
    total_steps: int
    attributes: Mapping[str, str] = field(default_factory=dict)


@runtime_checkable
class Vocabulary(Protocol):
    """Turns token ids into text and back; the server passes its tokenizer-backed one.

    decode() is the concatenation of each token's display piece, so that
    char_offsets() can map a character span of the text back to positions.
    """

    size: int

    def decode(self, ids: Sequence[int]) -> str: ...

    def piece(self, token_id: int) -> str: ...

    def encode(self, text: str) -> list[int]: ...

    def char_offsets(self, ids: Sequence[int]) -> Sequence[int]:
        """Start offset of each token in decode(ids), plus the total length (len(ids) + 1 values)."""
        ...


@dataclass(frozen=True, eq=False)
class DecodedStep:
    """One denoising step through the token bottleneck.

    ids/probs are [L, k], most probable first, probabilities normalised over
    the full vocabulary (0 = padding); residual[L] is the mass outside the kept
    tokens (None when the client did not say, e.g. it sent only its top-k).

    The sampler's own signals, validated by the sidecar, are None unless the
    client sent them (docs/wire.md; transformers' DiffusionGemma through
    client.diffusion_gemma.attach_bottleneck sends all of them):
    accepted[L] marks the positions the sampler accepted (committed) this step;
    accepted tokens are re-decided every step, so one accepted at a step and
    later accepted with another token is a retroactive revision by definition.
    entropy[L] is each position's entropy in nats of the distribution the sampler
    drew from (softmax of logits / temperature), what DiffusionGemma's
    entropy-bound sampler ranks positions by. argmax_ids[L] is the model's own
    argmax canvas (at a block's last step, its output). canvas_ids[L] is the
    sampled canvas: the accepted tokens where accepted is True, noise elsewhere.
    """

    block: int
    step: int
    ids: torch.Tensor  # [L, k] int64
    probs: torch.Tensor  # [L, k] float32
    vocab: Vocabulary
    residual: torch.Tensor | None = None  # [L] float32
    canvas_ids: torch.Tensor | None = None  # [L] int64, the sampled canvas if sent
    hidden: torch.Tensor | None = None  # [L, d] the self-conditioning vectors, when sent in that form
    residual_sum: float | None = None  # sum of residual, when the decoder computed it on the way
    accepted: np.ndarray | None = None  # [L] bool, the positions the sampler accepted this step
    entropy: np.ndarray | None = None  # [L] float32 >= 0, nats, of the distribution the sampler drew from
    argmax_ids: np.ndarray | None = None  # [L] int64, the model's argmax canvas
    temperature: float | None = None  # > 0, what the logits were divided by at this step

    @cached_property
    def canvas_length(self) -> int:
        return len(self.ids_np)

    @cached_property
    def ids_np(self) -> "np.ndarray":
        """ids as NumPy (a zero-copy view): per-call overhead ~1 us against torch's ~5-10 us on small canvases."""
        return self.ids.numpy()

    @cached_property
    def probs_np(self) -> "np.ndarray":
        return self.probs.numpy()

    @cached_property
    def residual_mean(self) -> float | None:
        """Mean residual mass over the canvas (None when unknown)."""
        if self.residual is None:
            return None
        if self.residual_sum is not None:
            return self.residual_sum / max(self.canvas_length, 1)
        values = self.residual.numpy()
        # add.reduce, not .mean(): the same float64 sum without ~5 us of ndarray.mean's dispatch
        return float(np.add.reduce(values, dtype=np.float64)) / max(values.size, 1)

    @cached_property
    def top1(self) -> torch.Tensor:
        return self.ids[:, 0]

    @cached_property
    def top1_prob(self) -> torch.Tensor:
        return self.probs[:, 0]

    @cached_property
    def text(self) -> str:
        """The canvas read as its top-1 tokens."""
        return self.vocab.decode(self.ids_np[:, 0])

    @cached_property
    def text_lower(self) -> str:
        """The text lower-cased with its length kept, so offsets found in it index `text` too.

        Computed once for every monitor that matches case-insensitively: from the vocabulary's
        lower-cased pieces where it has them (no need to build `text` first), else by lowering
        the text. A character whose lower case is longer (e.g. 'İ') is kept as it is; pieces are
        lowered one by one, so a capital sigma ending a piece reads as final sigma.
        """
        decode_lower = getattr(self.vocab, "decode_lower", None)
        if decode_lower is not None:
            return decode_lower(self.ids_np[:, 0])
        return lower_keeping_length(self.text)

    @cached_property
    def char_offsets(self) -> "np.ndarray":
        """Start offset of each position's piece in `text`, plus the total length."""
        return np.asarray(self.vocab.char_offsets(self.ids_np[:, 0]))

    @cached_property
    def memo(self) -> dict:
        """Results several monitors need from this step, computed by the first that asks (keyed by its owner)."""
        return {}

    def span_text(self, start: int, stop: int) -> str:
        start, stop = max(0, start), min(self.canvas_length, stop)
        return self.vocab.decode(self.top1[start:stop].tolist())

    def alternatives(self, position: int) -> list[tuple[str, float]]:
        """The kept tokens at one position as (piece, prob), padding left out."""
        ids = self.ids[position].tolist()
        probs = self.probs[position].tolist()
        return [(self.vocab.piece(i), p) for i, p in zip(ids, probs) if p > 0]


@dataclass(frozen=True)
class FinalCanvas:
    """The request's end: the final output ids (all blocks) and its text."""

    output_ids: tuple[int, ...]
    text: str
    steps_seen: int
    steps_dropped: int


class Monitor(Protocol):
    """A pluggable monitor. One instance serves every request; state lives in what start() returns.

    Implementations also provide `Params`, a dataclass of their TOML parameters
    (validated by the registry), a `description`, a constructor taking
    `params: Params`, and optionally `close()`, called once on shutdown. on_step must cost time proportional to canvas size and
    use tensor operations rather than Python loops over positions.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    Params: ClassVar[type]

    def start(self, request: RequestMeta) -> Any: ...

    def on_step(self, state: Any, step: DecodedStep) -> list[Flag]: ...

    def on_finish(self, state: Any, final: FinalCanvas) -> list[Flag]: ...


def lower_keeping_length(text: str) -> str:
    """text.lower(), except that a character whose lower case has another length stays as it is."""
    lowered = text.lower()
    if len(lowered) == len(text):
        return lowered
    return "".join(c if len(low := c.lower()) != 1 else low for c in text)
