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
  Each queued step keeps the whole [B, L, V] tensor alive until every row has
  sent or dropped it, and the rows' queues (max_pending each) drain on their
  own: max_pending steps' logits when the rows keep pace, up to
  B x max_pending when they do not (a batch of 8 at max_pending 8: up to 64
  copies of [8, L, V]). For batches, prefer on-device mode.
- on-device mode (`attach_bottleneck(model, streamer)`): a hook computes the
  top-k where the logits live, right after each denoising step, and only the
  [B, L, k] ids and probabilities leave the device (k = 8: 16 KB a step at
  L=256). With `enforce=True` the hook also replaces the self-conditioning
  logits by their bottlenecked distribution, so the model really runs through
  the bottleneck and what is monitored is exactly what flows.
  The hook also sends the sampler's own signals (StepState fields 20, 24-27;
  see canvaswatch.client.sampler_signals), computed on the device and narrowed
  there to [B, L] so ~11 bytes per position leave it:
    accepted    EntropyBoundSampler.accepted_token_mask, read after the step
                (transformers keeps it); 0 for rows whose denoising had already
                finished, whose canvas generate() leaves unchanged.
    entropy     not kept by transformers: recomputed from the very logits the
                sampler scored (the float32 temperature-scaled logits handed to
                accept_canvas, seen by wrapping that call for the step): the
                sampler's Categorical(logits).entropy(), in float32. Not from
                the returned self-conditioning logits, which generate() has
                already cast to the embedding dtype (bf16 in the real model).
                A finished row repeats its previous step's entropy.
    argmax_ids  the argmax canvas _denoising_step returns (generate()'s draft,
                and at a block's last step the block's output).
    canvas_ids  the canvas _denoising_step returns: accepted tokens where the
                mask is 1, fresh uniform noise elsewhere.
    temperature not exposed either: recomputed from generate()'s logits
                processors at this step, t_min + (t_max - t_min) * n / N with
                n the steps remaining (LinearTemperatureScheduleLogitsProcessor;
                generate() evaluates it in float32, so they agree to float32
                rounding), times any processor's plain `temperature`.
  Logits mode sends none of them: put_draft sees only the logits, neither the
  sampler nor the step.
In both, when the sidecar lags, steps are dropped by policy and counted, and
the final message always goes out.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from typing import Sequence

import grpc
import torch

from canvaswatch.client.sampler_signals import SamplerSignals, entropy
from canvaswatch.client.gate import Gate, GatePolicy, GenerationBlocked
from canvaswatch.client.token_bottleneck import Bottleneck, bottleneck
from canvaswatch.client.stream import WatchStream, channel_options, close_channel, new_request_id
from canvaswatch.v1 import monitor_pb2 as pb

log = logging.getLogger("canvaswatch.transformers")
MAX_CONSECUTIVE_ERRORS = 100  # steps in a row whose monitoring failed before the hook stops trying

