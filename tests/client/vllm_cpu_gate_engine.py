"""Gate mode against vLLM 0.33.0's real scheduler, DiffusionSampler and model state on the CPU: a planted phrase
ends its request.

Run by tests/client/test_vllm_gate.py with the Python of the vLLM venv, never imported by pytest.
Usage: python vllm_cpu_gate_engine.py OUT.json (the sidecar in CANVASWATCH_VLLM_TARGET, gate settings in
CANVASWATCH_VLLM_GATE*, the phrase's token ids as JSON in CANVASWATCH_TEST_PHRASE_IDS).

Real, beyond what tests/client/vllm_cpu_engine.py lists: vLLM's own scheduler, `DiffusionScheduler` (what
`VllmConfig` picks for a diffusion model; built from a tiny DiffusionGemma config saved to a temporary
directory, no weights, with its real KV-cache manager). It admits the requests, schedules the prefill and
every denoising step (a canvas of placeholder tokens per request), books the committed canvases, finishes
requests at `max_tokens` and tells the worker which to remove. This loop drives it as `EngineCore.step` and
`post_step` do (vllm/v1/engine/core.py): schedule, run the step, `update_from_output`, then
`update_draft_token_ids` after every step that ran the model. Also real: the plugin's patches of
`GPUModelRunner.sample_tokens` and `Scheduler.update_from_output` (DiffusionScheduler inherits the patched
method), installed by the entry point when this process imports those modules (checked); the hand-over of
gated requests on vLLM's own `ModelRunnerOutput`, pickled and unpickled as the multiprocess executor carries
it to the engine core; and the scheduler's `EngineCoreOutput`s, what the caller's frontend would receive.
Standing in: the model's forward (as there) and the model runner around the sampler. This loop adds,
prefills, decodes and removes what each `SchedulerOutput` says. It builds the `ModelRunnerOutput` from what
the sampler committed, calls `hand_over` where the patched `sample_tokens` does, and returns the draft
placeholders vLLM's runner returns when no request uses structured output (`DraftTokensHandler`: -1 per
position).

Three requests at once: req-G plants the watched phrase in the first denoising steps of its first
block (six blocks in all), req-A and req-B are clean. The loop records every step the sampler
computed for each request, what the scheduler emitted for it, and when the gate tripped, for the test to
compare.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import tempfile
import time

# vLLM falls back to its V1 model runner on a machine without Triton, and that runner refuses diffusion
# models when the config is built; nothing here runs a model runner, the setting only lets the config build.
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "1")

import torch  # noqa: E402

import vllm_cpu_engine as base  # noqa: E402  (the CPU patches; run as a script, its directory is on sys.path)

PLANT_STEPS = 2  # the phrase leads the canvas in block 0's first two denoising steps, then the target takes over
KV_BLOCKS = 64  # KV-cache blocks of 16 tokens: room for every request's prompt and canvases at once
MAX_SCHEDULER_STEPS = 400  # far above the ~40 this run takes: a scheduler that stops scheduling fails, never hangs


class _GatedEngine(base._Engine):
    """The model runner's stand-in, told what to run by vLLM's scheduler."""

    def __init__(self, *args, phrase: list[int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.phrase = phrase
        self.emitted: dict[str, list[int]] = {}  # per request: num_sampled at each decode step it was in
        self.decode_steps: dict[str, list[int]] = {}  # per request: the engine steps that computed it
        self.done_running: dict[str, dict] = {}  # committed its last block here, not yet removed by the scheduler

    def _logits(self, request: dict, committing: bool) -> torch.Tensor:
        logits = super()._logits(request, committing)
        if request["stream"] == "req-G" and not committing and request["done"] == 0 and request["denoise"] < PLANT_STEPS:
            where = torch.arange(3, 3 + len(self.phrase))
            logits[where, torch.tensor(self.phrase)] += 60.0  # far above the target's 3 * (denoise + 1)
        return logits

    def decode(self) -> None:
        ids = list(self.requests)
        step = self.steps + 1
        for req_id in ids:
            self.decode_steps.setdefault(req_id, []).append(step)
        done_before = {r: len(self.truth[self.requests[r]["stream"]]["committed"]) for r in ids}
        super().decode()
        for req_id in ids:
            committed = self.truth[self.streams_of_id(req_id)]["committed"]
            self.emitted.setdefault(req_id, []).append(len(committed) - done_before[req_id])

    def streams_of_id(self, req_id: str) -> str:
        return req_id if self.streams_of[req_id] == 1 else f"{req_id}#{self.streams_of[req_id]}"

    def remove(self, req_id: str) -> None:
        # A request that committed its last block stops running here; the runner removes it (and the plugin
        # sends its final message) only when the scheduler's next SchedulerOutput names it finished.
        self.done_running[req_id] = self.requests.pop(req_id)

    def worker_remove(self, req_id: str) -> None:
        """What the runner does for each of a SchedulerOutput's finished_req_ids."""
        request = self.done_running.pop(req_id, None) or self.requests.pop(req_id)
        self.state.remove_request(req_id)
        self.free.append(request["slot"])
        self.free.sort()


