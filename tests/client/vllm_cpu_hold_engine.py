"""Hold mode against vLLM 0.33.0 on the CPU: the real sampler and model state in an engine thread, the real
OutputProcessor and RequestOutputCollectors in an AsyncLLM-style frontend, and a real sidecar.

Run by tests/client/test_vllm_hold.py with the Python of the vLLM venv, never imported by pytest.
Usage: python vllm_cpu_hold_engine.py OUT.json. Environment: CANVASWATCH_VLLM_TARGET (the sidecar the
worker streams to and the main frontend asks), CANVASWATCH_VLLM_GATE=hold and its keys,
CANVASWATCH_TEST_SILENT (a server that accepts calls and never answers), CANVASWATCH_TEST_BENCH_N (bench
mode: that many one-block requests through the main frontend and as many through a frontend without the
hold, alternated, 8 at a time, nothing else).

Real, beyond what tests/client/vllm_cpu_engine.py lists: the plugin's patches of vLLM's OutputProcessor,
LLMEngine and AsyncLLM, installed by the entry point when this process imports those modules (checked);
vLLM's OutputProcessor (add_request, process_outputs: detokenizer stand-in for no tokenizer, RequestState,
make_request_output), EngineCoreRequest / EngineCoreOutput / FinishReason, RequestOutputCollector and
RequestOutput.add; GetVerdict over gRPC. Standing in: the forward pass and the scheduler (as in
vllm_cpu_engine.py), the engine core's process (a thread that hands each step's EngineCoreOutputs to the
event loop, as AsyncLLM's output handler receives them), and LLMEngine around its OutputProcessor (a small
class whose __init__ and step() the plugin's wrappers patch, as they patch vLLM's).

As vLLM's worker does, a finished request is removed from the model state (so its stream's final message
is sent) at the next engine step, not the one that finished it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import threading
import time
from types import SimpleNamespace

import torch

import vllm_cpu_engine as base  # noqa: E402  (the CPU patches; run as a script, its directory is on sys.path)

torch.set_num_threads(1)  # two cores shared with the sidecar on the test machine


class _DeferredEngine(base._Engine):
    """The stand-in engine, with vLLM's timing of removals: the worker removes finished requests one step later."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.to_clear: list[tuple[str, int]] = []
        self.cleared_at: dict[str, float] = {}  # request id -> perf_counter when its final message was handed over
        self.in_batch: dict[str, list[int]] = {}  # request id -> the engine steps that computed it

    def remove(self, req_id: str) -> None:
        request = self.requests.pop(req_id)
        self.to_clear.append((req_id, request["slot"]))

    def clear(self) -> None:
        for req_id, slot in self.to_clear:
            self.state.remove_request(req_id)  # the plugin sends the stream's final message from here
            self.cleared_at[req_id] = time.perf_counter()
            self.free.append(slot)
        self.free.sort()
        self.to_clear = []

    def decode(self) -> None:
        self.clear()
        for req_id in self.requests:
            self.in_batch.setdefault(req_id, []).append(self.steps + 1)
        super().decode()


class _Frontend:
    """One AsyncLLM-style frontend: a real OutputProcessor with the plugin's Hold, one consumer task per request."""

    def __init__(self, name: str, hold, output_processor_cls, loop) -> None:
        from canvaswatch.client.vllm_hold import attach

        self.name, self.hold, self.loop = name, hold, loop
        self.op = output_processor_cls(None, log_stats=False)
        if hold is not None:  # None: vLLM's OutputProcessor as it is (the bench's baseline)
            attach(self.op, hold)
        self.received: dict[str, list[dict]] = {}
        self.tasks: list[asyncio.Task] = []
        self.process_calls = 0


