"""Hold mode in the vLLM plugin: a request's output reaches its caller only once its verdict is back.

    CANVASWATCH_VLLM_TARGET=127.0.0.1:50051 CANVASWATCH_VLLM_GATE=hold CANVASWATCH_VLLM_GATE_BUDGET_S=2 vllm serve ...

Where it holds, and why there (vLLM 0.33.0, read from its code): not in the worker or the engine
core, where the canvas is emitted in an engine step shared by the whole batch (waiting there stalls
every request), and where the verdict cannot exist yet (it comes after the stream's final message,
which the worker sends when it removes the finished request, one engine step later). It holds in
vLLM's *frontend*: the process running `LLM` / `LLMEngine` or `AsyncLLM` (the API server), whose
`OutputProcessor.process_outputs` turns the engine core's `EngineCoreOutput`s into the caller's
`RequestOutput`s. The engine core runs on; only the caller's copy waits.

1. `OutputProcessor.add_request` is wrapped: each request (each child of an n > 1 request) joins the
   hold group of what its caller reads: the `RequestOutputCollector` (AsyncLLM; the plugin hands
   the OutputProcessor a stand-in whose `put` holds) or the external request id (LLMEngine).
2. Every output of a held request is kept (merged the way RequestOutputCollector merges deltas), so
   nothing of it, streamed blocks included, reaches the caller early. When the group's finished
   output arrives, the plugin asks the sidecar for each of its requests' verdicts (GetVerdict, wire
   v1.2, non-blocking: a gRPC future whose callback runs on gRPC's thread), waiting up to
   `gate_budget_s` from that moment.
3. The verdicts decide (client/gate.py's `Gate.decide`, `GatePolicy(block_at=gate_block_at)`):
   released as it was; or, on a flag at or above `gate_block_at`, replaced by a finished output with
   no text and no tokens, `finish_reason = "abort"` and `stop_reason = "canvaswatch gate: withheld
   (lexicon CRITICAL)"`; without a verdict in the budget (sidecar slow or down), released
   (`gate_on_timeout = "open"`, counted, logged) or withheld (`"closed"`, same replacement, the
   stop_reason says why). AsyncLLM gets the release on its event loop (`call_soon_threadsafe`);
   LLMEngine returns it from a later `step()`.

Nothing here waits on the engine's path: the engine core (another process in vLLM v1) never sees
the hold, the event loop never blocks on a verdict, and `LLMEngine.step()` waits (at most 50 ms a
call) only when every request left is held, so no engine step is due.

The hold applies only to an engine serving DiffusionGemma (its worker streams the steps; any other
model would have no verdict to wait for).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import grpc

from canvaswatch.client.gate import Gate, GatePolicy
from canvaswatch.client.stream import channel_options, close_channel
from canvaswatch.client.vllm_config import PluginConfig
from canvaswatch.v1 import monitor_pb2 as pb
from canvaswatch.v1 import monitor_pb2_grpc as pb_grpc

log = logging.getLogger("canvaswatch.vllm")

OUTPUT_PROCESSOR_MODULE = "vllm.v1.engine.output_processor"
SCHEDULER_MODULE = "vllm.v1.core.sched.scheduler"
STREAMS_KEY = "canvaswatch_streams"  # in a finished EngineCoreOutput's kv_transfer_params: the request's stream count
LLM_ENGINE_MODULE = "vllm.v1.engine.llm_engine"
ASYNC_LLM_MODULE = "vllm.v1.engine.async_llm"
ARCHITECTURE = "DiffusionGemma"  # vLLM's DiffusionGemmaForBlockDiffusion
HOLD_ATTR = "_canvaswatch_hold"  # on an OutputProcessor: its Hold
RPC_MARGIN_S = 0.25  # the GetVerdict call's deadline beyond wait_s: the sidecar answers "not found" before it
IDLE_WAIT_S = 0.05   # LLMEngine.step() with only held requests left: the longest one call waits for a release


class VerdictSource(Protocol):
    def ask(self, request_id: str, wait_s: float, done: Callable[[pb.Verdict | None, str], None]) -> None:
        """Ask for `request_id`'s verdict, waiting at most `wait_s`; call done(verdict or None, why) once, on any thread."""


