"""probe: linear probes on the self-conditioning vectors (the `embeddings` form).

Definition. A safetensors file holds, per label, `<label>.direction` [d],
`<label>.bias` [] and `<label>.threshold` []. At each step that carries hidden
states H [L, d], the probe's score is sigmoid(H · direction + bias) per
position (or of the mean vector when `pooled = true`). A label fires when a
score reaches its threshold; each label is flagged once per request, at the
first step it fires, with the positions that fired and their text. Steps sent
in other forms carry no vectors and are skipped.

Cost: one [L, d] x [d, labels] product per step; state: the labels fired.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from canvaswatch.monitors.base import DecodedStep, Evidence, Flag, Monitor, RequestMeta, Severity
from canvaswatch.monitors.canvas_ops import contiguous_spans


@dataclass(frozen=True)
class ProbeParams:
    path: str = ""
    pooled: bool = False
    severity: str = "warning"

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path: a safetensors file of probes is required")
        if not os.path.isfile(self.path):
            raise ValueError(f"path: no such file {self.path!r}")
        Severity.parse(self.severity, "severity")


@dataclass
class ProbeState:
    fired: set[str] = field(default_factory=set)
    skipped_steps: int = 0


class ProbeMonitor(Monitor):
    """Linear probes (direction, bias, threshold per label) over the self-conditioning vectors."""

    name: ClassVar[str] = "probe"
    Params: ClassVar[type] = ProbeParams

    def __init__(self, params: ProbeParams) -> None:
        from safetensors.torch import load_file

        super().__init__(params)
        self.severity = Severity.parse(params.severity)
        try:
            tensors = load_file(params.path)
        except Exception as err:
            raise ValueError(f"path: cannot read probes from {params.path!r}: {err}") from None
        labels = sorted({key.rsplit(".", 1)[0] for key in tensors})
        missing = [f"{label}.{part}" for label in labels for part in ("direction", "bias", "threshold")
                   if f"{label}.{part}" not in tensors]
        if not labels or missing:
            raise ValueError(f"path: {params.path} needs <label>.direction, .bias and .threshold; missing {missing or 'all'}")
        self.labels = labels
        self.directions = torch.stack([tensors[f"{label}.direction"].float().flatten() for label in labels], dim=1)
        self.bias = torch.stack([tensors[f"{label}.bias"].float().reshape(()) for label in labels])
        self.threshold = torch.stack([tensors[f"{label}.threshold"].float().reshape(()) for label in labels])

    def start(self, request: RequestMeta) -> ProbeState:
        return ProbeState()

    def on_step(self, state: ProbeState, step: DecodedStep) -> list[Flag]:
        if step.hidden is None:
            state.skipped_steps += 1
            return []
        hidden = step.hidden.float()
        if hidden.shape[-1] != self.directions.shape[0]:
            raise ValueError(f"probe dimension {self.directions.shape[0]} differs from the hidden size {hidden.shape[-1]}")
        rows = hidden.mean(dim=0, keepdim=True) if self.params.pooled else hidden
        scores = torch.sigmoid(rows @ self.directions + self.bias)  # [rows, labels]
        firing = scores >= self.threshold
        flags = []
        for column in firing.any(dim=0).nonzero().flatten().tolist():
            label = self.labels[column]
            if label in state.fired:
                continue
            state.fired.add(label)
            positions = list(range(step.canvas_length)) if self.params.pooled else firing[:, column].nonzero().flatten().tolist()
            spans = contiguous_spans(positions)
            evidence = tuple(Evidence(step.block, step.step, tuple(span), step.span_text(span[0], span[-1] + 1))
                             for span in spans[:8])
            flags.append(self.flag(
                self.severity, f"probe {label!r} fired at block {step.block} step {step.step} on {len(positions)} position(s)",
                *evidence, score=float(scores[:, column].max()),
                label=label, positions=len(positions), pooled=self.params.pooled,
            ))
        return flags
