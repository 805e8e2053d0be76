"""The monitor contract: what a monitor is, what it sees, what it returns, and the rules it keeps.

A monitor is a class with a `name`, a `Params` dataclass of its TOML parameters and three
calls per request. Subclass `Monitor` and write `on_step`; the rest has defaults:

    state = monitor.start(request)           # RequestMeta -> this request's state (default None)
    flags = monitor.on_step(state, step)     # each denoising step that reaches the sidecar
    flags = monitor.on_finish(state, final)  # once, with the final output (default [])
    monitor.close()                          # once, when the server shuts down (default: nothing)

`step` is a `DecodedStep`: its docstring lists the members a monitor reads (NumPy arrays of
the kept top-k tokens, block and step, new_block, the residual, the vocabulary, the sampler's
signals). Return `Flag`s, made with `self.flag(severity, reason, *evidence, **attributes)`.
A class that is not a `Monitor` subclass but has the same members (`MonitorProtocol`) is
accepted too. The server owns transport, decoding, isolation and metrics; a monitor owns its
definition of a phenomenon and its per-request state.

The rules (canvaswatch.monitors.testing.check_monitor checks each one):

1. One instance serves every request, several at once: per-request state lives in what
   start() returns, never on self.
2. State is bounded by the canvas length L: memory per request may grow with L (and with
   the monitor's parameters), not with the number of steps or blocks.
3. Positional state starts over at a new block (`step.new_block`): position i of the next
   block holds other text than position i of this one.
4. Each call fits the per-call budget (server.monitor_budget_ms, 50 ms by default). An
   overrun is counted and logged and delays that stream; `monitor_budget_strikes` (3)
   overruns of on_step in a row, or one call past `monitor_budget_hard_ms`, stop the
   monitor for the rest of the request like an exception (rule 5; the verdict's
   monitor_errors says why), and a call still running at `monitor_hard_deadline_s` ends
   the stream (worker mode: the worker is killed and replaced). Work on whole arrays,
   never loop in Python over the vocabulary, and put slow work (a model) on a thread of
   its own.
5. The first exception switches the monitor off for the rest of that request (counted,
   logged, and under monitor_policy = "fail_closed" a CRITICAL flag). Expect what real
   streams hold: steps missing (the client dropped them), optional members that are None,
   a request that ends with no step at all.
6. Before serving, the server runs every monitor once on a synthetic warm-up request
   (request_id "warm-up", L = 16, k = 4, two steps, empty output) so that compiled code
   and tables are ready before the first real request; its flags are discarded. Build
   what the monitor needs in its constructor or on first use, not per request.
7. No decoded text in a flag's `reason` or `attributes`: they reach logs, the audit log
   and dashboards, which the config does not treat as content. Canvas text goes in
   `Evidence.snippet`, kept only where logging.log_content allows.
8. A flag names its monitor (`self.flag` does), has a non-empty reason and a score in
   [0, 1] (higher = surer; `canvaswatch eval` ranks by it), and its evidence points at
   positions of the canvas.
9. A step's arrays are shared by every monitor and the server: read them, never write
   into them.
"""

from __future__ import annotations