class SidecarVerdicts:
    """GetVerdict on the sidecar: one channel, non-blocking calls (gRPC futures, callbacks on gRPC's thread)."""

    def __init__(self, config: PluginConfig, channel: grpc.Channel | None = None) -> None:
        self._channel = channel or grpc.insecure_channel(config.target, options=channel_options())
        self._stub = pb_grpc.CanvasMonitorStub(self._channel)
        self._metadata = config.metadata()

    def ask(self, request_id: str, wait_s: float, done: Callable[[pb.Verdict | None, str], None]) -> None:
        call = self._stub.GetVerdict.future(pb.VerdictRequest(request_id=request_id, wait_s=wait_s),
                                            timeout=wait_s + RPC_MARGIN_S, metadata=self._metadata)

        def answered(future: grpc.Future) -> None:
            try:
                reply = future.result()
            except grpc.RpcError as err:
                done(None, f"{err.code().name}: {err.details()}")
                return
            except Exception as err:  # cancelled at shutdown
                done(None, f"{type(err).__name__}: {err}")
                return
            done(reply.verdict if reply.found else None, "" if reply.found else f"no verdict within {wait_s:g} s")

        call.add_done_callback(answered)

    def close(self) -> None:
        close_channel(self._channel)


@dataclass
class _Group:
    """What one caller reads: its requests (n > 1: the children), the output withheld so far, where it goes."""

    key: Any
    release: Callable[[Any], None]
    aggregate: bool  # DELTA outputs: merge held deltas; else the newest output replaces the older one
    req_ids: list[str] = field(default_factory=list)
    output: Any = None
    finished_at: float = 0.0
    asks: list[str] = field(default_factory=list)  # the stream ids asked for: <id>, and <id>#2... after preemptions
    answers: dict[str, tuple[pb.Verdict | None, str]] = field(default_factory=dict)


