"""Attach canvaswatch to transformers' DiffusionGemma: `model.generate(..., streamer=CanvasWatchStreamer(...))`.

How transformers 5.23 drives a streamer (models/diffusion_gemma,
DiffusionGemmaGenerationMixin.generate):
  - put(prompt_ids) once before the first canvas;
  - per denoising step, put_draft(logits=self_conditioning_logits.cpu()) when
    the streamer's `_takes_logits` is true ([B, L, V], the logits the next step
    is conditioned on: exactly the state the token bottleneck reads);
  - put(canvas) after each canvas (block) is finalised;
  - end() after the last canvas.
The streamer does no work in the loop beyond counting and queueing a lazy
step: the top-k bottleneck and serialisation run on the sender thread. The
queued item holds a reference to the CPU logits that transformers created
for this call (a fresh tensor each step, never written again), bounded by
max_pending steps per row; when the sidecar lags, steps are dropped by policy
and counted, and the final message always goes out.
"""

from __future__ import annotations

import functools
from typing import Sequence

import grpc
import torch

from canvaswatch.client.bottleneck import bottleneck
from canvaswatch.client.stream import WatchStream, channel_options, new_request_id
from canvaswatch.v1 import monitor_pb2 as pb


class CanvasWatchStreamer:
    """A transformers streamer that streams every denoising step of every batch row to the sidecar."""

    _takes_logits = True

    def __init__(self, target: str | grpc.Channel, *, request_id: str | None = None, model: str = "diffusion-gemma",
                 tenant: str = "", k: int = 8, top_p: float | None = None, max_pending: int = 8,
                 drop_policy: str = "oldest", total_steps: int = 0, metadata: Sequence[tuple[str, str]] = ()) -> None:
        self._owns_channel = isinstance(target, str)
        self._channel = grpc.insecure_channel(target, options=channel_options()) if isinstance(target, str) else target
        self.request_id = request_id or new_request_id()
        self.model, self.tenant = model, tenant
        self.k, self.top_p = k, top_p
        self.max_pending, self.drop_policy, self.total_steps = max_pending, drop_policy, total_steps
        self.metadata = list(metadata)
        self.streams: list[WatchStream] = []
        self.prompt_ids: list[list[int]] = []
        self.outputs: list[list[int]] = []
        self.block = 0
        self.step = 0
        self.steps_sent = 0
        self._prompt_seen = False

    # ---- the transformers streamer hooks ----------------------------------------------------

    def put(self, value: torch.Tensor) -> None:
        rows = _rows(value)
        if not self._prompt_seen:
            self._prompt_seen = True
            self.prompt_ids = rows
            return
        # A finished canvas: its tokens are output; the next drafts belong to the next block.
        if not self.outputs:
            self.outputs = [[] for _ in rows]
        for output, row in zip(self.outputs, rows):
            output.extend(row)
        if self.streams:
            self.block += 1
            self.step = 0

    def put_draft(self, value: torch.Tensor | None = None, logits: torch.Tensor | None = None, **_: object) -> None:
        if logits is None:
            return  # a draft without logits (another caller's streamer setup) carries no state to monitor
        if not self.streams:
            self._open(batch=logits.shape[0], canvas_length=logits.shape[1])
        for row, stream in enumerate(self.streams):
            stream.send(functools.partial(self._build, logits, row, self.block, self.step))
        self.step += 1
        self.steps_sent += 1

    def end(self) -> None:
        for row, stream in enumerate(self.streams):
            stream.finish(self.outputs[row] if row < len(self.outputs) else [])

    # ---- results ----------------------------------------------------------------------------

    def verdicts(self, timeout: float | None = 30.0) -> list[pb.Verdict]:
        return [stream.result(timeout) for stream in self.streams]

    @property
    def dropped(self) -> int:
        return sum(stream.dropped for stream in self.streams)

    def close(self) -> None:
        for stream in self.streams:
            stream.close()
        if self._owns_channel:
            self._channel.close()

    # ---- internals --------------------------------------------------------------------------

    def _open(self, batch: int, canvas_length: int) -> None:
        for row in range(batch):
            info = pb.RequestInfo(
                request_id=self.request_id if batch == 1 else f"{self.request_id}-{row}",
                model=self.model, tenant=self.tenant,
                prompt_ids=self.prompt_ids[row] if row < len(self.prompt_ids) else [],
                canvas_length=canvas_length, total_steps=self.total_steps,
                attributes={"k": str(self.k), **({"top_p": str(self.top_p)} if self.top_p else {})},
            )
            self.streams.append(WatchStream(self._channel, info, max_pending=self.max_pending,
                                            drop_policy=self.drop_policy, metadata=self.metadata))

    def _build(self, logits: torch.Tensor, row: int, block: int, step: int) -> pb.StepState:
        kept = bottleneck(logits[row], k=self.k, top_p=self.top_p)
        return pb.StepState(block=block, step=step, topk=kept.to_message())


def _rows(value: torch.Tensor) -> list[list[int]]:
    value = value if value.dim() > 1 else value.unsqueeze(0)
    return [row.tolist() for row in value]
