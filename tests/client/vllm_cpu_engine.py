"""vLLM 0.33.0's real DiffusionSampler and DiffusionGemmaModelState, driven on the CPU with the canvaswatch plugin.

Run by tests/client/test_vllm_plugin.py with the Python of the vLLM venv (.ci/vllm_venv.sh), never
imported by pytest. Usage: python vllm_cpu_engine.py OUT.json (the sidecar in CANVASWATCH_VLLM_TARGET).

What is real: vLLM's plugin loading (`load_general_plugins()` runs the `vllm.general_plugins` entry
point of the installed canvaswatch wheel), `DiffusionGemmaModelState` (its __init__, custom_sampler,
add_request, remove_request), `DiffusionGemmaRequestStates`, `DiffusionSampler` with its top_k/top_p
masking, temperature schedule, entropy-bound acceptance, convergence and commit, vLLM's
`SamplingStates` and `SamplingParams`, tensor-parallel groups (one gloo process).
What stands in: the model's forward (each request's logits come from a fixed target canvas plus
noise, sharper every step, so blocks converge in a few steps), the scheduler (this loop), and the
two patches that let the sampler run on CPU tensors (issue 15): no UVA, a fixed free-memory reading.

The engine loop also writes down, independently of the plugin, what the sampler did at each step
(from vLLM's state tensors and the sampler's own row statistics), so the test can compare it with
what the sidecar received.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from types import SimpleNamespace

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # spares a ~40 s inductor compile of the sampler step

import numpy as np  # noqa: E402
import torch  # noqa: E402

import vllm.v1.worker.gpu.buffer_utils as buffer_utils  # noqa: E402

# The two patches that make the real DiffusionSampler run on CPU tensors (issue 15).
buffer_utils.is_uva_available = lambda: False
torch.accelerator.get_memory_info = lambda *args, **kwargs: (64 << 30, 128 << 30)

VOCAB = 262_144  # the real DiffusionGemma (Gemma) vocabulary size
CANVAS = 16
HIDDEN = 32
MAX_STEPS = 8  # per block, the cap after which a block converges whatever its entropy
MAX_REQS = 8
GEN_CONFIG = {
    "t_min": 0.4, "t_max": 0.8, "confidence_threshold": 0.5, "stability_threshold": 1, "max_denoising_steps": MAX_STEPS,
    "sampler_config": {"_cls_name": "EntropyBoundSampler", "entropy_bound": 0.5},
}


def main(out_path: str) -> None:
    started = time.monotonic()
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # runs canvaswatch's entry point, as every vLLM process does
    import vllm.model_executor.models.diffusion_gemma as dg

    assert getattr(dg, "_canvaswatch_patched", False), "the canvaswatch plugin did not attach through its entry point"
    _init_tensor_parallel()
    from vllm import SamplingParams

    state, sampler, watcher = build(dg)
    captured: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    witness_row_stats(dg, captured)

    engine = _Engine(state, sampler, SamplingParams, captured)
    # Five requests, four at once: A and B run two blocks each (B with its own top_k=5), C is aborted
    # mid-block, E is preempted and resumed (a new stream "req-E#2"), D reuses C's slot.
    engine.add("req-A", prompt=[2, 9259, 1902], blocks=2, seed=1)
    engine.add("req-B", prompt=[2, 4521], blocks=2, seed=2, top_k=5)
    engine.add("req-C", prompt=[2, 100, 200, 300], blocks=2, seed=3)
    engine.add("req-E", prompt=[2, 7], blocks=1, seed=5)
    engine.prefill()
    step = 0
    while engine.running:
        engine.decode()
        step += 1
        if step == 3:
            engine.remove("req-C")  # abort: mid-block, after three steps
            engine.add("req-D", prompt=[2, 55, 66], blocks=1, seed=4)
            engine.prefill()
        if step == 2:
            engine.remove("req-E")  # preemption: its slot is freed, the request comes back later
        if step == 5:
            engine.add("req-E", prompt=[2, 7], blocks=1, seed=5)
            engine.prefill()
        assert step < 200, "the engine loop did not finish"
    sampler_seconds = engine.sampler_seconds
    flushed = watcher.flush(timeout=60)
    result = {
        "flushed": flushed,
        "truth": engine.truth,
        "verdicts": {v.request_id: {"steps_seen": v.steps_seen, "steps_dropped": v.steps_dropped,
                                    "max_severity": int(v.max_severity), "flags": [f.monitor for f in v.flags],
                                    "monitor_errors": list(v.monitor_errors)} for v in watcher.verdicts},
        "counters": dict(watcher.counters),
        "engine_steps": engine.steps,
        "sampler_seconds": sampler_seconds,
        "plugin_engine_seconds": watcher.engine_seconds,
        "seconds": time.monotonic() - started,
        "vocab": VOCAB, "canvas": CANVAS, "entropy_bound": GEN_CONFIG["sampler_config"]["entropy_bound"],
    }
    watcher.close()
    with open(out_path, "w", encoding="utf-8") as handle:
        json.dump(result, handle)



def build(dg):
    """vLLM's DiffusionGemmaModelState on a stand-in model, and the sampler its custom_sampler returns.

    `dg`: vLLM's diffusion_gemma module, after load_general_plugins() (so the sampler is the plugin's
    WatchingSampler around vLLM's DiffusionSampler). Returns (model state, sampler, the plugin's watcher).
    """
    from vllm.v1.worker.gpu.sample.logprob import LogprobTokenIdsState
    from vllm.v1.worker.gpu.sample.states import SamplingStates

    device = torch.device("cpu")
    torch.manual_seed(0)
    embed = torch.randn(VOCAB, HIDDEN) * 0.02
    model = SimpleNamespace(model=SimpleNamespace(
        embed_tokens=SimpleNamespace(weight=embed, shard_indices=SimpleNamespace(org_vocab_start_index=0,
                                                                                 org_vocab_end_index=VOCAB)),
        normalizer=torch.tensor(HIDDEN ** 0.5)))
    model_config = SimpleNamespace(
        get_inputs_embeds_size=lambda: HIDDEN, dtype=torch.float32, hf_text_config=SimpleNamespace(hidden_size=HIDDEN),
        try_get_generation_config=lambda: dict(GEN_CONFIG), get_vocab_size=lambda: VOCAB, max_model_len=4096,
        enable_prompt_embeds=False, served_model_name="tiny-diffusion-gemma-cpu")
    vllm_config = SimpleNamespace(
        model_config=model_config,
        scheduler_config=SimpleNamespace(max_num_seqs=MAX_REQS, max_num_batched_tokens=MAX_REQS * CANVAS),
        diffusion_config=SimpleNamespace(canvas_length=CANVAS, max_denoising_steps=MAX_STEPS))
    state = dg.DiffusionGemmaModelState(vllm_config, model, None, device)
    base = SimpleNamespace(sampling_states=SamplingStates(MAX_REQS, VOCAB),
                           logprob_token_ids_state=LogprobTokenIdsState(MAX_REQS, device),
                           req_states=SimpleNamespace(draft_tokens=torch.zeros(MAX_REQS, CANVAS, dtype=torch.int64)),
                           logprobs_mode="raw_logprobs")
    sampler, _ = state.custom_sampler(base)  # the plugin's wrapper around vLLM's DiffusionSampler
    watcher = getattr(state, "_canvaswatch", None)
    assert watcher is not None and type(sampler).__name__ == "WatchingSampler", type(sampler)
    assert type(sampler._inner).__name__ == "DiffusionSampler"
    return state, sampler, watcher


def witness_row_stats(dg, captured: list) -> None:
    """Record the sampler's own row statistics, seen from outside the plugin: wrap vLLM's
    `sample_row_stats_reference` so each call (one per tile) appends (temperatures, samples, entropies)
    to `captured`, the list `_Engine.decode` reads and clears every step."""
    stats_fn = dg.sample_row_stats_reference

    def witness_stats(logits, temps, canvas_len, probs_dtype):
        result = stats_fn(logits, temps, canvas_len, probs_dtype)
        captured.append((temps.clone(), result[1].clone(), result[2].clone()))
        return result

    dg.sample_row_stats_reference = witness_stats


class _Engine:
    """A scheduler and model stand-in: the runner's calls, in the runner's order (model_runner.py)."""

    def __init__(self, state, sampler, sampling_params, captured) -> None:
        self.state, self.sampler, self.SamplingParams, self.captured = state, sampler, sampling_params, captured
        self.states = state.diffusion_states
        self.free = list(range(MAX_REQS))
        self.requests: dict[str, dict] = {}  # running, by vLLM request id
        self.pending_prefill: list[str] = []
        self.truth: dict[str, dict] = {}  # by stream id: what the sampler did, step by step
        self.streams_of: dict[str, int] = {}
        self.steps = 0
        self.sampler_seconds = 0.0

    @property
    def running(self) -> bool:
        return bool(self.requests)

    def add(self, req_id: str, *, prompt: list[int], blocks: int, seed: int, top_k: int = 0) -> None:
        slot = self.free.pop(0)
        gen = torch.Generator().manual_seed(seed)
        targets = torch.randint(1000, VOCAB, (blocks, CANVAS), generator=gen)
        self.streams_of[req_id] = self.streams_of.get(req_id, 0) + 1
        stream_id = req_id if self.streams_of[req_id] == 1 else f"{req_id}#{self.streams_of[req_id]}"
        self.requests[req_id] = {"slot": slot, "targets": targets, "blocks": blocks, "done": 0, "denoise": 0,
                                 "stream": stream_id, "gen": gen, "top_k": top_k}
        self.truth[stream_id] = {"steps": [], "committed": [], "top_k": top_k, "prompt": prompt}
        self.state.add_request(slot, SimpleNamespace(req_id=req_id, prompt_token_ids=prompt))
        params = self.SamplingParams(temperature=1.0, top_k=top_k if top_k else 0, max_tokens=blocks * CANVAS)
        self.sampler.add_request(slot, params)
        self.sampler.apply_staged_writes()
        self.pending_prefill.append(req_id)

    def remove(self, req_id: str) -> None:
        request = self.requests.pop(req_id)
        self.state.remove_request(req_id)  # what finish_requests does for finished, aborted and preempted ids
        self.free.append(request["slot"])
        self.free.sort()

    def prefill(self) -> None:
        ids = self.pending_prefill
        self.pending_prefill = []
        n = len(ids)
        slots = np.array([self.requests[r]["slot"] for r in ids], dtype=np.intp)
        batch = SimpleNamespace(
            num_reqs=n, num_draft_tokens=0, req_ids=list(ids), idx_mapping_np=slots,
            idx_mapping=torch.from_numpy(slots.astype(np.int64)),
            num_computed_prefill_tokens_np=np.zeros(MAX_REQS, dtype=np.int32),
            num_scheduled_tokens=np.full(n, 4, dtype=np.int32), prefill_len_np=np.full(MAX_REQS, 4, dtype=np.int32),
            cu_num_logits_np=np.zeros(n + 1, dtype=np.int32))
        self.sampler(torch.zeros(0, VOCAB), batch)

    def decode(self) -> None:
        ids = list(self.requests)
        n = len(ids)
        slots = np.array([self.requests[r]["slot"] for r in ids], dtype=np.intp)
        slot_t = torch.from_numpy(slots.astype(np.int64))
        committing = self.states.is_encoder_phase[slot_t].tolist()
        step_before = self.states.step[slot_t].tolist()
        logits = torch.cat([self._logits(self.requests[r], committing[i]) for i, r in enumerate(ids)])
        cu = np.arange(0, (n + 1) * CANVAS, CANVAS, dtype=np.int32)
        batch = SimpleNamespace(
            num_reqs=n, num_draft_tokens=n * CANVAS, req_ids=list(ids), idx_mapping_np=slots, idx_mapping=slot_t,
            cu_num_logits_np=cu, query_start_loc_np=cu, query_start_loc=torch.from_numpy(cu),
            num_computed_prefill_tokens_np=np.zeros(MAX_REQS, dtype=np.int32),
            num_scheduled_tokens=np.full(n, CANVAS, dtype=np.int32), prefill_len_np=np.zeros(MAX_REQS, dtype=np.int32))
        self.captured.clear()
        started = time.perf_counter()
        output = self.sampler(logits, batch)
        self.sampler_seconds += time.perf_counter() - started
        self.steps += 1
        [(temps, samples, entropies)] = self.captured  # one tile: every canvas has the same width
        samples, entropies = samples.view(n, CANVAS), entropies.view(n, CANVAS)
        argmax_after = self.states.argmax_canvas[slot_t].tolist()
        canvas_after = self.states.canvas[slot_t].tolist()
        num_sampled = output.num_sampled.tolist()
        for i, req_id in enumerate(ids):
            request = self.requests[req_id]
            truth = self.truth[request["stream"]]
            if not committing[i]:
                truth["steps"].append({
                    "block": request["done"], "step": step_before[i], "argmax": argmax_after[i],
                    "sample": samples[i].tolist(), "canvas": canvas_after[i], "entropy": entropies[i].tolist(),
                    "temperature": float(temps[i])})
                request["denoise"] += 1
            if num_sampled[i] > 0:
                truth["committed"].extend(output.sampled_token_ids[i, :num_sampled[i]].tolist())
                request["done"] += 1
                request["denoise"] = 0
                if request["done"] == request["blocks"]:
                    self.remove(req_id)

    def _logits(self, request: dict, committing: bool) -> torch.Tensor:
        # The model stand-in: noise, plus the block's target token at each position, sharper every step.
        logits = torch.randn(CANVAS, VOCAB, generator=request["gen"]) * 1.5
        if not committing:
            block = min(request["done"], request["blocks"] - 1)
            rows = torch.arange(CANVAS)
            logits[rows, request["targets"][block]] += 3.0 * (request["denoise"] + 1)
        return logits


def _init_tensor_parallel() -> None:
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed.parallel_state import init_distributed_environment, initialize_model_parallel

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    init_distributed_environment(world_size=1, rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}",
                                 local_rank=0, backend="gloo")
    with set_current_vllm_config(VllmConfig()):
        initialize_model_parallel(1, 1)


if __name__ == "__main__":
    main(sys.argv[1])