def main(out_path: str) -> None:
    started = time.monotonic()
    phrase = json.loads(os.environ["CANVASWATCH_TEST_PHRASE_IDS"])
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    import vllm.model_executor.models.diffusion_gemma as dg
    import vllm.v1.core.sched.scheduler as scheduler_module
    import vllm.v1.worker.gpu.model_runner as runner_module

    assert getattr(dg, "_canvaswatch_patched", False), "the canvaswatch plugin did not attach through its entry point"
    # gate mode patched the scheduler and the model runner when this process imported them, as vLLM's
    # engine core and workers do
    assert getattr(scheduler_module.Scheduler, "_canvaswatch_gate", False), "Scheduler.update_from_output not wrapped"
    assert getattr(runner_module.GPUModelRunner, "_canvaswatch_gate", False), "GPUModelRunner.sample_tokens not wrapped"
    base._init_tensor_parallel()
    from vllm import SamplingParams
    from vllm.v1.outputs import DraftTokenIds, ModelRunnerOutput
    from vllm.v1.request import Request

    from canvaswatch.client.vllm_gate import hand_over

    state, sampler, watcher = base.build(dg)
    assert watcher.gates is not None, "gate mode is off in the plugin"
    engine = _GatedEngine(state, sampler, SamplingParams, [], phrase=phrase)
    base.witness_row_stats(dg, engine.captured)
    scheduler = build_scheduler()
    assert type(scheduler).__name__ == "DiffusionScheduler", type(scheduler)
    assert type(scheduler).update_from_output is scheduler_module.Scheduler.update_from_output  # the plugin's wrapper

    blocks = {"req-G": 6, "req-A": 2, "req-B": 2}
    prompts = {req_id: [2, 100 + seed] for seed, req_id in enumerate(blocks, start=1)}
    seeds = {req_id: seed for seed, req_id in enumerate(blocks, start=1)}
    for req_id, n in blocks.items():
        scheduler.add_request(Request(req_id, prompts[req_id], SamplingParams(max_tokens=n * base.CANVAS), None))
    ended: dict[str, dict] = {}  # per request: its finishing EngineCoreOutput, as the caller's frontend gets it
    received: dict[str, list[int]] = {req_id: [] for req_id in blocks}  # every token the scheduler emitted for it
    committed_before: dict[str, int] = {}
    scheduler_steps = 0
    while scheduler.has_requests():  # EngineCore.step and post_step
        scheduler_output = scheduler.schedule()
        scheduler_steps += 1
        assert scheduler_steps < MAX_SCHEDULER_STEPS, ("the scheduler kept the requests but stopped scheduling them",
                                                       sorted(scheduler.requests))
        # the runner: remove what finished, add what is new, then run the scheduled step
        for req_id in sorted(scheduler_output.finished_req_ids):
            engine.worker_remove(req_id)
        new = [r.req_id for r in scheduler_output.scheduled_new_reqs]
        for req_id in new:
            engine.add(req_id, prompt=prompts[req_id], blocks=blocks[req_id], seed=seeds[req_id])
            committed_before[req_id] = 0
        if new:
            engine.prefill()
        ids = list(scheduler_output.num_scheduled_tokens)
        decoding = sorted(scheduler_output.scheduled_spec_decode_tokens or {})
        sampled: dict[str, list[int]] = {req_id: [] for req_id in ids}
        if decoding:
            # all three requests are admitted at once, so a step is all prefill or all denoising: the scheduler
            # and this runner agree on which requests run
            assert not new and decoding == sorted(engine.requests), (new, decoding, sorted(engine.requests))
            assert all(len(t) == base.CANVAS for t in scheduler_output.scheduled_spec_decode_tokens.values())
            engine.decode()
            for req_id in decoding:
                committed = engine.truth[engine.streams_of_id(req_id)]["committed"]
                sampled[req_id] = committed[committed_before[req_id]:]
                committed_before[req_id] = len(committed)
        # the model runner's hand-over, the executor's transport, the scheduler's update (vllm_gate)
        runner_output = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                          sampled_token_ids=[sampled[r] for r in ids])
        hand_over(runner_output, watcher)
        trip_steps = dict(watcher.gates.trip_step)
        outputs = scheduler.update_from_output(scheduler_output, pickle.loads(pickle.dumps(runner_output)))
        for engine_core_outputs in outputs.values():
            for output in engine_core_outputs.outputs:
                received[output.request_id].extend(output.new_token_ids)
                if output.finish_reason is not None:
                    ended[output.request_id] = {
                        "engine_step": engine.steps, "trip_step": trip_steps.get(output.request_id),
                        "finish_reason": str(output.finish_reason), "stop_reason": output.stop_reason,
                        "new_token_ids": list(output.new_token_ids)}
        if scheduler_output.total_num_scheduled_tokens > 0:
            # post_step: the runner's draft tokens for every request of the step, the prefill's included (the
            # scheduler schedules a denoising step only for a request holding a canvas of them)
            placeholders = [[-1] * scheduler_output.num_spec_tokens_to_schedule for _ in ids]
            scheduler.update_draft_token_ids(DraftTokenIds(ids, placeholders))
    assert not engine.requests and not engine.done_running, (engine.requests, engine.done_running)
    flushed = watcher.flush(timeout=60)
    result = {
        "flushed": flushed, "ended": ended, "received": received, "truth": engine.truth,
        "decode_steps": engine.decode_steps, "emitted": engine.emitted, "blocks": blocks, "canvas": base.CANVAS,
        "scheduler_steps": scheduler_steps, "scheduler": type(scheduler).__name__,
        "verdicts": {v.request_id: {"max_severity": int(v.max_severity), "flags": [f.monitor for f in v.flags],
                                    "steps_seen": v.steps_seen} for v in watcher.verdicts},
        "counters": dict(watcher.counters), "decisions": dict(watcher.gates.decisions),
        "seconds": time.monotonic() - started,
    }
    watcher.close()
    with open(out_path, "w", encoding="utf-8") as handle:
        json.dump(result, handle)