import enum
import unicodedata
from dataclasses import MISSING, dataclass, field
from dataclasses import fields as dataclass_fields
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
    def parse(cls, name: str, key: str | None = None) -> "Severity":
        """`name` (any case) as a Severity; `key`: the parameter it came from, named in the error (a Params
        class's __post_init__ passes it, so the configuration error reads monitors.<name>.<key>: ...)."""
        try:
            return cls[name.upper()]
        except (KeyError, AttributeError):  # AttributeError: not a string (severity = 3 in TOML)
            where = f"{key}: " if key else ""
            raise ValueError(f"{where}unknown severity {name!r}; expected one of info, warning, critical") from None


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
    """What the first message of a stream says about the request.

    `prompt_ids` is a read-only int32 NumPy array, this meta's own copy of what was given (a
    tuple, list or array): a prompt can hold tens of thousands of ids, and an array is read off
    the wire ~70x faster than a tuple of Python ints is built. `==` leaves prompt_ids out (an
    array has no single truth value); compare them with np.array_equal.
    """

    request_id: str
    model: str
    tenant: str
    prompt_ids: np.ndarray = field(compare=False)
    canvas_length: int
    total_steps: int  # denoising steps per block, 0 when the client did not say
    attributes: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ids = np.array(self.prompt_ids, dtype=np.int32).reshape(-1)  # a copy: the caller's array stays theirs
        ids.flags.writeable = False
        object.__setattr__(self, "prompt_ids", ids)


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
    """One denoising step through the token bottleneck, as every monitor sees it.

    What a monitor reads (L = canvas length, k = tokens kept per position; arrays are NumPy):

      block, step       the canvas index in the request (blocks run left to right) and the
                        denoising step in it; steps increase within a block but may skip
                        numbers (steps the client dropped)
      new_block         True on the first step the request shows of a block
      ids_np, probs_np  [L, k] int64 / float32: per position the kept tokens, most probable
                        first, with their probability over the full vocabulary (0 = an
                        empty slot); ids_np[:, 0] is the top-1 canvas
      residual          [L] float32 or None: the mass outside the kept tokens;
                        residual_mean is its mean over the canvas (None when unknown)
      canvas_length     L
      vocab             the Vocabulary: piece(id), decode(ids), encode(text)
      text              the top-1 canvas as text; span_text(start, stop) for positions
                        start..stop-1 only (build text only when it is needed: it costs
                        more than reading the arrays)
      hidden            the self-conditioning vectors [L, d] when the step came in the
                        `embeddings` form, else None; a torch tensor, left on the device
                        and in the dtype it was decoded in, since copying [L, d] to the
                        host every step would cost more than most monitors

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
    temperature is what the logits were divided by at this step.

    Everything else here serves the server and the built-in phrase matcher (`ids` and
    `probs` are the torch tensors ids_np and probs_np are views of, `top1`/`top1_prob`
    their first column, `residual_sum`, `text_lower`, `char_offsets`, `memo`,
    `alternatives`) and is not part of what a monitor may rely on.

    The constructor takes the per-position arrays as NumPy or as CPU torch tensors;
    residual, canvas_ids and the sampler's arrays are kept as NumPy.
    """

    block: int
    step: int
    ids: torch.Tensor  # [L, k] int64
    probs: torch.Tensor  # [L, k] float32
    vocab: Vocabulary
    residual: np.ndarray | None = None  # [L] float32
    canvas_ids: np.ndarray | None = None  # [L] int64, the sampled canvas if sent
    hidden: torch.Tensor | None = None  # [L, d] the self-conditioning vectors, when sent in that form
    residual_sum: float | None = None  # sum of residual, when the decoder computed it on the way
    accepted: np.ndarray | None = None  # [L] bool, the positions the sampler accepted this step
    entropy: np.ndarray | None = None  # [L] float32 >= 0, nats, of the distribution the sampler drew from
    argmax_ids: np.ndarray | None = None  # [L] int64, the model's argmax canvas
    temperature: float | None = None  # > 0, what the logits were divided by at this step
    new_block: bool = False  # set by the server, which knows the request's previous step

    def __post_init__(self) -> None:
        # Monitors read NumPy; [L, k] arrays also stay torch because the decoder and the
        # dense path hand them over as torch tensors.
        for name in ("ids", "probs"):
            value = getattr(self, name)
            if isinstance(value, np.ndarray):
                self.__dict__[f"{name}_np"] = value  # primes the cached view
                object.__setattr__(self, name, torch.from_numpy(value))
        for name in ("residual", "canvas_ids", "accepted", "entropy", "argmax_ids"):
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                object.__setattr__(self, name, value.numpy(force=value.device.type != "cpu"))

    @classmethod
    def from_numpy(cls, ids: np.ndarray, probs: np.ndarray, **fields: Any) -> "DecodedStep":
        """The step the constructor would build from NumPy [L, k] arrays and NumPy (or None) per-position
        arrays, built for the sidecar's hot path: the frozen dataclass's __init__ and __post_init__ cost
        ~11-17 us a step (a setattr per field, a type check per array), this ~3 us. Same values, same views
        (tests/monitors/test_base.py compares the two)."""
        missing = _DECODED_STEP_REQUIRED.difference(fields)
        if missing:
            raise TypeError(f"DecodedStep.from_numpy: missing {sorted(missing)}")
        step = object.__new__(cls)
        values = dict(_DECODED_STEP_DEFAULTS)
        values.update(fields)
        values["ids"], values["probs"] = torch.from_numpy(ids), torch.from_numpy(probs)
        values["ids_np"], values["probs_np"] = ids, probs  # primes the cached views, as __post_init__ does
        step.__dict__.update(values)
        return step

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
        values = self.residual
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
        """The top-1 text of positions start..stop-1 (clipped to the canvas)."""
        start, stop = max(0, start), min(self.canvas_length, stop)
        return self.vocab.decode(self.ids_np[start:stop, 0].tolist())

    def alternatives(self, position: int) -> list[tuple[str, float]]:
        """The kept tokens at one position as (piece, prob), padding left out."""
        ids = self.ids_np[position].tolist()
        probs = self.probs_np[position].tolist()
        return [(self.vocab.piece(i), p) for i, p in zip(ids, probs) if p > 0]


