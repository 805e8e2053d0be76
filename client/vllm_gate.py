"""Gate mode in the vLLM plugin: a severe flag mid-denoising ends the vLLM request it belongs to.

    CANVASWATCH_VLLM_TARGET=127.0.0.1:50051 CANVASWATCH_VLLM_GATE=abort vllm serve ...

The decision is client/gate.py's (one `Gate` per request, `GatePolicy(abort_at=gate_severity)`); this
module carries it through vLLM 0.33.0, which has no way for a sampler or a model state to end a
request by itself (read from its code):

1. Worker, receiver thread: a flag at or above `gate_severity` trips the request's Gate
   (`RequestGates.on_event`): one dict entry under a lock, nothing else.
2. Worker, engine thread, the next engine step: `WatchingSampler` lets vLLM's DiffusionSampler run
   (the step's forward is already done and the batch's tensors are shared), then overwrites the
   tripped rows of the SamplerOutput: `num_sampled = 0` (a commit step emits no canvas: nothing of
   this step reaches the caller) and `num_rejected = query length` (the scheduler and the runner
   book it like a denoising step). Small device writes, no host sync.
3. Worker, the same step: the model runner's `sample_tokens` is wrapped to attach the tripped
   requests (`{req_id: reason}`) to the step's `ModelRunnerOutput` as attribute
   `canvaswatch_gate` (a plain dataclass: the attribute survives the executor's pickling between
   processes, and is the same object in-process).
4. Engine core, the same step: `Scheduler.update_from_output` is wrapped: after vLLM's own update,
   each request named in `canvaswatch_gate` is finished with `RequestStatus.FINISHED_ABORTED` (the
   path the frontend's own aborts take: blocks freed, the worker told to remove it) and an
   `EngineCoreOutput` with `finish_reason=ABORT` and `stop_reason="canvaswatch gate: ..."` is
   returned for it, so the caller's `CompletionOutput` reads `finish_reason="abort"` and a
   `stop_reason` naming the monitor(s) and severity.

So the first engine step that *starts* after the flag arrived emits nothing for that request, and
the scheduler schedules no further step for it. With async scheduling, one more step may already be
in flight when the scheduler finishes it; that step's output is suppressed too and vLLM discards it
(the request is finished). Under tensor parallelism only rank 0 suppresses; the scheduler reads
rank 0's output only, and every rank removes the request at the next step.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Sequence

import torch

from canvaswatch.client.gate import Gate, GatePolicy, GenerationBlocked
from canvaswatch.v1 import monitor_pb2 as pb

log = logging.getLogger("canvaswatch.vllm")

OUTPUT_ATTR = "canvaswatch_gate"  # on ModelRunnerOutput: {vLLM request id: reason}
SCHEDULER_MODULE = "vllm.v1.core.sched.scheduler"
RUNNER_MODULE = "vllm.v1.worker.gpu.model_runner"


def policy_for(severity: str) -> GatePolicy:
    """The plugin's gate_severity as client/gate.py's policy: abort only (vLLM has no hold, docs/serving.md)."""
    return GatePolicy(abort_at=severity.lower(), block_at=None, hold=False)


class RequestGates:
    """One Gate per vLLM request; which requests are tripped, read by the engine thread once a step.

    Written by the streams' receiver threads (a flag) and the collector thread (a failed stream,
    fail-closed); read by the engine thread. `tripped` is a plain dict replaced, never mutated in
    place, so the engine thread reads it without the lock.
    """

    def __init__(self, policy: GatePolicy, fail_closed: bool) -> None:
        self.policy = policy
        self.fail_closed = fail_closed
        self.tripped: dict[str, str] = {}  # vLLM request id -> reason (the caller's stop_reason)
        self.trip_step: dict[str, int] = {}  # engine steps started when it tripped (steps_started)
        self.steps_started = 0  # engine steps whose sampler call has begun (engine thread)
        self.decisions: dict[str, int] = {"blocked_flag": 0, "blocked_unavailable": 0}
        self._gates: dict[str, Gate] = {}
        self._lock = threading.Lock()

    def open(self, req_id: str) -> Gate:
        gate = Gate(self.policy)
        with self._lock:
            self._gates[req_id] = gate
        return gate

    def on_event(self, req_id: str, event: pb.MonitorEvent) -> None:
        """A stream's receiver thread: feed the request's Gate; trip the request once it has tripped."""
        with self._lock:
            gate = self._gates.get(req_id)
        if gate is None or req_id in self.tripped:
            return
        gate.on_event(event)
        if not gate.tripped:
            return
        try:
            gate.check()  # client/gate.py's decision: raises GenerationBlocked with the flags that decided it
        except GenerationBlocked as blocked:
            self._trip(req_id, _reason(blocked.flags), "blocked_flag")

    def on_stream_failed(self, req_id: str, error: str) -> None:
        """The collector: the request's stream to the sidecar ended without a verdict (sidecar down)."""
        if self.fail_closed and req_id not in self.tripped:
            self._trip(req_id, f"canvaswatch gate: sidecar unavailable, fail-closed ({error})", "blocked_unavailable")

    def close(self, req_id: str) -> None:
        """remove_request (engine thread): the request is gone from vLLM."""
        with self._lock:
            self._gates.pop(req_id, None)
            if req_id in self.tripped:
                tripped = dict(self.tripped)
                del tripped[req_id]
                self.tripped = tripped
            self.trip_step.pop(req_id, None)

    def rows(self, req_ids: Sequence[str]) -> list[int]:
        """Engine thread, once a step: the batch rows of tripped requests (empty at once when none is)."""
        tripped = self.tripped
        if not tripped:
            return []
        return [row for row, req_id in enumerate(req_ids) if req_id in tripped]

    def _trip(self, req_id: str, reason: str, decision: str) -> None:
        with self._lock:
            if req_id in self.tripped or req_id not in self._gates:
                return
            self.tripped = {**self.tripped, req_id: reason}
            self.trip_step[req_id] = self.steps_started
            self.decisions[decision] += 1
        log.warning("canvaswatch gate ends vLLM request request_id=%s reason=%r at_engine_step=%d", req_id, reason,
                    self.steps_started)