class Hold:
    """The frontend's hold: withholds each group's outputs, asks for verdicts, releases or replaces."""

    def __init__(self, config: PluginConfig, verdicts: VerdictSource, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget_s = config.gate_budget_s
        self.gate = Gate(GatePolicy(abort_at=None, block_at=config.gate_block_at.lower(), hold=True,
                                    budget_s=config.gate_budget_s, on_timeout=config.gate_on_timeout))
        self.verdicts = verdicts
        self.clock = clock
        self.counters: collections.Counter[str] = collections.Counter()
        self.latencies: collections.deque[float] = collections.deque(maxlen=100_000)  # finished -> released, s
        self._groups: dict[Any, _Group] = {}
        self._by_req: dict[str, _Group] = {}
        self._lock = threading.Lock()
        self.ready: collections.deque = collections.deque()  # LLMEngine's released outputs, for its next step()
        self.streams: dict[str, int] = {}  # request id -> its stream count, when vLLM preempted it (STREAMS_KEY)
        self._ready_event = threading.Event()

    # -- what the OutputProcessor wrappers call (the frontend's thread / event loop) -----------------

    def register(self, key: Any, req_id: str, release: Callable[[Any], None], aggregate: bool) -> None:
        with self._lock:
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = _Group(key, release, aggregate)
            if req_id not in group.req_ids:
                group.req_ids.append(req_id)
            self._by_req[req_id] = group

    def holds(self, key: Any) -> bool:
        return key in self._groups

    @property
    def pending(self) -> int:
        return len(self._groups)

    def put(self, key: Any, output: Any) -> None:
        """One output for the group's caller: withheld; the finished one starts the verdict requests."""
        group = self._groups.get(key)
        if group is None:  # not held (registered before the hold, or already released)
            return
        if isinstance(output, BaseException):
            # an error ends the request without content: it goes through, and the group is dropped
            self._drop(group)
            group.release(output)
            return
        if group.output is None:
            group.output = output
        else:
            group.output.add(output, aggregate=group.aggregate)
        if not output.finished:
            return
        group.finished_at = self.clock()
        self.counters["held"] += 1
        if not any(completion.token_ids for completion in getattr(group.output, "outputs", ())):
            for req_id in group.req_ids:  # its preemption counts go with it
                self.streams.pop(req_id, None)
            self._finish(group, "released_empty", [], "")  # nothing was generated: nothing to judge
            return
        # the worker streams a request preempted and resumed n - 1 times as <id>, <id>#2, ..., <id>#n
        group.asks = [stream for req_id in group.req_ids
                      for stream in [req_id] + [f"{req_id}#{n}" for n in range(2, self.streams.pop(req_id, 1) + 1)]]
        for stream_id in list(group.asks):
            answer = functools.partial(self._answered, group, stream_id)
            try:
                self.verdicts.ask(stream_id, self.budget_s, answer)
            except Exception as err:  # the channel itself failed: no verdict, as if the sidecar were down
                answer(None, f"{type(err).__name__}: {err}")

    def forget(self, req_ids: list[str]) -> None:
        """LLMEngine.abort_request: the caller gets no output for an aborted request; drop what was held."""
        with self._lock:
            for req_id in req_ids:
                group = self._by_req.pop(req_id, None)
                if group is not None and group.finished_at == 0.0:
                    group.req_ids = [r for r in group.req_ids if r != req_id]
                    if not group.req_ids:
                        self._groups.pop(group.key, None)

    def ready_append(self, output: Any) -> None:
        """LLMEngine's release: queued for its next step() (any thread)."""
        self.ready.append(output)
        self._ready_event.set()

    def take_ready(self) -> list[Any]:
        out = []
        while self.ready:
            out.append(self.ready.popleft())
        if not self.ready:
            self._ready_event.clear()
        return out

    def wait_ready(self, timeout: float) -> None:
        self._ready_event.wait(timeout)

    # -- answers (gRPC's callback thread) -----------------------------------------------------------

    def _answered(self, group: _Group, req_id: str, verdict: pb.Verdict | None, why: str) -> None:
        with self._lock:
            group.answers[req_id] = (verdict, why)
            if len(group.answers) < len(group.asks) or group.key not in self._groups:
                return
        verdicts = [v for v, _ in group.answers.values() if v is not None]
        missing = [r for r, (v, _) in group.answers.items() if v is None]
        decision, flags = self.gate.decide(verdicts, missing)
        reasons = sorted({why for v, why in group.answers.values() if v is None})
        self._finish(group, decision, flags, "; ".join(reasons))

    def _finish(self, group: _Group, decision: str, flags: list[pb.Flag], why: str) -> None:
        output = group.output
        if decision.startswith("blocked"):
            if decision == "blocked_verdict":
                named = ", ".join(sorted({f"{f.monitor} {pb.Severity.Name(f.severity)}" for f in flags}))
                reason = f"canvaswatch gate: withheld ({named})"
            else:
                reason = f"canvaswatch gate: withheld, no verdict within {self.budget_s:g} s (fail-closed; {why})"
            output = withheld(output, reason)
            log.warning("canvaswatch gate withheld vLLM output request_ids=%s reason=%r", ",".join(group.req_ids), reason)
        elif decision == "released_on_timeout":
            log.warning("canvaswatch gate released vLLM output without a verdict request_ids=%s after=%.3fs why=%s",
                        ",".join(group.req_ids), self.clock() - group.finished_at, why)
        self.counters[decision] += 1
        self._drop(group)
        self.latencies.append(self.clock() - group.finished_at)
        group.release(output)

    def _drop(self, group: _Group) -> None:
        with self._lock:
            self._groups.pop(group.key, None)
            for req_id in group.req_ids:
                if self._by_req.get(req_id) is group:
                    del self._by_req[req_id]


def withheld(output: Any, reason: str) -> Any:
    """The caller's replacement for a withheld RequestOutput: finished, no text, no tokens, and why."""
    for completion in output.outputs:
        completion.text = ""
        completion.token_ids = []
        completion.logprobs = None
        completion.cumulative_logprob = None
        completion.finish_reason = "abort"
        completion.stop_reason = reason
    output.finished = True
    return output


class _HeldCollector:
    """Stands in for AsyncLLM's RequestOutputCollector inside the OutputProcessor: `put` goes to the hold.

    generate() keeps reading the real collector, which receives the output once the hold releases it.
    """

    def __init__(self, hold: Hold, queue: Any) -> None:
        self._hold, self._queue = hold, queue

    def put(self, output: Any) -> None:
        if self._hold.holds(id(self._queue)):
            self._hold.put(id(self._queue), output)
        else:
            self._queue.put(output)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)


# ---- vLLM's side: the OutputProcessor and the engines that own one ----------------------------------

def attach(output_processor: Any, hold: Hold) -> None:
    setattr(output_processor, HOLD_ATTR, hold)


def hold_of(output_processor: Any) -> Hold | None:
    return getattr(output_processor, HOLD_ATTR, None)


def _wrap(cls: Any, method: str, wrap: Callable[[Any], Any]) -> None:
    original = getattr(cls, method, None)
    if original is None:  # another vLLM's shape: vLLM must still start; this hook is missing, said loudly
        log.error("canvaswatch gate hold: vLLM's %s has no %s; that hook is not installed", cls.__name__, method)
        return
    setattr(cls, method, wrap(original))


