"""The vLLM plugin: every denoising step of every DiffusionGemma request, streamed to the sidecar.

Install the client into vLLM's environment and name a sidecar; vLLM loads the
plugin from the `vllm.general_plugins` entry point in each of its processes:

    pip install canvaswatch                      # the light client: no change to vLLM's torch/transformers
    CANVASWATCH_VLLM_TARGET=127.0.0.1:50051 vllm serve google/diffusiongemma-26B-A4B-it

Settings: canvaswatch.client.vllm_config (environment variables or a TOML file).

How it attaches (vLLM 0.33.0, read from its code):
- vLLM serves DiffusionGemma with one denoising step per engine step for every running request
  (vllm/model_executor/models/diffusion_gemma.py). `DiffusionGemmaModelState.custom_sampler()`
  builds the `DiffusionSampler`; the plugin wraps what it returns (on tensor-parallel rank 0
  only: every rank samples the same full-vocabulary logits) and wraps the model state's
  `add_request` / `remove_request`, which the runner calls for new requests and for finished,
  aborted and preempted ones.
- The sampler keeps nothing per step that leaves the engine, so the plugin reads the values the
  sampler computes, per tile of requests, by wrapping three functions of that module:
  `sample_row_stats` (its CUDA kernel) / `sample_row_stats_reference` (the PyTorch form) give the
  tile's logits after softcap and the request's own top_k/top_p, and its temperatures;
  `_compiled_sample_step` gets the per-position entropy, the softmax the sampler uses for
  self-conditioning, and the state tensors it updates.
- Per tile, on the device and without waiting for it: the top-k (or top-p) of that softmax
  (the distribution the sampler draws from: softcap, request top_k/top_p, schedule temperature),
  the accepted mask (the entropy-bound rule re-applied to the sampler's own entropies, less pinned
  positions), the argmax and sampled canvases, and who was denoising or committing. They are
  copied to the host with non-blocking copies (pinned memory) and a CUDA event; the engine thread
  only queues the step. A collector thread waits for the event, splits the tile per request and
  feeds one `WatchStream` per vLLM request id (bounded queues, drop policy, counted drops).
- A commit step emits a block's canvas: it is appended to the request's output and the next
  denoising steps belong to the next block. `remove_request` (end, abort, preemption) sends the
  final message with every committed canvas; a request preempted and resumed streams again
  under "<id>#2". Verdicts are logged (logger "canvaswatch.vllm") and kept in `Watcher.verdicts`.
- Gate mode (`gate = "abort"`): a flag at or above `gate_severity` ends its request at the next engine
  step, with finish_reason "abort" and a stop_reason naming the flags (canvaswatch.client.vllm_gate).
  `gate = "hold"`: vLLM's frontend withholds each request's output until its verdict, within
  `gate_budget_s` (canvaswatch.client.vllm_hold); the worker streams as without a gate.

Nothing here imports vLLM at module import time: `import canvaswatch.client.vllm` works with the
light client alone, and vLLM is imported when the plugin attaches.
"""

from __future__ import annotations

import atexit
import collections
import functools
import importlib.abc
import importlib.util
import inspect
import logging
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import grpc
import torch

from canvaswatch.client.sampler_signals import SamplerSignals
from canvaswatch.client.stream import WatchStream, channel_options, close_channel
from canvaswatch.client.token_bottleneck import from_candidates
from canvaswatch.client.vllm_gate import (RUNNER_MODULE, SCHEDULER_MODULE, RequestGates, patch_runner, patch_scheduler,
                                          policy_for, suppress)
from canvaswatch.client.vllm_config import PluginConfig, load_config
from canvaswatch.client.vllm_hold import (ASYNC_LLM_MODULE, LLM_ENGINE_MODULE, OUTPUT_PROCESSOR_MODULE, SidecarVerdicts,
                                          patch_engine, patch_output_processor)
from canvaswatch.client.vllm_hold import patch_scheduler as patch_hold_scheduler
from canvaswatch.v1 import monitor_pb2 as pb

log = logging.getLogger("canvaswatch.vllm")

MODEL_MODULE = "vllm.model_executor.models.diffusion_gemma"
SUPPORTED_VLLM = ("0.33.",)
_TINY = torch.finfo(torch.float32).tiny

_local = threading.local()  # .watcher / .tiles / .stats while a WatchingSampler call runs on this thread
SEEN_IDS = 65_536  # request ids remembered for preemption stream ids (<id>#2, ...); the oldest are forgotten
MAX_CONSECUTIVE_ERRORS = 100  # plugin errors in a row (no step recorded between) before it switches itself off
COMMITS_PER_STEP_SLOT = 4  # commit-only records of dropped steps kept, per step the queue holds
_installed: dict[str, Any] = {}
_install_lock = threading.Lock()