def _reason(flags: Sequence[pb.Flag]) -> str:
    named = sorted({f"{flag.monitor} {pb.Severity.Name(flag.severity)}" for flag in flags})
    return "canvaswatch gate: " + ", ".join(named)


def suppress(output: Any, rows: list[int], input_batch: Any) -> None:
    """Overwrite a SamplerOutput's rows so they emit nothing and count as a denoising step (engine thread).

    `num_sampled = 0`: a commit step's canvas never reaches the scheduler. `num_rejected = query
    length`: what DiffusionSampler reports for a denoising step (_compute_num_rejected), so the
    runner's and the scheduler's token accounting stay consistent for the step vLLM still books.
    """
    num_sampled = output.num_sampled
    device = num_sampled.device
    index = torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True)
    num_sampled.index_fill_(0, index, 0)
    output.sampled_token_ids.index_fill_(0, index, 0)
    starts = input_batch.query_start_loc_np
    lengths = torch.tensor([int(starts[row + 1] - starts[row]) for row in rows], dtype=output.num_rejected.dtype)
    output.num_rejected.index_copy_(0, index, lengths.to(device, non_blocking=True))


# ---- vLLM's side: the model runner (worker) and the scheduler (engine core) ----------------------

def _wrap_once(module: Any, where: str, class_name: str, method: str, wrap: Callable[[Any], Any]) -> None:
    """Replace `class_name.method` in vLLM's module `where` by wrap(original), once per class
    (the plugin may be loaded again in the same process); a class vLLM no longer has disables the gate, loudly."""
    cls = getattr(module, class_name, None)
    if cls is None:
        log.error("canvaswatch gate disabled: vLLM's %s has no %s", where, class_name)
        return
    if getattr(cls, "_canvaswatch_gate", False):
        return
    original = getattr(cls, method, None)
    if original is None:
        log.error("canvaswatch gate disabled: vLLM's %s.%s has no %s", where, class_name, method)
        return
    setattr(cls, method, wrap(original))
    cls._canvaswatch_gate = True


