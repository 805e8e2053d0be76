"""Gate mode against vLLM 0.33.0's real DiffusionSampler and model state on the CPU: a planted phrase ends its request.

Run by tests/client/test_vllm_gate.py with the Python of the vLLM venv, never imported by pytest.
Usage: python vllm_cpu_gate_engine.py OUT.json (the sidecar in CANVASWATCH_VLLM_TARGET, gate settings in
CANVASWATCH_VLLM_GATE*, the phrase's token ids as JSON in CANVASWATCH_TEST_PHRASE_IDS).

Real, beyond what tests/client/vllm_cpu_engine.py lists: the plugin's patches of vLLM's
`GPUModelRunner.sample_tokens` and `Scheduler.update_from_output`, installed by the entry point when
this process imports those modules (checked); the hand-over of gated requests on vLLM's own
`ModelRunnerOutput`, pickled and unpickled as the multiprocess executor carries it to the engine
core; and the scheduler wrapper (applied to the stand-in below) building vLLM's `EngineCoreOutput` /
`EngineCoreOutputs` for vLLM `Request` objects with vLLM's `RequestStatus` and `FinishReason`.
Standing in: the model's forward (as there), the scheduler's queues (a dict whose
`finish_requests` sets the status vLLM's does), and the model runner around the sampler (this loop
calls `hand_over` where the patched `sample_tokens` does).

Three requests at once: req-G plants the watched phrase in the first denoising steps of its first
block (six blocks in all), req-A and req-B are clean. The loop records every step the sampler
computed for each request, what it emitted, and when the gate tripped, for the test to compare.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import time
from types import SimpleNamespace

import torch

import vllm_cpu_engine as base  # noqa: E402  (the CPU patches; run as a script, its directory is on sys.path)

PLANT_STEPS = 2  # the phrase leads the canvas in block 0's first two denoising steps, then the target takes over


class _GatedEngine(base._Engine):
    def __init__(self, *args, phrase: list[int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.phrase = phrase
        self.emitted: dict[str, list[int]] = {}  # per request: num_sampled at each decode step it was in
        self.decode_steps: dict[str, list[int]] = {}  # per request: the engine steps that computed it

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
            stream = self.streams_of_id(req_id)
            self.emitted.setdefault(req_id, []).append(len(self.truth[stream]["committed"]) - done_before[req_id])

    def streams_of_id(self, req_id: str) -> str:
        return req_id if self.streams_of[req_id] == 1 else f"{req_id}#{self.streams_of[req_id]}"


class _SchedulerQueues:
    """The scheduler's request table: vLLM `Request` objects, finished as Scheduler.finish_requests does."""

    def __init__(self) -> None:
        self.requests: dict = {}

    def finish_requests(self, request_ids, finished_status):
        ids = (request_ids,) if isinstance(request_ids, str) else request_ids
        finished = []
        for req_id in ids:
            request = self.requests.pop(req_id, None)
            if request is not None and not request.is_finished():
                request.status = finished_status
                finished.append(request)
        return finished

    def update_from_output(self, scheduler_output, model_runner_output):
        return {}  # vLLM's own update: a gated request emitted nothing, so it has no output of its own


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
    from vllm.v1.request import Request
    from vllm.v1.outputs import ModelRunnerOutput
    from canvaswatch.client.vllm_gate import hand_over, patch_scheduler

    state, sampler, watcher = _build(dg)
    assert watcher.gates is not None, "gate mode is off in the plugin"
    engine = _GatedEngine(state, sampler, SamplingParams, [], phrase=phrase)
    stats_fn = dg.sample_row_stats_reference

    def witness_stats(logits, temps, canvas_len, probs_dtype):
        result = stats_fn(logits, temps, canvas_len, probs_dtype)
        engine.captured.append((temps.clone(), result[1].clone(), result[2].clone()))
        return result

    dg.sample_row_stats_reference = witness_stats
    patch_scheduler(SimpleNamespace(Scheduler=_SchedulerQueues))  # the wrapper vLLM's Scheduler got, on the stand-in
    queues = _SchedulerQueues()
    blocks = {"req-G": 6, "req-A": 2, "req-B": 2}
    for seed, (req_id, n) in enumerate(blocks.items(), start=1):
        engine.add(req_id, prompt=[2, 100 + seed], blocks=n, seed=seed)
        queues.requests[req_id] = Request(req_id, [2, 100 + seed], SamplingParams(max_tokens=n * base.CANVAS), None)
    engine.prefill()
    ended: dict[str, dict] = {}
    while engine.running:
        ids = list(engine.requests)
        engine.decode()
        # the model runner's hand-over, the executor's transport, the scheduler's update (vllm_gate)
        runner_output = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)})
        hand_over(runner_output, watcher)
        trip_steps = dict(watcher.gates.trip_step)
        outputs = queues.update_from_output(None, pickle.loads(pickle.dumps(runner_output)))
        for eco in outputs.values():
            for output in eco.outputs:
                req_id = output.request_id
                ended[req_id] = {"engine_step": engine.steps, "trip_step": trip_steps[req_id],
                                 "finish_reason": str(output.finish_reason), "stop_reason": output.stop_reason,
                                 "new_token_ids": list(output.new_token_ids)}
                engine.remove(req_id)  # the worker removes what the scheduler finished
        for req_id in list(queues.requests):
            if req_id not in engine.requests:
                queues.requests.pop(req_id)  # finished on its own
        assert engine.steps < 400, "the engine loop did not finish"
    flushed = watcher.flush(timeout=60)
    result = {
        "flushed": flushed, "ended": ended, "truth": engine.truth, "decode_steps": engine.decode_steps,
        "emitted": engine.emitted, "blocks": blocks, "canvas": base.CANVAS,
        "verdicts": {v.request_id: {"max_severity": int(v.max_severity), "flags": [f.monitor for f in v.flags],
                                    "steps_seen": v.steps_seen} for v in watcher.verdicts},
        "counters": dict(watcher.counters), "decisions": dict(watcher.gates.decisions),
        "seconds": time.monotonic() - started,
    }
    watcher.close()
    with open(out_path, "w", encoding="utf-8") as handle:
        json.dump(result, handle)