def patch_output_processor(module: Any) -> None:
    """Wrap OutputProcessor's add_request, process_outputs, abort_requests and has_unfinished_requests;
    each acts only on an OutputProcessor with a Hold attached (an engine serving DiffusionGemma)."""
    cls = getattr(module, "OutputProcessor", None)
    if cls is None or not hasattr(module, "RequestOutputCollector"):
        log.error("canvaswatch gate hold disabled: vLLM's %s has no OutputProcessor", OUTPUT_PROCESSOR_MODULE)
        return
    if getattr(cls, "_canvaswatch_hold_patched", False):
        return
    delta = _delta_kind()

    def add_request(original: Any) -> Any:
        def wrapped(self: Any, request: Any, prompt: Any, parent_req: Any = None, request_index: int = 0,
                    queue: Any = None) -> None:
            hold = hold_of(self)
            if hold is None or isinstance(queue, _HeldCollector):
                return original(self, request, prompt, parent_req, request_index, queue)
            params = getattr(request, "sampling_params", None)
            aggregate = params is not None and params.output_kind == delta
            if queue is not None:
                release = _on_loop(queue.put)
                hold.register(id(queue), request.request_id, release, aggregate)
                return original(self, request, prompt, parent_req, request_index, _HeldCollector(hold, queue))
            original(self, request, prompt, parent_req, request_index, queue)
            state = self.request_states.get(request.request_id)
            key = parent_req.external_req_id if parent_req is not None else getattr(state, "external_req_id",
                                                                                    request.request_id)
            hold.register(("llm", key), request.request_id, hold.ready_append, aggregate)
        return wrapped

    def process_outputs(original: Any) -> Any:
        def wrapped(self: Any, engine_core_outputs: Any, *args: Any, **kwargs: Any) -> Any:
            hold = hold_of(self)
            if hold is not None:
                take_stream_counts(engine_core_outputs, hold.streams)
            result = original(self, engine_core_outputs, *args, **kwargs)
            if hold is None or not (result.request_outputs or hold.ready):
                return result
            kept = []
            for output in result.request_outputs:  # LLMEngine only: AsyncLLM's outputs went to their queues
                key = ("llm", output.request_id)
                if hold.holds(key):
                    hold.put(key, output)
                else:
                    kept.append(output)
            result.request_outputs = kept + hold.take_ready()
            return result
        return wrapped

    def abort_requests(original: Any) -> Any:
        def wrapped(self: Any, request_ids: Any, internal: bool) -> list[str]:
            aborted = original(self, request_ids, internal)
            hold = hold_of(self)
            if hold is not None and aborted:
                hold.forget(list(aborted))
            return aborted
        return wrapped

    def has_unfinished_requests(original: Any) -> Any:
        def wrapped(self: Any) -> bool:
            hold = hold_of(self)
            # a held request is unfinished for its caller: LLM.generate() keeps stepping until it is released
            return original(self) or (hold is not None and hold.pending > 0)
        return wrapped

    for method, wrap in (("add_request", add_request), ("process_outputs", process_outputs),
                         ("abort_requests", abort_requests), ("has_unfinished_requests", has_unfinished_requests)):
        _wrap(cls, method, wrap)
    cls._canvaswatch_hold_patched = True


def take_stream_counts(engine_core_outputs: Any, into: dict[str, int]) -> None:
    """Frontend: move STREAMS_KEY out of the outputs' kv_transfer_params (the caller never sees it) into `into`."""
    for output in engine_core_outputs:
        params = output.kv_transfer_params
        if params and STREAMS_KEY in params:
            into[output.request_id] = int(params[STREAMS_KEY])
            rest = {key: value for key, value in params.items() if key != STREAMS_KEY}
            output.kv_transfer_params = rest or None


