"""classifier: a transformers sequence-classification model over intermediate and final canvas text.

Definition. Every `every_n_steps` steps, the step's top-1 canvas text is
classified, and at the end so is the final output text. A label listed in
`flag_labels` whose probability reaches `threshold` raises a flag (once per
label for intermediate canvases, once for the output). At the end, a label
that fired on an intermediate canvas but not on the output gets an
`intermediate_only` flag: content the model wrote, then removed — what an
output-only classifier never sees (the intermediate-context case, with a
classifier instead of a lexicon).

How it runs. One model per monitor instance, shared by every request, in its
own thread: steps submit text without waiting (flags for a step arrive with a
later step, as soon as the model has answered); texts from all streams that
arrive within `batch_window_ms` are classified in one batch. At the end of a
request, outstanding results are awaited for at most `finish_timeout_ms`; a
request submits at most `max_pending` texts that are not yet answered (further
steps are skipped and counted in the `skipped_steps` attribute).

Tests build a tiny model from a config locally; any directory that
AutoModelForSequenceClassification and AutoTokenizer can load works.
"""

from __future__ import annotations

from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from canvaswatch.monitors.base import DecodedStep, Evidence, FinalCanvas, Flag, Monitor, RequestMeta, Severity
from canvaswatch.monitors.batching import WindowBatcher


@dataclass(frozen=True)
class ClassifierParams:
    model: str = ""
    flag_labels: list[str] = field(default_factory=list)
    threshold: float = 0.5
    every_n_steps: int = 4
    max_length: int = 512
    batch_window_ms: float = 5.0
    max_batch: int = 32
    max_pending: int = 8
    finish_timeout_ms: float = 2000.0
    device: str = "cpu"
    severity: str = "warning"

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model: a transformers sequence-classification directory is required")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold: must be in (0, 1], got {self.threshold}")
        for key in ("every_n_steps", "max_length", "max_batch", "max_pending"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        Severity.parse(self.severity, "severity")


@dataclass
class _Pending:
    future: Future
    block: int
    step: int
    text: str


@dataclass
class ClassifierState:
    pending: list[_Pending] = field(default_factory=list)
    fired: dict[str, tuple[int, int, float, str]] = field(default_factory=dict)  # label -> first sighting
    skipped_steps: int = 0


class _BatchRunner:
    """The model in one thread; texts from every request batched within a short window."""

    def __init__(self, params: ClassifierParams) -> None:
        from pathlib import Path

        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not Path(params.model).is_dir():
            # a hub name would be downloaded (or retried against the network for a minute): only local directories
            raise ValueError(f"model: {params.model!r} is not a directory (a transformers sequence-classification "
                             "model saved with save_pretrained; nothing is downloaded)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(params.model, local_files_only=True)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                params.model, local_files_only=True).to(params.device).eval()
        except Exception as err:
            raise ValueError(f"model: cannot load a sequence classifier from {params.model!r}: "
                             f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        self.params = params
        self._batcher: WindowBatcher[str, dict[str, float]] = WindowBatcher(
            self._classify_labelled, window_s=params.batch_window_ms / 1000, max_weight=params.max_batch,
            name="canvaswatch-classifier",
        )

    @property
    def batches(self) -> int:
        return self._batcher.batches

    @property
    def texts(self) -> int:
        return self._batcher.items

    @property
    def alive(self) -> bool:
        return self._batcher.alive

    def submit(self, text: str) -> Future:
        return self._batcher.submit(text)

    def close(self) -> None:
        self._batcher.close()

    def _classify_labelled(self, texts: list[str]) -> list[dict[str, float]]:
        return [dict(zip(self.labels, row)) for row in self._classify(texts)]

    @torch.no_grad()
    def _classify(self, texts: list[str]) -> list[list[float]]:
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.params.max_length,
                                 return_tensors="pt").to(self.params.device)
        return torch.softmax(self.model(**encoded).logits.float(), dim=-1).tolist()


class ClassifierMonitor(Monitor):
    """A transformers sequence classifier over intermediate and final canvas text, batched across streams
    in its own thread; flags labels over a threshold, and labels seen only in intermediate canvases."""

    name: ClassVar[str] = "classifier"
    Params: ClassVar[type] = ClassifierParams

    def __init__(self, params: ClassifierParams) -> None:
        super().__init__(params)
        self.severity = Severity.parse(params.severity)
        self.runner = _BatchRunner(params)
        unknown = [label for label in params.flag_labels if label not in self.runner.labels]
        if unknown:
            raise ValueError(f"flag_labels: {unknown} are not labels of the model ({self.runner.labels})")
        self.flag_labels = params.flag_labels or self.runner.labels[1:]

    def start(self, request: RequestMeta) -> ClassifierState:
        return ClassifierState()

    def close(self) -> None:
        """Stop the model thread."""
        self.runner.close()

    def on_step(self, state: ClassifierState, step: DecodedStep) -> list[Flag]:
        if step.step % self.params.every_n_steps == 0:
            if sum(not p.future.done() for p in state.pending) >= self.params.max_pending:
                state.skipped_steps += 1
            else:
                state.pending.append(_Pending(self.runner.submit(step.text), step.block, step.step, step.text))
        return self._collect(state)

    def on_finish(self, state: ClassifierState, final: FinalCanvas) -> list[Flag]:
        output = self.runner.submit(final.text)
        wait([p.future for p in state.pending] + [output], timeout=self.params.finish_timeout_ms / 1000)
        flags = self._collect(state)
        if not output.done() or output.cancelled():
            return flags
        scores = output.result()
        on_output = {label for label in self.flag_labels if scores[label] >= self.params.threshold}
        for label in self.flag_labels:
            if label in on_output:
                flags.append(self.flag(
                    self.severity, f"classifier label {label!r} scored {scores[label]:.2f} on the final output",
                    Evidence(0, final.steps_seen, (), final.text[:200]), score=scores[label],
                    label=label, phase="output", skipped_steps=state.skipped_steps,
                ))
            elif label in state.fired:
                block, step, score, text = state.fired[label]
                flags.append(self.flag(
                    self.severity, f"classifier label {label!r} fired on an intermediate canvas (block {block} step {step}) "
                                   f"but not on the final output ({scores[label]:.2f})",
                    Evidence(block, step, (), text[:200]), score=score,
                    label=label, phase="intermediate_only", skipped_steps=state.skipped_steps,
                ))
        return flags

    def _collect(self, state: ClassifierState) -> list[Flag]:
        flags, still = [], []
        for pending in state.pending:
            if not pending.future.done():
                still.append(pending)
                continue
            if pending.future.cancelled():
                continue
            scores = pending.future.result()  # an exception here reaches the session's isolation
            for label in self.flag_labels:
                if scores[label] >= self.params.threshold and label not in state.fired:
                    state.fired[label] = (pending.block, pending.step, scores[label], pending.text)
                    flags.append(self.flag(
                        self.severity, f"classifier label {label!r} scored {scores[label]:.2f} on the canvas at block "
                                       f"{pending.block} step {pending.step}",
                        Evidence(pending.block, pending.step, (), pending.text[:200]), score=scores[label],
                        label=label, phase="intermediate",
                    ))
        state.pending = still
        return flags