_DECODED_STEP_DEFAULTS = {f.name: f.default for f in dataclass_fields(DecodedStep) if f.default is not MISSING}
_DECODED_STEP_REQUIRED = {f.name for f in dataclass_fields(DecodedStep)} - {"ids", "probs", *_DECODED_STEP_DEFAULTS}


@dataclass(frozen=True)
class FinalCanvas:
    """The request's end: the final output ids (all blocks) and its text."""

    output_ids: tuple[int, ...]
    text: str
    steps_seen: int
    steps_dropped: int


@dataclass(frozen=True)
class NoParams:
    """The parameters of a monitor that takes none: its TOML table may only say `enabled`."""


class Monitor:
    """The base of a monitor: subclass it, set `name`, write `on_step`, override what else you need.

    name         the key of its TOML table [monitors.<name>], of its flags and of its metrics
    description  one line for ListMonitors; by default the first paragraph of the class docstring
    Params       a frozen dataclass of the TOML parameters, every field with a default;
                 __post_init__ raises ValueError("<field>: what is wrong") for a bad value
    params       the Params instance this monitor was built with (the default: Params())

    The server builds one instance per engine and calls close() on it once, at shutdown.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "description" not in cls.__dict__ and cls.__doc__:
            cls.description = first_paragraph(cls.__doc__)

    def __init__(self, params: Any = None) -> None:
        self.params = self.Params() if params is None else params

    def start(self, request: RequestMeta) -> Any:
        """This request's state (bounded by its canvas length); None when the monitor keeps none."""
        return None

    def on_step(self, state: Any, step: DecodedStep) -> list[Flag]:
        raise NotImplementedError(f"{type(self).__name__} does not define on_step")

    def on_finish(self, state: Any, final: FinalCanvas) -> list[Flag]:
        return []

    def close(self) -> None:
        """Release what the constructor took (threads, files, models)."""

    def flag(self, severity: Severity | str, reason: str, *evidence: Evidence, score: float = 1.0,
             **attributes: object) -> Flag:
        """A Flag of this monitor. Attribute values become strings (booleans as true/false)."""
        return Flag(
            monitor=self.name,
            severity=severity if isinstance(severity, Severity) else Severity.parse(severity),
            reason=reason,
            score=score,
            evidence=evidence,
            attributes={key: _attribute(value) for key, value in attributes.items()},
        )


class MonitorProtocol(Protocol):
    """What the server needs of a monitor; `Monitor` subclasses have it, other classes may too.

    Such a class also needs a constructor taking its `params` and may define `close()`.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    Params: ClassVar[type]

    def start(self, request: RequestMeta) -> Any: ...

    def on_step(self, state: Any, step: DecodedStep) -> list[Flag]: ...

    def on_finish(self, state: Any, final: FinalCanvas) -> list[Flag]: ...


def first_paragraph(doc: str | None) -> str:
    """A docstring's first paragraph on one line ("" for none)."""
    if not doc:
        return ""
    lines = []
    for line in doc.strip().splitlines():
        if not line.strip():
            break
        lines.append(line.strip())
    return " ".join(lines)


def _attribute(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def lower_keeping_length(text: str) -> str:
    """text.lower(), except that a character whose lower case has another length becomes its lower case's
    first character when the rest are combining marks ("İ" -> "i", so "KİLL" reads "kill" as the output
    check's re.IGNORECASE does), and stays as it is otherwise."""
    lowered = text.lower()
    if len(lowered) == len(text):
        return lowered
    return "".join(low if len(low := c.lower()) == 1 else
                   low[0] if all(unicodedata.combining(mark) for mark in low[1:]) else c for c in text)