def main(out_path: str) -> None:
    started = time.monotonic()
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    import vllm.model_executor.models.diffusion_gemma as dg
    import vllm.v1.engine.async_llm as async_llm_module
    import vllm.v1.engine.llm_engine as llm_engine_module
    import vllm.v1.engine.output_processor as op_module

    assert getattr(dg, "_canvaswatch_patched", False), "the canvaswatch plugin did not attach through its entry point"
    import vllm.v1.core.sched.scheduler as scheduler_module

    for cls in (op_module.OutputProcessor, llm_engine_module.LLMEngine, async_llm_module.AsyncLLM,
                scheduler_module.Scheduler):
        assert getattr(cls, "_canvaswatch_hold_patched", False), f"{cls.__name__} not patched for hold"
    base._init_tensor_parallel()
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine import EngineCoreOutput, EngineCoreRequest, FinishReason

    from canvaswatch.client.vllm_config import load_config
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.request import Request, RequestStatus

    from canvaswatch.client.vllm_hold import Hold, SidecarVerdicts, hold_of, patch_engine, patch_scheduler

    class SchedulerStandIn:
        """The two Scheduler methods the plugin wraps in hold mode, as vLLM's do them for this engine's outputs."""

        def _free_request(self, request, delay_free_blocks=False):
            return None

        def update_from_output(self, outputs):
            return {0: EngineCoreOutputs(outputs=outputs)} if outputs else {}

    patch_scheduler(SimpleNamespace(Scheduler=SchedulerStandIn))  # the wrappers vLLM's Scheduler got (checked above)
    scheduler = SchedulerStandIn()

    config = load_config()
    state, sampler, watcher = base.build(dg)
    assert watcher.gates is None, "hold mode must not turn on the abort gate's worker side"
    engine = _DeferredEngine(state, sampler, SamplingParams, [])
    base.witness_row_stats(dg, engine.captured)

    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, daemon=True)
    loop_thread.start()

    def on_loop(fn, *args):
        async def call():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(call(), loop).result(60)

    frontends: dict[str, _Frontend] = {}
    frontends["main"] = on_loop(_Frontend, "main", Hold(config, SidecarVerdicts(config)), op_module.OutputProcessor, loop)
    bench_n = int(os.environ.get("CANVASWATCH_TEST_BENCH_N", "0"))
    silent = os.environ.get("CANVASWATCH_TEST_SILENT", "")
    plan: list[tuple[str, str, int, RequestOutputKind]] = []  # (request id, frontend, blocks, output kind)
    if bench_n:
        # alternate: held requests, and requests through an OutputProcessor without the hold (the baseline)
        frontends["plain"] = on_loop(_Frontend, "plain", None, op_module.OutputProcessor, loop)
        plan = [(f"bench-{i:03d}", "main" if i % 2 == 0 else "plain", 1, RequestOutputKind.FINAL_ONLY)
                for i in range(2 * bench_n)]
    else:
        for on_timeout in ("open", "closed"):
            silent_config = dataclasses.replace(config, target=silent, gate_budget_s=0.5, gate_on_timeout=on_timeout)
            frontends[on_timeout] = on_loop(_Frontend, on_timeout, Hold(silent_config, SidecarVerdicts(silent_config)),
                                            op_module.OutputProcessor, loop)
        # bad-async plants the trigger (its verdict, and only its verdict, says CRITICAL); clean-long runs on
        # for two blocks after it, so the engine's steps while bad-async is held can be counted
        plan = [("bad-async", "main", 2, RequestOutputKind.DELTA), ("clean-a", "main", 2, RequestOutputKind.DELTA),
                ("clean-long", "main", 4, RequestOutputKind.CUMULATIVE),
                ("pre", "main", 2, RequestOutputKind.DELTA),  # preempted at step 1, resumed at 3: the trigger is in
                                                               # its resumed stream "pre#2" only
                ("silent-open", "open", 1, RequestOutputKind.FINAL_ONLY),
                ("silent-closed", "closed", 1, RequestOutputKind.FINAL_ONLY)]

    async def consume(frontend: _Frontend, req_id: str, queue) -> None:
        got = frontend.received.setdefault(req_id, [])
        while True:
            output = await queue.get()
            completion = output.outputs[0]
            got.append({"finished": output.finished, "token_ids": list(completion.token_ids),
                        "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason,
                        "kv_transfer_params": output.kv_transfer_params,
                        "engine_step": engine.steps, "at": time.perf_counter()})
            if output.finished:
                return

    def frontend_add(frontend: _Frontend, req_id: str, blocks: int, kind) -> None:
        from vllm.v1.engine.output_processor import RequestOutputCollector

        params = SamplingParams(max_tokens=blocks * base.CANVAS, output_kind=kind)
        request = EngineCoreRequest(request_id=req_id, prompt_token_ids=[2, 7], mm_features=None,
                                    sampling_params=params, pooling_params=None, arrival_time=time.time(),
                                    lora_request=None, cache_salt=None, data_parallel_rank=None,
                                    external_req_id=req_id)
        queue = RequestOutputCollector(kind, req_id)
        frontend.op.add_request(request, None, None, 0, queue)
        frontend.tasks.append(loop.create_task(consume(frontend, req_id, queue)))

    finished_at: dict[str, tuple[int, float]] = {}  # request id -> (engine step, perf_counter) it finished at

    def frontend_process(frontend: _Frontend, outputs: list) -> None:
        frontend.process_calls += 1
        result = frontend.op.process_outputs(outputs)
        assert not result.request_outputs  # AsyncLLM's invariant: outputs went to their queues

    where = {req_id: name for req_id, name, _, _ in plan}
    vllm_requests = {req_id: Request(req_id, [2, 7], SamplingParams(max_tokens=blocks * base.CANVAS), None)
                     for req_id, _, blocks, _ in plan}
    blocks_of = {req_id: blocks for req_id, _, blocks, _ in plan}
    emitted: dict[str, list[int]] = {}  # request id -> tokens handed to the frontend (all its streams)
    pending = list(plan)
    committed_before: dict[str, int] = {}
    held_steps: dict[str, list[int]] = {}  # engine steps that ran while a request's output was held
    while pending or engine.requests or engine.to_clear:
        engine.clear()  # an engine step starts: the worker removes what finished at the last one
        admitted = False
        while pending and engine.free:
            req_id, name, blocks, kind = pending.pop(0)
            on_loop(frontend_add, frontends[name], req_id, blocks, kind)
            engine.add(req_id, prompt=[2, 7], blocks=blocks, seed=len(committed_before) + 1)
            committed_before[req_id] = 0
            admitted = True
        if admitted:
            engine.prefill()
        if not engine.requests:
            engine.steps += 1  # the step that only cleared finished requests (vLLM runs it too)
            continue
        if engine.steps == 1 and "pre" in engine.requests:  # vLLM preempts it: the worker removes it, its stream ends
            engine.remove("pre")
            vllm_requests["pre"].num_preemptions += 1
        if engine.steps == 3 and "pre" in committed_before and "pre" not in engine.requests and "pre" not in finished_at:
            engine.add("pre", prompt=[2, 7], blocks=blocks_of["pre"], seed=99)  # resumed: streams as "pre#2"
            engine.prefill()
        ids = list(engine.requests)
        streams = {r: engine.requests[r]["stream"] for r in ids}
        engine.decode()
        now = time.perf_counter()
        finished_outputs, per_frontend = [], {}
        for req_id in ids:
            committed = engine.truth[streams[req_id]]["committed"]
            new = committed[committed_before.get(streams[req_id], 0):]
            committed_before[streams[req_id]] = len(committed)
            emitted.setdefault(req_id, []).extend(new)
            done = req_id not in engine.requests
            if done:
                finished_at[req_id] = (engine.steps, now)
                vllm_requests[req_id].status = RequestStatus.FINISHED_LENGTH_CAPPED
                scheduler._free_request(vllm_requests[req_id])
            if new or done:
                finished_outputs.append(EngineCoreOutput(
                    request_id=req_id, new_token_ids=list(new), finish_reason=FinishReason.LENGTH if done else None))
        for eco in scheduler.update_from_output(finished_outputs).values():  # the engine core tags preempted ones
            for output in eco.outputs:
                per_frontend.setdefault(where[output.request_id], []).append(output)
        for name, outputs in per_frontend.items():
            loop.call_soon_threadsafe(frontend_process, frontends[name], outputs)  # never waits for the frontend
        for req_id, (step, _) in finished_at.items():
            if not frontends[where[req_id]].received.get(req_id):
                held_steps.setdefault(req_id, []).append(engine.steps)
        assert engine.steps < 2000, "the engine loop did not finish"
    engine_done = time.perf_counter()
    # every caller gets its output, within the budget (each frontend's Hold)
    deadline = time.monotonic() + 60
    while any(not f.received.get(r) or not f.received[r][-1]["finished"] for r, name, _, _ in plan
              for f in [frontends[name]]):
        assert time.monotonic() < deadline, {r: frontends[n].received.get(r) for r, n, _, _ in plan}
        time.sleep(0.01)
    flushed = watcher.flush(timeout=60)

    # LLMEngine's path: the plugin's __init__ and step() wrappers on a stand-in engine class, the real OutputProcessor
    class LLMEngine:
        def __init__(self, vllm_config, engine_core) -> None:
            self.output_processor = op_module.OutputProcessor(None, log_stats=False)
            self.engine_core = engine_core

        def step(self):
            return self.output_processor.process_outputs([]).request_outputs

        def has_unfinished_requests(self):
            return self.output_processor.has_unfinished_requests()

    sync_result = {}
    if not bench_n:
        patch_engine(SimpleNamespace(__name__="stand-in", LLMEngine=LLMEngine), class_name="LLMEngine",
                     config_of=lambda: config, verdicts=SidecarVerdicts)
        other = LLMEngine(SimpleNamespace(model_config=SimpleNamespace(architectures=["Gemma3ForCausalLM"])), None)
        llm = LLMEngine(SimpleNamespace(model_config=SimpleNamespace(architectures=["DiffusionGemmaForBlockDiffusion"])),
                        SimpleNamespace())  # a multiprocess engine core: step() must not ask it for outputs
        assert hold_of(other.output_processor) is None and hold_of(llm.output_processor) is not None
        # replay the engine's own committed canvases of two finished streams through LLMEngine's OutputProcessor
        released = []
        for req_id in ("bad-async", "clean-a"):
            params = SamplingParams(max_tokens=64, output_kind=RequestOutputKind.FINAL_ONLY)
            llm.output_processor.add_request(EngineCoreRequest(
                request_id=req_id, prompt_token_ids=[2, 7], mm_features=None, sampling_params=params,
                pooling_params=None, arrival_time=time.time(), lora_request=None, cache_salt=None,
                data_parallel_rank=None, external_req_id=f"llm-{req_id}"), None)
        first = llm.output_processor.process_outputs([
            EngineCoreOutput(request_id=r, new_token_ids=emitted[r], finish_reason=FinishReason.LENGTH)
            for r in ("bad-async", "clean-a")]).request_outputs
        released += first  # the verdicts are long known here, so an answer may come back within that very call
        steps = 0
        while llm.has_unfinished_requests():
            released += llm.step()
            steps += 1
            assert steps < 2000
        sync_result = {"steps": steps, "released": len(released),
                       "outputs": {o.request_id: {"finished": o.finished, "token_ids": list(o.outputs[0].token_ids),
                                                  "finish_reason": o.outputs[0].finish_reason,
                                                  "stop_reason": o.outputs[0].stop_reason} for o in released},
                       "decisions": dict(hold_of(llm.output_processor).gate.decisions)}

    result = {
        "flushed": flushed, "truth": emitted,
        "received": {r: frontends[n].received[r] for r, n, _, _ in plan},
        "finished_at": finished_at, "cleared_at": engine.cleared_at, "held_steps": held_steps,
        "engine_steps": engine.steps, "engine_done": engine_done,
        "in_batch": engine.in_batch,
        "decisions": {name: dict(f.hold.gate.decisions) for name, f in frontends.items() if f.hold},
        "counters": {name: dict(f.hold.counters) for name, f in frontends.items() if f.hold},
        "process_calls": {name: f.process_calls for name, f in frontends.items()},
        "pending": {name: f.hold.pending for name, f in frontends.items() if f.hold},
        "frontend_of": where,
        "verdicts": {v.request_id: {"max_severity": int(v.max_severity), "flags": [f.monitor for f in v.flags]}
                     for v in watcher.verdicts},
        "watcher": dict(watcher.counters), "sync": sync_result, "budget_s": config.gate_budget_s,
        "seconds": time.monotonic() - started,
    }
    watcher.close()
    loop.call_soon_threadsafe(loop.stop)
    with open(out_path, "w", encoding="utf-8") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1])