def _build(dg):
    """The model state and the plugin's sampler wrapper, as tests/client/vllm_cpu_engine.py builds them."""
    from vllm.v1.worker.gpu.sample.logprob import LogprobTokenIdsState
    from vllm.v1.worker.gpu.sample.states import SamplingStates

    device = torch.device("cpu")
    torch.manual_seed(0)
    embed = torch.randn(base.VOCAB, base.HIDDEN) * 0.02
    model = SimpleNamespace(model=SimpleNamespace(
        embed_tokens=SimpleNamespace(weight=embed, shard_indices=SimpleNamespace(org_vocab_start_index=0,
                                                                                 org_vocab_end_index=base.VOCAB)),
        normalizer=torch.tensor(base.HIDDEN ** 0.5)))
    model_config = SimpleNamespace(
        get_inputs_embeds_size=lambda: base.HIDDEN, dtype=torch.float32,
        hf_text_config=SimpleNamespace(hidden_size=base.HIDDEN), try_get_generation_config=lambda: dict(base.GEN_CONFIG),
        get_vocab_size=lambda: base.VOCAB, max_model_len=4096, enable_prompt_embeds=False,
        served_model_name="tiny-diffusion-gemma-cpu")
    vllm_config = SimpleNamespace(
        model_config=model_config,
        scheduler_config=SimpleNamespace(max_num_seqs=base.MAX_REQS, max_num_batched_tokens=base.MAX_REQS * base.CANVAS),
        diffusion_config=SimpleNamespace(canvas_length=base.CANVAS, max_denoising_steps=base.MAX_STEPS))
    state = dg.DiffusionGemmaModelState(vllm_config, model, None, device)
    inner = SimpleNamespace(sampling_states=SamplingStates(base.MAX_REQS, base.VOCAB),
                            logprob_token_ids_state=LogprobTokenIdsState(base.MAX_REQS, device),
                            req_states=SimpleNamespace(draft_tokens=torch.zeros(base.MAX_REQS, base.CANVAS,
                                                                                dtype=torch.int64)),
                            logprobs_mode="raw_logprobs")
    sampler, _ = state.custom_sampler(inner)
    watcher = getattr(state, "_canvaswatch", None)
    assert watcher is not None and type(sampler).__name__ == "WatchingSampler", type(sampler)
    return state, sampler, watcher


if __name__ == "__main__":
    main(sys.argv[1])