class CanvasWatchStreamer:
    """A transformers streamer that streams every denoising step of every batch row to the sidecar."""

    def __init__(self, target: str | grpc.Channel, *, request_id: str | None = None, model: str = "diffusion-gemma",
                 tenant: str = "", k: int = 8, top_p: float | None = None, max_pending: int = 8,
                 drop_policy: str = "oldest", total_steps: int = 0, metadata: Sequence[tuple[str, str]] = (),
                 gate: GatePolicy | Gate | None = None) -> None:
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
        self._ended = False
        # Gate mode (client/gate.py): stop generate() at the next step after a severe flag, hold the
        # output until the verdict. None: monitor only.
        self.gate = Gate(gate) if isinstance(gate, GatePolicy) else gate
        self.gate_verdicts: list[pb.Verdict] | None = None

    # ---- the transformers streamer hooks ----------------------------------------------------

    def put(self, value: torch.Tensor) -> None:
        if self._ended:
            # generate()'s first call, with the prompt, before any denoising: its streams, outputs, verdicts and
            # gate belong to the request that ended; a second generate() would mix them up
            raise RuntimeError("CanvasWatchStreamer serves one generate() call and this one has ended; "
                               "make a new streamer for each call")
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
        self._check_gate()
        if logits is None or not self._takes_logits:
            return  # on-device mode: the hook already sent this step's top-k
        self._emit(logits.shape[0], logits.shape[1], functools.partial(self._build_from_logits, logits))

    def put_bottleneck(self, kept: Bottleneck, signals: SamplerSignals | None = None) -> None:
        """One step's [B, L, k] bottleneck, and optionally its [B, L] sampler signals, computed on the model's device.

        See attach_bottleneck. Nothing here waits for the device: the copies start now and the
        sender thread waits for them.
        """
        self._check_gate()
        ids, probs = kept.ids, kept.probs
        if ids.is_cuda:
            # Start the small copies now without waiting; the sender thread waits on the event.
            # The copies run on the current stream of the device the tensors are on (with device_map="auto"
            # that is rarely the current device): the event must be recorded on that same stream.
            event, stream = torch.cuda.Event(), torch.cuda.current_stream(ids.device)
            ids, probs = ids.to("cpu", non_blocking=True), probs.to("cpu", non_blocking=True)
            if signals is not None:
                signals = signals.to("cpu", non_blocking=True)
            event.record(stream)
        else:
            event = None
        self._emit(ids.shape[0], ids.shape[1],
                   functools.partial(self._build_from_topk, ids, probs, event, kept.top_p, signals))

    def end(self) -> None:
        self._ended = True
        for row, stream in enumerate(self.streams):
            stream.finish(self.outputs[row] if row < len(self.outputs) else [])
        if self.gate is not None and self.gate.policy.hold:
            # generate() calls end() before it returns: raising here keeps the output from the caller.
            self.gate_verdicts = self.gate.release(self.streams)

    # ---- results ----------------------------------------------------------------------------

    def verdicts(self, timeout: float | None = 30.0) -> list[pb.Verdict]:
        """Every batch row's verdict, waiting at most `timeout` seconds in all (not per row)."""
        if timeout is None:
            return [stream.result(None) for stream in self.streams]
        deadline = time.monotonic() + timeout
        return [stream.result(max(0.0, deadline - time.monotonic())) for stream in self.streams]

    @property
    def dropped(self) -> int:
        return sum(stream.dropped for stream in self.streams)

    def close(self) -> None:
        for stream in self.streams:
            stream.close()
        if self._owns_channel:
            close_channel(self._channel)

    # ---- internals --------------------------------------------------------------------------

    def _check_gate(self) -> None:
        """Once a step, from the denoising loop: one Event check; raises GenerationBlocked after a severe flag."""
        if self.gate is None or not self.gate.tripped:
            return
        for stream in self.streams:
            stream.cancel()  # the request ends here; the sidecar counts it as cancelled
        self.gate.check()

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
                                            drop_policy=self.drop_policy, metadata=self.metadata,
                                            on_event=self.gate.on_event if self.gate is not None else None))

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

    def _build_from_topk(self, ids: torch.Tensor, probs: torch.Tensor, event, top_p: float,
                         signals: SamplerSignals | None, row: int, block: int, step: int) -> pb.StepState:
        if event is not None:
            event.synchronize()
        kept = Bottleneck(ids=ids[row], probs=probs[row], residual=(1 - probs[row].sum(-1)), top_p=top_p)
        message = pb.StepState(block=block, step=step, topk=kept.to_message())
        return signals.row(row).fill(message) if signals is not None else message


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
    """Runs the token bottleneck, and reads the sampler's signals, on the model's device after every denoising step.

    It wraps the model instance's `_denoising_step` (transformers 5.23-5.24's
    DiffusionGemmaGenerationMixin), which returns the self-conditioning logits
    the next step is conditioned on: the exact state to read, and to replace
    when enforcing. generate() passes it the sampler, the step and the logits
    processors by keyword, which is where the signals come from (the module
    docstring says how each is obtained). `detach()` restores the model.
    """

    def __init__(self, model: torch.nn.Module, streamer: CanvasWatchStreamer | None, *, k: int = 8,
                 top_p: float | None = None, enforce: bool = False, signals: bool = True) -> None:
        if not hasattr(model, "_denoising_step"):
            raise TypeError(f"{type(model).__name__} has no _denoising_step: not a transformers DiffusionGemma model")
        self.model, self.streamer = model, streamer
        self.k, self.top_p, self.enforce = k, top_p, enforce
        self.signals = signals and streamer is not None
        self._last_entropy: torch.Tensor | None = None
        self.errors = 0  # steps whose monitoring failed (not sent); see _failed
        self.consecutive_errors = 0
        self.last_error = ""
        self.switched_off = False
        self._original = model._denoising_step
        model._denoising_step = self._step
        if streamer is not None:
            streamer._takes_logits = False  # spare transformers the full-logits CPU copy

    def _step(self, *args, **kwargs):
        sampler = kwargs.get("sampler") if self.signals else None
        finished = kwargs.get("finished_denoising")
        # generate() ORs this step's stopping verdict into that tensor in place: keep who had finished before it.
        finished_before = finished.clone() if sampler is not None and isinstance(finished, torch.Tensor) else None
        scored: list[torch.Tensor] = []
        undo = _see_scored_logits(sampler, scored) if sampler is not None else None
        try:
            canvas, argmax, logits, finished = self._original(*args, **kwargs)
        finally:
            if undo is not None:
                undo()
        if self.enforce:
            # The model runs through the bottleneck: part of its computation, so an error here is the model's.
            kept = bottleneck(logits, k=self.k, top_p=self.top_p)
            logits = enforce_bottleneck(logits, kept)
        else:
            kept = None
        if self.streamer is not None and not self.switched_off:
            self.streamer._check_gate()  # a gate's GenerationBlocked is meant for generate()
            try:
                signals = None
                if sampler is not None:
                    signals = self._signals(sampler, kwargs, scored, canvas, argmax, logits, finished_before)
                if kept is None:
                    kept = bottleneck(logits, k=self.k, top_p=self.top_p)
                self.streamer.put_bottleneck(kept, signals)
                self.consecutive_errors = 0
            except GenerationBlocked:
                raise
            except Exception as err:  # monitoring never ends the user's generate()
                self._failed(err)
        return canvas, argmax, logits, finished

    def _failed(self, err: Exception) -> None:
        """A step whose monitoring failed (a transformers version whose sampler differs, memory, a bug): the
        step is not sent (counted in `errors`), the first failure is logged with its reason, and after
        MAX_CONSECUTIVE_ERRORS in a row monitoring switches off for this model (`switched_off`), so a
        failure on every step costs generate() nothing more."""
        self.errors += 1
        self.consecutive_errors += 1
        self.last_error = f"{type(err).__name__}: {err}"
        if self.errors == 1:
            log.warning("canvaswatch: a denoising step was not monitored (%s); generate() goes on", self.last_error)
        if self.consecutive_errors >= MAX_CONSECUTIVE_ERRORS:
            self.switched_off = True
            log.error("canvaswatch: %d denoising steps in a row could not be monitored (last: %s); monitoring is "
                      "off for this model until attach_bottleneck is called again", self.consecutive_errors,
                      self.last_error)

    def _signals(self, sampler, kwargs: dict, scored: list[torch.Tensor], canvas: torch.Tensor, argmax: torch.Tensor,
                 logits: torch.Tensor, finished_before: torch.Tensor | None) -> SamplerSignals:
        """This step's [B, L] signals in their wire dtypes, still on the device (no synchronisation)."""
        # The sampler's own scored logits when the wrapper saw them; else the returned ones (a sampler
        # other than transformers' EntropyBoundSampler), which may be rounded to the embedding dtype.
        position_entropy = scored[-1] if scored else entropy(logits)
        accepted = getattr(sampler, "accepted_token_mask", None)
        if accepted is not None:
            accepted = accepted.bool()
        if finished_before is not None:
            # Rows already finished keep their canvas (generate() discards this step for them).
            running = ~finished_before.view(-1, 1)
            if accepted is not None:
                accepted = accepted & running
            if self._last_entropy is not None and self._last_entropy.shape == position_entropy.shape:
                position_entropy = torch.where(running, position_entropy, self._last_entropy)
        self._last_entropy = position_entropy
        temperature = sampling_temperature(kwargs.get("logits_processor"), kwargs.get("cur_step"))
        return SamplerSignals(accepted=accepted, entropy=position_entropy, argmax_ids=argmax, canvas_ids=canvas,
                              temperature=temperature).compact()

    def detach(self) -> None:
        self.model._denoising_step = self._original
        if self.streamer is not None:
            self.streamer._takes_logits = True