# ---- the entry point ----------------------------------------------------------------------------

def register() -> None:
    """vLLM's `vllm.general_plugins` entry point: runs in every vLLM process, possibly more than once."""
    try:
        config = load_config()
    except ValueError as err:
        # A wrong setting must be seen at start-up, not silently ignored: load_general_plugins() does
        # not catch what a plugin raises, so vLLM stops with this message, which names the key.
        log.error("canvaswatch plugin: %s", err)
        raise
    if not config.enabled:
        log.debug("canvaswatch plugin: CANVASWATCH_VLLM_TARGET not set, not attaching")
        return
    install(config)


def install(config: PluginConfig) -> None:
    """Patch DiffusionGemma's model state and sampler functions when its module is (or gets) imported."""
    with _install_lock:
        _installed["config"] = config
        if _installed.get("hooked"):
            return
        _installed["hooked"] = True
    hooks = [(MODEL_MODULE, _patch)]
    if config.gate == "abort":
        # the worker hands gated requests to the scheduler, which ends them (canvaswatch.client.vllm_gate)
        hooks += [(RUNNER_MODULE, patch_runner), (SCHEDULER_MODULE, patch_scheduler)]
    elif config.gate == "hold":
        # the frontend withholds each request's output until its verdict (canvaswatch.client.vllm_hold)
        config_of = functools.partial(_installed.__getitem__, "config")
        hooks += [(OUTPUT_PROCESSOR_MODULE, patch_output_processor), (SCHEDULER_MODULE, patch_hold_scheduler),
                  (LLM_ENGINE_MODULE, functools.partial(patch_engine, class_name="LLMEngine", config_of=config_of,
                                                        verdicts=SidecarVerdicts)),
                  (ASYNC_LLM_MODULE, functools.partial(patch_engine, class_name="AsyncLLM", config_of=config_of,
                                                       verdicts=SidecarVerdicts))]
    for name, patch in hooks:
        if name in sys.modules:
            patch(sys.modules[name])
        else:
            # Importing the model module costs seconds (and GPU-side imports) in processes that never
            # run the model, such as vLLM's API server: patch each module when a process imports it.
            sys.meta_path.insert(0, _PatchOnImport(name, patch))


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, patch: Callable[[Any], None]) -> None:
        self.name, self.patch = name, patch

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module: Any) -> None:
            original_exec(module)
            try:
                self.patch(module)
            except Exception:  # another vLLM's shape: vLLM must still start, without the plugin's hook
                log.exception("canvaswatch plugin: could not patch %s; serving without this hook", fullname)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _patch(module: Any) -> None:
    if getattr(module, "_canvaswatch_patched", False):
        return
    import vllm

    version = getattr(vllm, "__version__", "?")
    if not version.startswith(SUPPORTED_VLLM):
        log.warning("canvaswatch plugin: written against vLLM %s, running on %s; checking the hooks it needs",
                    "/".join(v + "x" for v in SUPPORTED_VLLM), version)
    needed = ("DiffusionGemmaModelState", "DiffusionSampler", "_compiled_sample_step", "sample_row_stats",
              "sample_row_stats_reference")
    missing = [name for name in needed if not hasattr(module, name)]
    if missing:
        log.error("canvaswatch plugin disabled: vLLM %s's %s lacks %s", version, MODEL_MODULE, ", ".join(missing))
        return
    state_cls = module.DiffusionGemmaModelState
    original_custom_sampler = state_cls.custom_sampler
    original_add, original_remove = state_cls.add_request, state_cls.remove_request

    def custom_sampler(self: Any, sampler: Any) -> Any:
        result = original_custom_sampler(self, sampler)
        try:
            if result is not None and _is_rank_zero():
                watcher = Watcher(_installed["config"], self, result[0], vllm_version=version)
                self._canvaswatch = watcher
                result = (WatchingSampler(result[0], watcher), result[1])
        except Exception:
            log.exception("canvaswatch plugin: could not attach to the sampler; serving without it")
        return result

    def add_request(self: Any, req_index: int, new_req_data: Any) -> None:
        original_add(self, req_index, new_req_data)
        watcher = getattr(self, "_canvaswatch", None)
        if watcher is not None:
            try:
                watcher.on_add(req_index, new_req_data)
            except Exception:  # the plugin's error never fails vLLM's request
                watcher.fail("adding a request")

    def remove_request(self: Any, req_id: str) -> None:
        watcher = getattr(self, "_canvaswatch", None)
        if watcher is not None:
            try:
                watcher.on_remove(req_id)
            except Exception:  # ... nor skips vLLM's own clean-up below
                watcher.fail("removing a request")
        original_remove(self, req_id)

    state_cls.custom_sampler, state_cls.add_request, state_cls.remove_request = custom_sampler, add_request, remove_request

    # The sampler calls these through the module's globals, once per tile of requests.
    step_fn, stats_fn, stats_ref_fn = (module._compiled_sample_step, module.sample_row_stats,
                                       module.sample_row_stats_reference)
    step_signature = inspect.signature(step_fn)

    def sample_row_stats(logits: torch.Tensor, temps: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        _stash_stats(logits, temps)
        return stats_fn(logits, temps, *args, **kwargs)

    def sample_row_stats_reference(logits: torch.Tensor, temps: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        _stash_stats(logits, temps)
        return stats_ref_fn(logits, temps, *args, **kwargs)

    def compiled_sample_step(*args: Any, **kwargs: Any) -> None:
        watcher = getattr(_local, "watcher", None)
        if watcher is None or not watcher.enabled:
            return step_fn(*args, **kwargs)
        bound = before = None
        started = time.perf_counter()
        try:
            bound = step_signature.bind(*args, **kwargs).arguments
            before = watcher.before_tile(bound)
        except Exception:
            watcher.fail("before a sampler tile")
        middle = time.perf_counter()
        step_fn(*args, **kwargs)
        resumed = time.perf_counter()
        if before is not None:
            try:
                watcher.after_tile(bound, before, getattr(_local, "stats", None))
                watcher.consecutive_errors = 0
            except Exception:
                watcher.fail("after a sampler tile")
        # what the plugin adds to the engine thread (on a GPU: kernel launches and copies queued, not run)
        watcher.engine_seconds += (middle - started) + (time.perf_counter() - resumed)

    module.sample_row_stats, module.sample_row_stats_reference = sample_row_stats, sample_row_stats_reference
    module._compiled_sample_step = compiled_sample_step
    module._canvaswatch_patched = True
    log.info("canvaswatch plugin attached to vLLM %s DiffusionGemma (sidecar %s)", version, _installed["config"].target)


def _stash_stats(logits: torch.Tensor, temps: torch.Tensor) -> None:
    if getattr(_local, "watcher", None) is not None:
        _local.stats = (logits, temps)


def _is_rank_zero() -> bool:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0
    except (AssertionError, ImportError, RuntimeError):  # no model-parallel group: one process
        return True


# ---- the sampler wrapper (engine thread) --------------------------------------------------------

class WatchingSampler:
    """Wraps vLLM's DiffusionSampler: same calls, same results; one step record queued per engine step."""

    def __init__(self, inner: Any, watcher: "Watcher") -> None:
        self._inner = inner
        self._watcher = watcher

    def __call__(self, logits: torch.Tensor, input_batch: Any, *args: Any, **kwargs: Any) -> Any:
        watcher = self._watcher
        if input_batch.num_draft_tokens == 0:
            return self._inner(logits, input_batch, *args, **kwargs)  # prefill: nothing denoised
        gated: list[int] = []
        try:
            gated = watcher.gated_rows(input_batch)  # gate mode: requests a severe flag has ended (usually none)
        except Exception:
            watcher.fail("reading the gate")
        if not watcher.enabled:  # switched off after errors: gated requests (fail-closed) still end
            output = self._inner(logits, input_batch, *args, **kwargs)
            self._suppress(output, gated, input_batch)
            return output
        _local.watcher, _local.tiles, _local.stats = watcher, [], None
        try:
            output = self._inner(logits, input_batch, *args, **kwargs)
        finally:
            tiles = _local.tiles
            _local.watcher, _local.tiles, _local.stats = None, None, None
        self._suppress(output, gated, input_batch)
        if tiles:
            started = time.perf_counter()
            try:
                watcher.submit(tiles, input_batch)
            except Exception:
                watcher.fail("queueing a step")
            watcher.engine_seconds += time.perf_counter() - started
        return output

    def _suppress(self, output: Any, gated: list[int], input_batch: Any) -> None:
        if gated:
            try:
                self._watcher.suppress(output, gated, input_batch)
            except Exception:
                self._watcher.fail("ending gated requests")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@dataclass
class TileRecord:
    """One sampler tile's values, host-side (valid once `event` has completed; None on the CPU)."""

    event: Any
    slots: torch.Tensor        # [n] int64: the requests' slots
    denoising: torch.Tensor    # [n] bool: a denoising step (else the block's commit step)
    block: torch.Tensor        # [n] int32: the block (canvas index) the step belongs to
    step: torch.Tensor         # [n] int32: denoising step within the block
    emitted: torch.Tensor      # [n] int32: tokens the step emitted (a committed canvas), else 0
    temperature: torch.Tensor  # [n] float32
    # the four below are None in a dropped step's commit-only record (Watcher._commits_of)
    ids: torch.Tensor | None       # [n, W, k] int32
    probs: torch.Tensor | None     # [n, W, k] float32
    accepted: torch.Tensor | None  # [n, W] uint8
    entropy: torch.Tensor | None   # [n, W] float16
    argmax: torch.Tensor       # [n, W] int32 (for a commit step: the committed canvas)
    canvas: torch.Tensor | None  # [n, W] int32: the sampled canvas the next step starts from


# ---- the watcher: device-side reads on the engine thread, streams on the collector thread -------

@dataclass
class _Request:
    req_id: str
    stream_id: str
    slot: int
    prompt_ids: list[int]
    stream: WatchStream | None = None
    outputs: list[int] = field(default_factory=list)
    steps_sent: int = 0
    stream_failed: bool = False
    lost: int = 0
    closed_at: float = 0.0
    ended: bool = False  # its stream has had its final message (at removal, or when the plugin switched off)


class Watcher:
    """Owns the device-side reads, the collector thread and one WatchStream per running request."""

    def __init__(self, config: PluginConfig, model_state: Any, sampler: Any, *, vllm_version: str = "",
                 channel: grpc.Channel | None = None, on_verdict: Callable[[pb.Verdict], None] | None = None) -> None:
        self.config = config
        self.enabled = True
        self.states = sampler.diffusion_states
        self.entropy_bound = float(sampler.entropy_bound)
        self._t_min, self._t_max = float(sampler.t_min), float(sampler.t_max)
        self.vllm_version = vllm_version
        self.model = config.model or _served_model_name(model_state)
        self.on_verdict = on_verdict
        # Gate mode: one client/gate.py Gate per request; tripped requests end at the next engine step.
        self.gates = (RequestGates(policy_for(config.gate_severity), fail_closed=config.gate_fail == "closed")
                      if config.gate == "abort" else None)
        self._gated: dict[str, str] = {}  # requests suppressed since the model runner last took them
        # The block each slot is in, counted on the device at every commit, so a dropped step
        # record never puts later steps in the wrong block.
        self.block = torch.zeros(self.states.max_num_reqs, dtype=torch.int32, device=self.states.device)
        self._owns_channel = channel is None
        self.channel = channel or grpc.insecure_channel(config.target, options=channel_options())
        self.verdicts: collections.deque[pb.Verdict] = collections.deque(maxlen=1024)
        self.counters = collections.Counter()  # "flags" counts flag events (past the bounds only escalations stream)
        self.engine_seconds = 0.0  # time the plugin spent on the engine thread (hooks and queueing)
        self._queue: collections.deque[tuple[str, Any]] = collections.deque()
        self._queued_steps = 0
        self._queued_commits = 0  # commit-only records of dropped steps, at most COMMITS_PER_STEP_SLOT x step_queue
        self._cond = threading.Condition()
        self._lost: collections.Counter[str] = collections.Counter()  # step records dropped, per request id
        self._busy = False
        self._seen_ids: collections.OrderedDict[str, int] = collections.OrderedDict()  # at most SEEN_IDS
        self.consecutive_errors = 0  # plugin errors since a step was last recorded (engine thread)
        # collector-thread state
        self._by_slot: dict[int, _Request] = {}
        self._finishing: list[_Request] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="canvaswatch-vllm-collector", daemon=True)
        self._thread.start()
        # at interpreter exit, send what is queued and end the open streams (briefly: shutdown must not hang)
        atexit.register(self.close, 2.0)

    # -- engine thread ------------------------------------------------------------------------

    def on_add(self, slot: int, new_req_data: Any) -> None:
        req_id = str(new_req_data.req_id)
        if req_id.startswith("_warmup_"):
            return
        if not self.enabled:
            if self.gates is not None and self.gates.fail_closed:  # unmonitored under fail-closed: ended
                self.gates.open(req_id)
                self.gates.on_stream_failed(req_id, "the plugin switched itself off after errors")
            return
        self.block[slot] = 0  # a device fill, queued like vLLM's own slot resets: no synchronisation
        prompt = list(getattr(new_req_data, "prompt_token_ids", None) or [])
        self._put("open", (req_id, int(slot), prompt))

    def on_remove(self, req_id: str) -> None:
        # also once switched off: a stream opened before must still end (and a gate be released)
        self._put("close", str(req_id))

    def gated_rows(self, input_batch: Any) -> list[int]:
        """Engine thread, before the sampler: the batch rows of requests the gate has ended."""
        gates = self.gates
        if gates is None:
            return []
        gates.steps_started += 1
        if not gates.tripped:  # the usual case: one dict check a step, no per-request work
            return []
        return gates.rows([str(r) for r in list(input_batch.req_ids)[:input_batch.num_reqs]])

    def suppress(self, output: Any, rows: list[int], input_batch: Any) -> None:
        """Engine thread, after the sampler: the gated rows emit nothing; the scheduler is told to end them."""
        assert self.gates is not None
        suppress(output, rows, input_batch)
        req_ids = list(input_batch.req_ids)
        tripped = self.gates.tripped
        for row in rows:
            req_id = str(req_ids[row])
            self._gated[req_id] = tripped.get(req_id, "canvaswatch gate")
        self.counters["gated_steps"] += len(rows)

    def take_gated(self) -> dict[str, str]:
        """The model runner, after the step: requests to end ({vLLM request id: reason}), once each step."""
        gated, self._gated = self._gated, {}
        return gated

    def before_tile(self, a: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        slots = a["decode_slots"]
        return (slots.clone(), ~a["is_encoder_phase"][slots], a["step_tensor"][slots].to(torch.int32),
                self.block[slots].clone())

    def after_tile(self, a: dict[str, Any], before: tuple[torch.Tensor, ...],
                   stats: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        slots, denoising, step, block = before
        # the block counter moves on at each commit (the commit step itself belongs to the block it emits)
        self.block[slots] += (~denoising).to(torch.int32)
        n, width = a["token_entropy"].shape
        kept_ids, kept_probs = self._top_k(a, stats, n, width)
        token_entropy = a["token_entropy"]
        # The entropy-bound rule of _compiled_sample_step, on the sampler's own entropies: accept the
        # lowest-entropy positions while their summed entropy, less the largest, stays under the bound.
        sorted_entropy, order = torch.sort(token_entropy, dim=-1)
        cumulative = torch.cumsum(sorted_entropy, dim=-1) - torch.cummax(sorted_entropy, dim=-1).values
        accepted = torch.zeros_like(token_entropy, dtype=torch.bool).scatter_(1, order, cumulative <= self.entropy_bound)
        accepted &= ~a["pin_mask"][slots]  # pinned positions keep their seed, not the denoiser's token
        emitted = a["num_sampled"][a["decode_idx"]].to(torch.int32)
        if stats is not None and stats[1].shape[0] == n:
            temperature = stats[1].float()
        else:  # the schedule, as _denoise_temperature computes it
            total = float(self.states.max_denoising_steps)
            remaining = (total - step.float()).clamp(min=1.0)
            t_min, t_max = self._t_range
            temperature = t_min + (t_max - t_min) * (remaining / total)
        argmax = a["argmax_canvas"][slots].to(torch.int32)
        canvas = a["canvas"][slots].to(torch.int32) if self.config.send_canvas else None
        device = token_entropy.device
        on_gpu = device.type == "cuda"

        def host(tensor: torch.Tensor | None) -> torch.Tensor | None:
            if tensor is None:
                return None
            # non_blocking into pinned memory (PyTorch pins the destination of a non-blocking device-to-host
            # copy); on the CPU, a copy so later in-place updates of vLLM's state cannot reach the record.
            return tensor.to("cpu", non_blocking=True) if on_gpu else tensor.clone()

        record = TileRecord(
            event=None, slots=host(slots), denoising=host(denoising), block=host(block), step=host(step),
            emitted=host(emitted), temperature=host(temperature), ids=host(kept_ids), probs=host(kept_probs),
            accepted=host(accepted.to(torch.uint8)), entropy=host(token_entropy.to(torch.float16)),
            argmax=host(argmax), canvas=host(canvas))
        if on_gpu:
            record.event = torch.cuda.Event(blocking=True)  # the collector sleeps on it, not spins (as vLLM's own)
            record.event.record()
        _local.tiles.append(record)

    @property
    def _t_range(self) -> tuple[float, float]:
        return self._t_min, self._t_max

    def _top_k(self, a: dict[str, Any], stats: tuple[torch.Tensor, torch.Tensor] | None, n: int,
               width: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.config.k
        probs = a["probs"]
        if probs is not None:
            # The softmax the sampler built (in the embedding dtype) for self-conditioning: exactly the
            # distribution it samples from; its top-k is one pass, with no normalisation to redo.
            values, ids = torch.topk(probs, min(k, probs.shape[-1]), dim=-1, sorted=True)
            kept = from_candidates(values.float().clamp_min(_TINY).log(), ids,
                                   torch.zeros(values.shape[:-1], device=values.device), self.config.top_p)
            # A token the request's own top_k/top_p removed has probability 0 exactly: padding, not "tiny".
            live = values > 0
            kept = replace(kept, probs=torch.where(live, kept.probs, 0.0),
                           ids=torch.where(live, kept.ids, torch.zeros_like(kept.ids)))
        elif stats is not None and stats[0].shape[0] == n * width:
            # Single-step requests only: the sampler skipped the softmax; scale the tile's logits the same way.
            logits, temps = stats
            scaled = logits.float().view(n, width, -1) / temps.float().clamp(min=1e-10).view(n, 1, 1)
            values, ids = torch.topk(scaled, min(k, scaled.shape[-1]), dim=-1, sorted=True)
            kept = from_candidates(values, ids, torch.logsumexp(scaled, dim=-1), self.config.top_p)
        else:
            raise RuntimeError(f"no distribution for a tile of {n} requests x {width} positions")
        ids = kept.ids
        allowed = getattr(self.states, "step_allowed", None)
        if allowed is not None:  # a constrained step: the columns are the shared allowed ids
            ids = allowed[ids.long()].to(torch.int32)
        return ids, kept.probs

    def submit(self, tiles: list[TileRecord], input_batch: Any) -> None:
        # Which requests this step covered, read from the host-side batch (no device read), so
        # a step record dropped here is counted against each of them.
        num_reqs = input_batch.num_reqs
        req_ids = [str(r) for r in list(input_batch.req_ids)[:num_reqs]]
        self._put("step", (tiles, req_ids))

    def fail(self, where: str) -> None:
        """A plugin error on the engine thread (called from an except block): counted and logged, the step
        goes on without it. MAX_CONSECUTIVE_ERRORS in a row with no step recorded between switch the
        plugin off: open streams end, and under gate_fail = "closed" every open request is ended too."""
        self.counters["errors"] += 1
        self.consecutive_errors += 1
        if self.consecutive_errors <= 3 or self.consecutive_errors % MAX_CONSECUTIVE_ERRORS == 0:
            log.exception("canvaswatch plugin: error %s; serving goes on (%d in a row)", where, self.consecutive_errors)
        if self.enabled and self.consecutive_errors >= MAX_CONSECUTIVE_ERRORS:
            self.enabled = False
            log.error("canvaswatch plugin: %d errors in a row; streaming stops, serving goes on%s",
                      self.consecutive_errors,
                      " and open requests end (gate_fail = closed)" if self.gates is not None and self.gates.fail_closed
                      else " unmonitored")
            self._put("off", None)

    def _put(self, kind: str, item: Any) -> None:
        with self._cond:
            if kind == "step" and self._queued_steps >= self.config.step_queue:
                if self.config.drop_policy == "newest":  # the new step is refused: its commits are queued instead
                    self._count_lost(item)
                    kind, item = "commits", self._commits_of(item)
                    if item is None:
                        return
                else:
                    self._evict_oldest_step()
            if kind == "step":
                self._queued_steps += 1
            # lifecycle messages ("open", "close") are never dropped: a stream must always end
            self._queue.append((kind, item))
            self._cond.notify()

    def _evict_oldest_step(self) -> None:
        """Under the lock: drop the oldest queued step record, leaving its commits in its place (in order)."""
        for index, (queued_kind, queued) in enumerate(self._queue):
            if queued_kind == "step":
                commits = self._commits_of(queued)
                if commits is None:
                    del self._queue[index]
                else:
                    self._queue[index] = ("commits", commits)
                self._queued_steps -= 1
                self._count_lost(queued)
                return

    def _commits_of(self, item: Any) -> list[TileRecord] | None:
        """A dropped step record's part that must not be lost: what its rows committed (the canvases the
        request's final output is made of), without the top-k, kept while fewer than COMMITS_PER_STEP_SLOT x
        step_queue are queued (under the lock). Whether a row committed is known only once the device has
        run the step, so every dropped record keeps its [n, W] argmax and [n] counts, a few KB."""
        if self._queued_commits >= COMMITS_PER_STEP_SLOT * self.config.step_queue:
            self.counters["commits_lost"] += 1
            if self.counters["commits_lost"] == 1:
                log.warning("canvaswatch plugin: the collector is far behind; committed canvases of dropped steps "
                            "are lost from the final output sent to the sidecar (counted in commits_lost)")
            return None
        self._queued_commits += 1
        return [replace(tile, ids=None, probs=None, accepted=None, entropy=None, canvas=None) for tile in item[0]]

    def _count_lost(self, item: Any) -> None:
        self.counters["steps_dropped_before_streams"] += 1
        for req_id in item[1]:
            self._lost[req_id] += 1

    # -- collector thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._queue and not self._stop:
                    self._busy = False
                    self._cond.wait(timeout=0.2)
                if self._stop and not self._queue:
                    self._busy = False
                    return
                entry = self._queue.popleft() if self._queue else None
                if entry is not None:
                    self._busy = True
                    if entry[0] == "step":
                        self._queued_steps -= 1
                    elif entry[0] == "commits":
                        self._queued_commits -= 1
            if entry is not None:
                kind, item = entry
                try:
                    if kind == "step":
                        self._on_step(item[0])
                    elif kind == "commits":
                        self._on_step(item, send=False)
                    elif kind == "open":
                        self._on_open(*item)
                    elif kind == "close":
                        self._on_close(item)
                    elif kind == "off":
                        self._on_off()
                except Exception:
                    self.counters["errors"] += 1
                    log.exception("canvaswatch plugin: collector error on %s", kind)
            # outside the lock: closing a stream joins its receiver thread, and the engine thread must
            # never wait on that lock for longer than a queue append
            self._reap()

    def _on_open(self, req_id: str, slot: int, prompt: list[int]) -> None:
        previous = self._by_slot.pop(slot, None)
        if previous is not None:  # a slot is reused only after remove_request; be safe anyway
            self._finish(previous)
        # vLLM makes request ids unique, so this would grow by one a request: the oldest are forgotten (an id
        # preempted while SEEN_IDS others started would reuse its first stream id)
        seen = self._seen_ids.pop(req_id, 0) + 1
        self._seen_ids[req_id] = seen
        if len(self._seen_ids) > SEEN_IDS:
            self._seen_ids.popitem(last=False)
        # A request preempted and resumed (or re-added) is a new stream: the sidecar keeps ids unique.
        stream_id = req_id if seen == 1 else f"{req_id}#{seen}"
        self._by_slot[slot] = _Request(req_id, stream_id, slot, prompt)

    def _on_close(self, req_id: str) -> None:
        for slot, request in list(self._by_slot.items()):
            if request.req_id == req_id:
                del self._by_slot[slot]
                self._finish(request)
                return
        if self.gates is not None:  # a request never opened here (added after a switch-off) may hold a gate
            self.gates.close(req_id)

    def _on_off(self) -> None:
        """The plugin switched itself off: finish every open stream (its verdict may still come) and, under
        gate_fail = "closed", end the requests that will go unmonitored."""
        for request in self._by_slot.values():  # they stay until vLLM removes them, which releases their gates
            if self.gates is not None:
                self.gates.on_stream_failed(request.req_id, "the plugin switched itself off after errors")
            self._end_stream(request)

    def _on_step(self, tiles: list[TileRecord], send: bool = True) -> None:
        """Stream each denoising row of the step's tiles (unless `send` is False: a dropped step's commit-only
        record) and add what each row committed to its request's output."""
        for tile in tiles:
            if tile.event is not None:
                tile.event.synchronize()  # the collector waits for the device; the engine never does
            slots = tile.slots.tolist()
            denoising = tile.denoising.tolist()
            emitted = tile.emitted.tolist()
            for row, slot in enumerate(slots):
                request = self._by_slot.get(slot)
                if request is None or request.ended:
                    continue  # warm-up, a request the plugin never saw added, or one ended when it switched off
                if send and denoising[row]:
                    self._send_step(request, tile, row)
                if emitted[row] > 0:
                    request.outputs.extend(tile.argmax[row, :emitted[row]].tolist())

    def _open_stream(self, request: _Request, width: int) -> None:
        info = pb.RequestInfo(
            request_id=request.stream_id, model=self.model, tenant=self.config.tenant,
            prompt_ids=request.prompt_ids, canvas_length=width,
            total_steps=int(self.states.max_denoising_steps),
            attributes={"k": str(self.config.k), "engine": "vllm", "vllm_version": self.vllm_version,
                        "vllm_request_id": request.req_id,
                        **({"top_p": str(self.config.top_p)} if self.config.top_p else {})})
        if self.gates is not None:
            self.gates.open(request.req_id)
        request.stream = WatchStream(self.channel, info, max_pending=self.config.max_pending,
                                     drop_policy=self.config.drop_policy, metadata=self.config.metadata(),
                                     on_event=functools.partial(self._on_event, request.req_id))

    def _send_step(self, request: _Request, tile: TileRecord, row: int) -> None:
        if request.stream is None:
            self._open_stream(request, int(tile.ids.shape[1]))
        assert request.stream is not None
        lost = self._take_lost(request)
        if lost:
            request.stream.count_dropped(lost)
        message = pb.StepState(
            block=int(tile.block[row]), step=int(tile.step[row]),
            topk=pb.TopK(ids=_encode(tile.ids[row]), probs=_encode(tile.probs[row]), top_p=self.config.top_p or 0.0))
        # The signals are written into the message later, on the stream's sender thread. A row of a GPU tile is
        # a view of page-locked memory: copied, so a message waiting in a queue holds a few KB of ordinary
        # memory rather than its whole tile's pinned buffer (which PyTorch does not give back to the system).
        own = (lambda t: t.clone()) if tile.event is not None else (lambda t: t)
        signals = SamplerSignals(accepted=own(tile.accepted[row]), entropy=own(tile.entropy[row]),
                                 argmax_ids=own(tile.argmax[row]),
                                 canvas_ids=own(tile.canvas[row]) if tile.canvas is not None else None,
                                 temperature=float(tile.temperature[row]))
        request.stream.send(message, signals=signals)
        request.steps_sent += 1
        self.counters["steps_sent"] += 1
        if request.stream.done and not request.stream_failed:
            # The call ended before its final message: the sidecar is down or refused the stream. Serving
            # goes on unjudged (fail-open, counted, logged) unless gate_fail is "closed".
            request.stream_failed = True
            self.counters["streams_failed"] += 1
            try:
                request.stream.result(0)  # done without a final message: raises the stream's error
                error = "ended before its final message"
            except Exception as err:
                error = str(err)
            log.warning("canvaswatch stream_failed request_id=%s error=%s", request.stream_id, error)
            if self.gates is not None:
                self.gates.on_stream_failed(request.req_id, error)

    def _take_lost(self, request: _Request) -> int:
        with self._cond:
            return self._lost.pop(request.req_id, 0)

    def _finish(self, request: _Request) -> None:
        self.counters["requests_closed"] += 1
        if self.gates is not None:
            # here, in queue order, not in remove_request: a step queued before the removal may still open it
            self.gates.close(request.req_id)
        self._end_stream(request)

    def _end_stream(self, request: _Request) -> None:
        """The request's final message (its committed output so far), once."""
        if request.ended:
            return
        request.ended = True
        if request.stream is None:
            if self.config.gate != "hold":
                return  # removed before its first denoising step: nothing was streamed
            # Hold mode: the frontend waits for a verdict of every stream of the request (<id>, <id>#2 after
            # a preemption, ...), so even a stream with no step gets one (the sidecar judges the prompt alone).
            self._open_stream(request, int(self.states.canvas.shape[-1]))
            assert request.stream is not None
        lost = self._take_lost(request)
        if lost:
            request.stream.count_dropped(lost)
        request.stream.finish(request.outputs)
        request.closed_at = time.monotonic()
        self._finishing.append(request)

    def _reap(self) -> None:
        now = time.monotonic()
        keep = []
        for request in self._finishing:
            stream = request.stream
            assert stream is not None
            if stream.done:
                stream.close()
            elif now - request.closed_at > self.config.verdict_timeout_s:
                self.counters["verdict_timeouts"] += 1
                log.warning("canvaswatch verdict_timeout request_id=%s after %.1f s", request.stream_id,
                            self.config.verdict_timeout_s)
                stream.close()
            else:
                keep.append(request)
        self._finishing = keep

    def _on_event(self, req_id: str, event: pb.MonitorEvent) -> None:
        # on a stream's receiver thread
        kind = event.WhichOneof("event")
        if kind == "flag":
            self.counters["flags"] += 1
            log.warning("canvaswatch flag request_id=%s monitor=%s severity=%s", event.request_id, event.flag.monitor,
                        pb.Severity.Name(event.flag.severity))
            if self.gates is not None:
                self.gates.on_event(req_id, event)
        elif kind == "verdict":
            verdict = event.verdict
            self.verdicts.append(verdict)
            self.counters["verdicts"] += 1
            log.info("canvaswatch verdict request_id=%s max_severity=%s flags=%d steps_seen=%d steps_dropped=%d",
                     verdict.request_id, pb.Severity.Name(verdict.max_severity), len(verdict.flags),
                     verdict.steps_seen, verdict.steps_dropped)
            if self.on_verdict is not None:
                try:
                    self.on_verdict(verdict)
                except Exception:
                    log.exception("canvaswatch plugin: on_verdict callback failed")

    # -- lifecycle ----------------------------------------------------------------------------

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued step is streamed and every finished request has its verdict (or gave up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cond:
                idle = not self._queue and not self._busy
            if idle and not self._finishing:
                return True
            time.sleep(0.02)
        return False

    def close(self, timeout: float = 5.0) -> None:
        if self._stop:
            return
        self.flush(timeout)
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)
        for request in list(self._by_slot.values()) + self._finishing:
            if request.stream is not None:
                request.stream.close()
        if self._owns_channel:
            close_channel(self.channel)


def _encode(tensor: torch.Tensor) -> pb.Tensor:
    from canvaswatch.client.tensors import encode_tensor

    return encode_tensor(tensor)


def _served_model_name(model_state: Any) -> str:
    model_config = getattr(model_state, "model_config", None)
    name = getattr(model_config, "served_model_name", None) or getattr(model_config, "model", None) or "diffusion-gemma"
    return name[0] if isinstance(name, (list, tuple)) else str(name)