def patch_runner(module: Any) -> None:
    """Wrap GPUModelRunner.sample_tokens: hand the step's tripped requests to the scheduler."""

    def wrap(original: Any) -> Any:
        def sample_tokens(self: Any, *args: Any, **kwargs: Any) -> Any:
            result = original(self, *args, **kwargs)
            watcher = getattr(getattr(self, "model_state", None), "_canvaswatch", None)
            if watcher is not None and result is not None:
                try:
                    hand_over(result, watcher)
                except Exception:  # the plugin's error never fails vLLM's step
                    watcher.fail("handing gated requests to the scheduler")
            return result
        return sample_tokens

    _wrap_once(module, RUNNER_MODULE, "GPUModelRunner", "sample_tokens", wrap)


def hand_over(result: Any, watcher: Any) -> None:
    """Attach the requests the watcher gated since the last step to the step's ModelRunnerOutput.

    `result`: what sample_tokens returned, an AsyncOutput (which keeps the ModelRunnerOutput it will
    return) or a ModelRunnerOutput. A plain attribute of a plain dataclass: it survives the executor's
    pickling between a worker process and the engine core, and is the same object in one process.
    """
    gated = watcher.take_gated()
    if gated:
        target = getattr(result, "model_runner_output", result)
        setattr(target, OUTPUT_ATTR, {**(gated_of(target) or {}), **gated})


def gated_of(model_runner_output: Any) -> dict[str, str] | None:
    """The engine core's side of hand_over: {request id: reason}, or None."""
    return getattr(model_runner_output, OUTPUT_ATTR, None)


def patch_scheduler(module: Any) -> None:
    """Wrap Scheduler.update_from_output (its subclasses call it): end the requests the worker gated."""

    def wrap(original: Any) -> Any:
        def update_from_output(self: Any, scheduler_output: Any, model_runner_output: Any) -> Any:
            outputs = original(self, scheduler_output, model_runner_output)
            gated = gated_of(model_runner_output)
            if gated:
                try:
                    finish_gated(self, gated, outputs)
                except Exception:  # the engine core keeps this step's outputs for every other request
                    log.exception("canvaswatch gate: could not end %s; they go on", ", ".join(sorted(gated)))
            return outputs
        return update_from_output

    _wrap_once(module, SCHEDULER_MODULE, "Scheduler", "update_from_output", wrap)


def finish_gated(scheduler: Any, gated: dict[str, str], outputs: dict[int, Any]) -> list[str]:
    """End each gated request as vLLM ends an aborted one, and tell its caller why. Returns the ids ended.

    A request already finished (it stopped at this very step, or the caller aborted it) is left alone.
    """
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
    from vllm.v1.request import RequestStatus

    ended = []
    for req_id, reason in gated.items():
        request = scheduler.requests.get(req_id)
        if request is None or request.is_finished():
            continue
        for finished in scheduler.finish_requests(req_id, RequestStatus.FINISHED_ABORTED):
            finished.stop_reason = reason
            output = EngineCoreOutput(request_id=finished.request_id, new_token_ids=[],
                                      finish_reason=finished.get_finished_reason(), stop_reason=reason,
                                      events=finished.take_events(), trace_headers=finished.trace_headers)
            if finished.client_index in outputs:
                outputs[finished.client_index].outputs.append(output)
            else:
                outputs[finished.client_index] = EngineCoreOutputs(outputs=[output])
            ended.append(finished.request_id)
            log.warning("canvaswatch gate aborted vLLM request request_id=%s reason=%r", finished.request_id, reason)
    return ended


__all__ = ["RequestGates", "finish_gated", "gated_of", "hand_over", "patch_runner", "patch_scheduler", "policy_for",
           "suppress"]
