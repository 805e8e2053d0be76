"""Attach canvaswatch to transformers' DiffusionGemma: `model.generate(..., streamer=CanvasWatchStreamer(...))`.

How transformers 5.23 drives a streamer (models/diffusion_gemma,
DiffusionGemmaGenerationMixin.generate):
  - put(prompt_ids) once before the first canvas;
  - per denoising step, put_draft(logits=self_conditioning_logits.cpu()) when
    the streamer's `_takes_logits` is true ([B, L, V], the logits the next step
    is conditioned on: exactly the state the token bottleneck reads);
  - put(canvas) after each canvas (block) is finalised;
  - end() after the last canvas.
Two ways to feed it:
- logits mode (default): transformers copies the full [B, L, V] logits to the
  CPU for the streamer every step (~268 MB at L=256, V=262,144, float32); the
  streamer only queues a reference and the top-k runs on its sender thread.
- on-device mode (`attach_bottleneck(model, streamer)`): a hook computes the
  top-k where the logits live, right after each denoising step, and only the
  [B, L, k] ids and probabilities leave the device (k = 8: 16 KB a step at
  L=256). With `enforce=True` the hook also replaces the self-conditioning
  logits by their bottlenecked distribution, so the model really runs through
  the bottleneck and what is monitored is exactly what flows.
In both, when the sidecar lags, steps are dropped by policy and counted, and
the final message always goes out.
"""

from __future__ import annotations

import functools
from typing import Sequence

import grpc
import torch

from canvaswatch.client.token_bottleneck import Bottleneck, bottleneck
from canvaswatch.client.stream import WatchStream, channel_options, new_request_id
from canvaswatch.v1 import monitor_pb2 as pb


class CanvasWatchStreamer:
    """A transformers streamer that streams every denoising step of every batch row to the sidecar."""

    def __init__(self, target: str | grpc.Channel, *, request_id: str | None = None, model: str = "diffusion-gemma",
                 tenant: str = "", k: int = 8, top_p: float | None = None, max_pending: int = 8,
                 drop_policy: str = "oldest", total_steps: int = 0, metadata: Sequence[tuple[str, str]] = ()) -> None:
        # transformers hands put_draft the full logits only when this is true (see the module docstring).
        self._takes_logits = True
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
        if logits is None or not self._takes_logits:
            return  # on-device mode: the hook already sent this step's top-k
        self._emit(logits.shape[0], logits.shape[1], functools.partial(self._build_from_logits, logits))

    def put_bottleneck(self, kept: Bottleneck) -> None:
        """One step's [B, L, k] bottleneck computed on the model's device (see attach_bottleneck)."""
        ids, probs = kept.ids, kept.probs
        if ids.is_cuda:
            # Start the small copy now without waiting; the sender thread waits on the event.
            event = torch.cuda.Event()
            ids, probs = ids.to("cpu", non_blocking=True), probs.to("cpu", non_blocking=True)
            event.record()
        else:
            event = None
        self._emit(ids.shape[0], ids.shape[1], functools.partial(self._build_from_topk, ids, probs, event, kept.top_p))

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

    def _emit(self, batch: int, canvas_length: int, build) -> None:
        if not self.streams:
            self._open(batch=batch, canvas_length=canvas_length)
        for row, stream in enumerate(self.streams):
            stream.send(functools.partial(build, row, self.block, self.step))
        self.step += 1
        self.steps_sent += 1

    def _build_from_logits(self, logits: torch.Tensor, row: int, block: int, step: int) -> pb.StepState:
        kept = bottleneck(logits[row], k=self.k, top_p=self.top_p)
        return pb.StepState(block=block, step=step, topk=kept.to_message())

    def _build_from_topk(self, ids: torch.Tensor, probs: torch.Tensor, event, top_p: float, row: int, block: int,
                         step: int) -> pb.StepState:
        if event is not None:
            event.synchronize()
        kept = Bottleneck(ids=ids[row], probs=probs[row], residual=(1 - probs[row].sum(-1)), top_p=top_p)
        return pb.StepState(block=block, step=step, topk=kept.to_message())


def _rows(value: torch.Tensor) -> list[list[int]]:
    value = value if value.dim() > 1 else value.unsqueeze(0)
    return [row.tolist() for row in value]


def enforce_bottleneck(logits: torch.Tensor, kept: Bottleneck) -> torch.Tensor:
    """Logits whose softmax is exactly the bottlenecked distribution: the kept tokens, renormalised.

    Every other token gets -inf, so the decoder's softmax(logits) @ E builds its
    soft embeddings from the kept tokens alone (the paper's token bottleneck).
    """
    probs = kept.probs / kept.probs.sum(-1, keepdim=True)
    log_probs = torch.log(probs)
    live = kept.probs > 0
    # Padding slots (top-p) repeat the top-1 entry, so duplicate scatter indices write equal values.
    ids = torch.where(live, kept.ids.long(), kept.ids[..., :1].long())
    values = torch.where(live, log_probs, log_probs[..., :1]).to(logits.dtype)
    return torch.full_like(logits, float("-inf")).scatter_(-1, ids, values)


class BottleneckHook:
    """Runs the token bottleneck on the model's device after every denoising step.

    It wraps the model instance's `_denoising_step` (transformers 5.23's
    DiffusionGemmaGenerationMixin), which returns the self-conditioning logits
    the next step is conditioned on: the exact state to read, and to replace
    when enforcing. `detach()` restores the model.
    """

    def __init__(self, model: torch.nn.Module, streamer: CanvasWatchStreamer | None, *, k: int = 8,
                 top_p: float | None = None, enforce: bool = False) -> None:
        if not hasattr(model, "_denoising_step"):
            raise TypeError(f"{type(model).__name__} has no _denoising_step: not a transformers DiffusionGemma model")
        self.model, self.streamer = model, streamer
        self.k, self.top_p, self.enforce = k, top_p, enforce
        self._original = model._denoising_step
        model._denoising_step = self._step
        if streamer is not None:
            streamer._takes_logits = False  # spare transformers the full-logits CPU copy

    def _step(self, *args, **kwargs):
        canvas, argmax, logits, finished = self._original(*args, **kwargs)
        kept = bottleneck(logits, k=self.k, top_p=self.top_p)
        if self.enforce:
            logits = enforce_bottleneck(logits, kept)
        if self.streamer is not None:
            self.streamer.put_bottleneck(kept)
        return canvas, argmax, logits, finished

    def detach(self) -> None:
        self.model._denoising_step = self._original
        if self.streamer is not None:
            self.streamer._takes_logits = True


def attach_bottleneck(model: torch.nn.Module, streamer: CanvasWatchStreamer | None = None, *, k: int | None = None,
                      top_p: float | None = None, enforce: bool = False) -> BottleneckHook:
    """Compute the top-k on the model's device (and with enforce=True, run the model through it)."""
    k = k if k is not None else (streamer.k if streamer is not None else 8)
    top_p = top_p if top_p is not None else (streamer.top_p if streamer is not None else None)
    return BottleneckHook(model, streamer, k=k, top_p=top_p, enforce=enforce)
