"""What the sampler knew at one denoising step: the optional StepState fields beside the canvas.

A diffusion sampler decides more than any view of its logits shows: which
positions it accepted (committed) this step, how uncertain each position was,
the argmax canvas, the sampled canvas and the temperature. DiffusionGemma's
entropy-bound sampler ranks positions by the entropy of softmax(logits / T)
and accepts the lowest-entropy ones while their summed entropy, less the
largest, stays under a bound; accepted tokens are re-decided every step, so a
committed token that is later replaced is a retroactive revision by
definition. These signals cost a few bytes per position (see monitor.proto,
StepState fields 20 and 24-27), so they are worth sending beside any state.

`SamplerSignals` holds them as tensors on any device, for one canvas [L] or a
batch [B, L]; `fill()` writes one canvas into a StepState. `entropy()` is the
one implementation of the per-position entropy, computed where the logits live.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from canvaswatch.client.tensors import encode_tensor
from canvaswatch.v1 import monitor_pb2 as pb

# Elements of logits read per chunk by entropy(): bounds its float32 temporaries to ~64 MB each
# (64 positions at V = 262,144) whatever the batch and canvas size.
_ENTROPY_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class SamplerSignals:
    """One step's sampler signals; every field optional, each tensor [L] or [B, L] on any device.

    accepted: bool or 0/1 integers, 1 where the sampler accepted (committed) the denoiser's token.
    entropy: per-position entropy in nats of the distribution the sampler drew from (>= 0).
    argmax_ids: per-position most probable token of this step's prediction.
    canvas_ids: the sampled canvas the next step starts from (accepted tokens, noise elsewhere).
    temperature: the temperature the logits were divided by at this step.
    """

    accepted: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    argmax_ids: torch.Tensor | None = None
    canvas_ids: torch.Tensor | None = None
    temperature: float | None = None

    def compact(self) -> "SamplerSignals":
        """The wire dtypes (uint8 mask, float16 entropy, int32 ids), computed on the tensors' own device.

        Narrowing before a device-to-host copy moves 11 bytes per position instead of 21.
        """
        return replace(
            self,
            accepted=None if self.accepted is None else self.accepted.to(torch.uint8),
            entropy=None if self.entropy is None else self.entropy.to(torch.float16),
            argmax_ids=None if self.argmax_ids is None else self.argmax_ids.to(torch.int32),
            canvas_ids=None if self.canvas_ids is None else self.canvas_ids.to(torch.int32),
        )

    def to(self, device: str | torch.device, non_blocking: bool = False) -> "SamplerSignals":
        """The same signals on `device` (with non_blocking, the caller synchronises before reading)."""
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device, non_blocking=non_blocking)

        return replace(self, accepted=move(self.accepted), entropy=move(self.entropy),
                       argmax_ids=move(self.argmax_ids), canvas_ids=move(self.canvas_ids))

    def row(self, index: int) -> "SamplerSignals":
        """Batch row `index` of [B, L] signals."""
        def pick(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor[index]

        return replace(self, accepted=pick(self.accepted), entropy=pick(self.entropy),
                       argmax_ids=pick(self.argmax_ids), canvas_ids=pick(self.canvas_ids))

    def fill(self, message: pb.StepState) -> pb.StepState:
        """Write one canvas's signals ([L] each) into `message`, in the wire dtypes; returns it.

        Fields left None stay unset. Raises ValueError for a tensor that is not one canvas [L]
        or a temperature that is not finite and > 0, so a bug shows on the client's side.
        """
        for name in ("accepted", "entropy", "argmax_ids", "canvas_ids"):
            tensor = getattr(self, name)
            if tensor is not None and tensor.dim() != 1:
                raise ValueError(f"{name}: fill() needs one canvas [L], got shape {list(tensor.shape)}; use row()")
        wire = self.compact()
        if wire.accepted is not None:
            message.accepted.CopyFrom(encode_tensor(wire.accepted))
        if wire.entropy is not None:
            message.entropy.CopyFrom(encode_tensor(wire.entropy))
        if wire.argmax_ids is not None:
            message.argmax_ids.CopyFrom(encode_tensor(wire.argmax_ids))
        if wire.canvas_ids is not None:
            message.canvas_ids[:] = wire.canvas_ids.tolist()
        if self.temperature is not None:
            if not (math.isfinite(self.temperature) and self.temperature > 0):
                raise ValueError(f"temperature: must be finite and > 0, got {self.temperature}")
            message.temperature = self.temperature
        return message


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy in nats of softmax(logits) over the last dimension: float32, >= 0, same device.

    The quantity DiffusionGemma's EntropyBoundSampler ranks positions by
    (torch.distributions.Categorical(logits=...).entropy()), computed as
    sum(entr(softmax)) in float32 chunk by chunk, so its temporaries stay small
    and a -inf logit (an enforced bottleneck) contributes 0, never NaN.
    """
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    rows = max(1, _ENTROPY_CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, flat.shape[0], rows):
        probs = torch.softmax(flat[start:start + rows].float(), dim=-1)
        out[start:start + rows] = torch.special.entr(probs).sum(dim=-1)
    return out.view(logits.shape[:-1])