def patch_scheduler(module: Any) -> None:
    """Engine core: tell the frontend how many streams a preempted request had, on its finished output.

    The worker streams a request preempted and resumed as <id>, then <id>#2, ...; only the scheduler knows
    that it was preempted (`Request.num_preemptions`), so `_free_request` (every finished request passes
    there) notes the count and `update_from_output` puts it in the finished `EngineCoreOutput`'s
    `kv_transfer_params` (a dict vLLM carries to the frontend process), which the frontend takes out again.
    Requests never preempted (nearly all) cost one attribute read each when they finish.
    """
    cls = getattr(module, "Scheduler", None)
    if cls is None or not hasattr(cls, "_free_request"):
        log.error("canvaswatch gate hold: vLLM's %s has no Scheduler._free_request; preempted requests are held on "
                  "the verdict of their first stream only", SCHEDULER_MODULE)
        return
    if getattr(cls, "_canvaswatch_hold_patched", False):
        return

    def free_request(original: Any) -> Any:
        def wrapped(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            preemptions = getattr(request, "num_preemptions", 0)
            if preemptions:
                self.__dict__.setdefault("_canvaswatch_streams", {})[request.request_id] = preemptions + 1
            return original(self, request, *args, **kwargs)
        return wrapped

    def update_from_output(original: Any) -> Any:
        def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
            outputs = original(self, *args, **kwargs)
            streams = self.__dict__.get("_canvaswatch_streams")
            if streams:
                tag_stream_counts(outputs, streams)
                streams.clear()  # what is left finished outside this step's outputs (an abort): no caller to tell
            return outputs
        return wrapped

    _wrap(cls, "_free_request", free_request)
    _wrap(cls, "update_from_output", update_from_output)
    cls._canvaswatch_hold_patched = True


def tag_stream_counts(outputs: dict[int, Any], streams: dict[str, int]) -> None:
    """Engine core: STREAMS_KEY into the kv_transfer_params of each finished output whose request was preempted."""
    for engine_core_outputs in outputs.values():
        for output in engine_core_outputs.outputs:
            count = streams.get(output.request_id)
            if count is not None and output.finish_reason is not None:
                output.kv_transfer_params = {**(output.kv_transfer_params or {}), STREAMS_KEY: count}


def _delta_kind() -> Any:
    from vllm.sampling_params import RequestOutputKind

    return RequestOutputKind.DELTA


def _on_loop(put: Callable[[Any], None]) -> Callable[[Any], None]:
    """A release for AsyncLLM: RequestOutputCollector is the event loop's (asyncio.Event), so hop onto it."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no loop (a test driving the OutputProcessor by hand): put directly
        return put
    return functools.partial(loop.call_soon_threadsafe, put)


def patch_engine(module: Any, class_name: str, config_of: Callable[[], PluginConfig],
                 verdicts: Callable[[PluginConfig], VerdictSource]) -> None:
    """Wrap LLMEngine or AsyncLLM's __init__: attach a Hold to its OutputProcessor when it serves DiffusionGemma.
    For LLMEngine also wrap step(): with only held requests left, wait briefly for a release instead of
    asking an engine core that has nothing to run."""
    cls = getattr(module, class_name, None)
    if cls is None:
        log.error("canvaswatch gate hold disabled: vLLM's %s has no %s", module.__name__, class_name)
        return
    if getattr(cls, "_canvaswatch_hold_patched", False):
        return

    def init(original: Any) -> Any:
        def wrapped(self: Any, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
            original(self, vllm_config, *args, **kwargs)
            architectures = list(getattr(getattr(vllm_config, "model_config", None), "architectures", None) or ())
            if not any(ARCHITECTURE in name for name in architectures):
                log.info("canvaswatch gate hold not applied: the model (%s) is not DiffusionGemma", architectures)
                return
            config = config_of()
            attach(self.output_processor, Hold(config, verdicts(config)))
            log.info("canvaswatch gate hold on: %s releases DiffusionGemma output after its verdict (budget %.3g s, "
                     "block_at %s, on_timeout %s)", class_name, config.gate_budget_s, config.gate_block_at,
                     config.gate_on_timeout)
        return wrapped

    _wrap(cls, "__init__", init)
    if class_name == "LLMEngine":
        _wrap(cls, "step", _idle_step)
    cls._canvaswatch_hold_patched = True


def _idle_step(original: Any) -> Any:
    def step(self: Any) -> list[Any]:
        hold = hold_of(self.output_processor)
        if hold is None or self.output_processor.request_states or not hold.pending:
            return original(self)
        # Only held requests are left. An in-process engine core still needs its step (the worker removes
        # the finished requests there and so sends their final messages); a multiprocess one runs on its
        # own, and get_output() would block with nothing to return.
        outputs = original(self) if type(self.engine_core).__name__ == "InprocClient" else []
        if not hold.ready:
            hold.wait_ready(IDLE_WAIT_S)
        return outputs + hold.take_ready()
    return step


__all__ = ["Hold", "SidecarVerdicts", "VerdictSource", "attach", "hold_of", "patch_engine", "patch_output_processor",
           "patch_scheduler", "tag_stream_counts", "take_stream_counts", "withheld"]