def build_scheduler():
    """vLLM's own scheduler for a DiffusionGemma model (DiffusionScheduler), on a tiny config with no weights.

    language_model_only: the text path only (the multimodal processor would need a tokenizer). The KV cache
    is sized by hand (one full-attention group of KV_BLOCKS blocks), as the engine core does from the
    workers' memory profile.
    """
    from transformers.models.diffusion_gemma.configuration_diffusion_gemma import DiffusionGemmaConfig
    from vllm.config import CacheConfig, DiffusionConfig, ModelConfig, VllmConfig
    from vllm.v1.core.sched.diffusion_scheduler import DiffusionScheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    directory = tempfile.mkdtemp(prefix="tiny-diffusion-gemma-")
    hf_config = DiffusionGemmaConfig()
    hf_config.architectures = ["DiffusionGemmaForBlockDiffusion"]
    hf_config.save_pretrained(directory)
    model_config = ModelConfig(model=directory, skip_tokenizer_init=True, dtype="float32", max_model_len=512,
                               language_model_only=True)
    vllm_config = VllmConfig(model_config=model_config, cache_config=CacheConfig(block_size=16),
                             diffusion_config=DiffusionConfig(canvas_length=base.CANVAS,
                                                              max_denoising_steps=base.MAX_STEPS))
    assert vllm_config.scheduler_config.scheduler_cls.endswith("DiffusionScheduler"), \
        vllm_config.scheduler_config.scheduler_cls
    vllm_config.cache_config.num_gpu_blocks = KV_BLOCKS
    kv_cache = KVCacheConfig(num_blocks=KV_BLOCKS, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(
        ["layer.0"], FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=8, dtype=torch.float32))])
    return DiffusionScheduler(vllm_config, kv_cache, StructuredOutputManager(vllm_config), block_size=16)


if __name__ == "__main__":
    main(sys.argv[1])