def attach_bottleneck(model: torch.nn.Module, streamer: CanvasWatchStreamer | None = None, *, k: int | None = None,
                      top_p: float | None = None, enforce: bool = False, signals: bool = True) -> BottleneckHook:
    """Compute the top-k on the model's device (and with enforce=True, run the model through it).

    With a streamer and signals=True (the default), every step also carries the sampler's
    accepted mask, entropy, argmax and sampled canvases and temperature (see the module docstring).
    """
    k = k if k is not None else (streamer.k if streamer is not None else 8)
    top_p = top_p if top_p is not None else (streamer.top_p if streamer is not None else None)
    return BottleneckHook(model, streamer, k=k, top_p=top_p, enforce=enforce, signals=signals)


def sampling_temperature(logits_processor, cur_step: int | torch.Tensor | None) -> float | None:
    """The temperature generate()'s logits processors divide the logits by at step `cur_step`, or None if unknown.

    `cur_step` counts the denoising steps remaining (N at the first step, 1 at the last), as
    transformers' LinearTemperatureScheduleLogitsProcessor reads it: t = t_min + (t_max - t_min) * n / N.
    A processor with a plain numeric `temperature` (TemperatureLogitsWarper) multiplies in; with
    no temperature processor the sampler draws from softmax(logits) itself, temperature 1.
    """
    if cur_step is None:
        return None
    remaining = int(cur_step)  # a Python int in generate(); never a device tensor here
    temperature = 1.0
    for processor in logits_processor or ():
        if all(hasattr(processor, name) for name in ("t_min", "t_max", "max_denoising_steps")):
            temperature *= processor.t_min + (processor.t_max - processor.t_min) * (
                remaining / processor.max_denoising_steps)
        elif isinstance(getattr(processor, "temperature", None), (int, float)):
            temperature *= float(processor.temperature)
    return temperature if math.isfinite(temperature) and temperature > 0 else None


def _see_scored_logits(sampler, seen: list[torch.Tensor]):
    """Wrap `sampler.accept_canvas` for one step so the entropy of the logits it scores is appended to `seen`.

    Returns the function that restores the sampler (None if it has no accept_canvas). generate()
    may have put a compiled accept_canvas on the instance; the wrapper calls whichever is there.
    """
    accept = getattr(sampler, "accept_canvas", None)
    if accept is None:
        return None
    own = "accept_canvas" in vars(sampler)

    def scoring(*args, **kwargs):
        # accept_canvas(current_canvas, denoiser_canvas, logits, cur_step); a sampler of another signature
        # (or a failure here) leaves `seen` empty, and the entropy comes from the returned logits instead
        try:
            scored = kwargs["logits"] if "logits" in kwargs else args[2]
            seen.append(entropy(scored))
        except Exception:  # noqa: BLE001 - the sampler's own call below must run whatever happens here
            pass
        return accept(*args, **kwargs)

    sampler.accept_canvas = scoring

    def undo() -> None:
        if own:
            sampler.accept_canvas = accept
        else:
            del sampler.accept_canvas

    return undo
