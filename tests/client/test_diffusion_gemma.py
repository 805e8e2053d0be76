"""The real serving loop: transformers' DiffusionGemma generate() with the canvaswatch streamer, a real sidecar.

The model is tiny and built from a config with random weights (no download),
but generate(), its denoising loop and its streamer hooks are transformers'
own, with the full 262,144-token Gemma vocabulary.
"""

from __future__ import annotations

import pytest
import torch

from canvaswatch.client.diffusion_gemma import CanvasWatchStreamer
from tests import recording_monitor
from tests.conftest import install_entry_point, start_sidecar, tiny_diffusion_gemma

transformers = pytest.importorskip("transformers")

CANVAS = 16
STEPS = 6


class _Witness(CanvasWatchStreamer):
    """Also keeps what the model itself produced per step, to compare with what the sidecar saw."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.model_top1: list[list[int]] = []

    def put_draft(self, value=None, logits=None, **kwargs) -> None:
        if logits is not None:
            self.model_top1.append(logits[0].argmax(-1).tolist())
        super().put_draft(value=value, logits=logits, **kwargs)


def test_generate_streams_every_denoising_step_to_the_sidecar(vocab, tmp_path, monkeypatch):
    install_entry_point(tmp_path, monkeypatch, "recorder", "tests.recording_monitor:Recorder")
    recording_monitor.RECORDED.clear()
    running = start_sidecar(vocab, tmp_path, {"monitors": {"recorder": {}, "lexicon": {}, "self_correction": {}}})
    model = tiny_diffusion_gemma(CANVAS)
    try:
        streamer = _Witness(running.target, request_id="dg-1", k=8, max_pending=1000)
        prompt = torch.tensor([[2, 9259, 1902]])
        output = model.generate(prompt, max_new_tokens=2 * CANVAS, max_denoising_steps=STEPS, streamer=streamer)
        [verdict] = streamer.verdicts(timeout=60)
        streamer.close()
    finally:
        running.thread.stop()

    steps = [r for r in recording_monitor.RECORDED if r["request_id"] == "dg-1" and "final" not in r]
    assert len(steps) == streamer.steps_sent == len(streamer.model_top1) > 0
    assert verdict.steps_seen == len(steps) and verdict.steps_dropped == 0
    # In order: blocks left to right, steps 0.. within each block, restarting per block.
    order = [(r["block"], r["step"]) for r in steps]
    assert order == sorted(order)
    blocks = sorted({b for b, _ in order})
    assert blocks == [0, 1]
    for block in blocks:
        assert [s for b, s in order if b == block] == list(range(sum(1 for b, _ in order if b == block)))
    config = model.config.text_config
    assert all(r["length"] == model.config.canvas_length == CANVAS for r in steps)
    assert all(r["vocab"] == config.vocab_size and r["max_id"] < config.vocab_size and r["k"] == 8 for r in steps)
    # What the sidecar decoded is what the model produced at that step.
    assert [r["top1"] for r in steps] == streamer.model_top1
    # The final message carried the generated tokens.
    [final] = [r for r in recording_monitor.RECORDED if r["request_id"] == "dg-1" and "final" in r]
    assert final["final"] == output.sequences[0, prompt.shape[1]:].tolist()
    assert verdict.request_id == "dg-1"


def test_on_device_bottleneck_sends_only_topk_and_matches_the_model(vocab, tmp_path, monkeypatch):
    from canvaswatch.client.diffusion_gemma import attach_bottleneck

    install_entry_point(tmp_path, monkeypatch, "recorder", "tests.recording_monitor:Recorder")
    recording_monitor.RECORDED.clear()
    running = start_sidecar(vocab, tmp_path, {"monitors": {"recorder": {}}})
    model = tiny_diffusion_gemma(CANVAS)
    seen_logits: list[list[int]] = []
    try:
        streamer = _Witness(running.target, request_id="dg-device", k=4, max_pending=1000)
        hook = attach_bottleneck(model, streamer)
        assert streamer._takes_logits is False  # transformers will not copy the full logits to the CPU
        original = hook._original

        def spy(*args, **kwargs):
            out = original(*args, **kwargs)
            seen_logits.append(out[2][0].argmax(-1).tolist())
            return out

        hook._original = spy
        model.generate(torch.tensor([[2, 9259]]), max_new_tokens=CANVAS, max_denoising_steps=STEPS, streamer=streamer)
        hook.detach()
        [verdict] = streamer.verdicts(timeout=60)
        streamer.close()
    finally:
        running.thread.stop()
    steps = [r for r in recording_monitor.RECORDED if r["request_id"] == "dg-device" and "final" not in r]
    assert streamer.model_top1 == []  # put_draft never received logits
    assert verdict.steps_seen == len(steps) == len(seen_logits) == streamer.steps_sent > 0
    assert [r["top1"] for r in steps] == seen_logits
    assert all(r["k"] == 4 and r["length"] == CANVAS for r in steps)


def _entropy_bound_acceptance(entropy: torch.Tensor, bound: float) -> torch.Tensor:
    """The entropy-bound rule, written out here: the lowest-entropy positions whose summed entropy, less the largest, stays <= bound."""
    ordered, order = torch.sort(entropy)
    chosen = torch.cumsum(ordered, dim=0) - ordered <= bound
    return torch.zeros_like(chosen).scatter(0, order, chosen)


@pytest.mark.slow
def test_sampler_signals_reach_the_sidecar_and_match_what_the_sampler_did(vocab, tmp_path, monkeypatch):
    from canvaswatch.client.diffusion_gemma import attach_bottleneck

    install_entry_point(tmp_path, monkeypatch, "recorder", "tests.recording_monitor:Recorder")
    recording_monitor.RECORDED.clear()
    running = start_sidecar(vocab, tmp_path, {"monitors": {"recorder": {}}})
    model = tiny_diffusion_gemma(CANVAS)
    # Random weights put every position near ln V = 12.45 nats: a bound of 30 accepts 3 positions a
    # step (12.45 + 12.45 <= 30 < 3 x 12.45), so the mask is not trivially one position.
    bound, t_min, t_max = 30.0, 0.4, 0.8
    witnessed: list[dict] = []
    try:
        streamer = CanvasWatchStreamer(running.target, request_id="dg-signals", k=4, max_pending=1000)
        hook = attach_bottleneck(model, streamer)
        original = hook._original

        def witness(*args, **kwargs):
            # What the step really did, read here independently of the hook's own computation.
            canvas, argmax, logits, finished = original(*args, **kwargs)
            witnessed.append({"logits": logits[0].clone(), "argmax": argmax[0].tolist(), "canvas": canvas[0].tolist(),
                              "started_from": kwargs["current_canvas"][0].tolist()})
            return canvas, argmax, logits, finished

        hook._original = witness
        prompt = torch.tensor([[2, 9259]])
        output = model.generate(prompt, max_new_tokens=2 * CANVAS, max_denoising_steps=STEPS, t_min=t_min, t_max=t_max,
                                sampler_config=transformers.EntropyBoundSamplerConfig(entropy_bound=bound),
                                streamer=streamer)
        hook.detach()
        [verdict] = streamer.verdicts(timeout=60)
        streamer.close()
    finally:
        running.thread.stop()

    steps = [r for r in recording_monitor.RECORDED if r["request_id"] == "dg-signals" and "final" not in r]
    assert verdict.steps_seen == len(steps) == len(witnessed) == 2 * STEPS and verdict.steps_dropped == 0
    for index, (seen, did) in enumerate(zip(steps, witnessed)):
        # the sampler's entropy: Categorical(logits).entropy() of the logits it scored (float32 in this
        # model, so the returned self-conditioning logits are those same logits), float16 on the wire
        entropy = torch.distributions.Categorical(logits=did["logits"]).entropy()
        torch.testing.assert_close(torch.tensor(seen["entropy"]), entropy, rtol=0, atol=4e-3)
        # the accepted mask is the entropy-bound rule applied to those entropies
        expected = _entropy_bound_acceptance(entropy, bound)
        assert seen["accepted"] == expected.tolist() and sum(seen["accepted"]) == 3, index
        # the argmax canvas is the step's argmax; the sampled canvas is the one the next step starts from
        assert seen["argmax_ids"] == did["argmax"] == did["logits"].argmax(-1).tolist()
        assert seen["canvas_ids"] == did["canvas"]
        if seen["step"] + 1 < STEPS:
            assert did["canvas"] == witnessed[index + 1]["started_from"]
        # temperature: the linear schedule over the steps remaining (STEPS at step 0)
        remaining = STEPS - seen["step"]
        assert seen["temperature"] == pytest.approx(t_min + (t_max - t_min) * remaining / STEPS, rel=1e-6)
    # At each block's last step the argmax canvas is the block's output.
    generated = output.sequences[0, prompt.shape[1]:].tolist()
    last = [r for r in steps if r["step"] == STEPS - 1]
    assert [r["block"] for r in last] == [0, 1]
    assert last[0]["argmax_ids"] + last[1]["argmax_ids"] == generated


class _Sampler:
    """Just what the hook reads of transformers' EntropyBoundSampler: accept_canvas and accepted_token_mask."""

    accepted_token_mask = None

    def accept_canvas(self, current_canvas, denoiser_canvas, logits, cur_step):
        self.accepted_token_mask = torch.ones_like(current_canvas, dtype=torch.bool)
        return denoiser_canvas


class _Loop(torch.nn.Module):
    """A denoising step shaped like transformers' _denoising_step; row 1 stops after the first step."""

    def _denoising_step(self, *, current_canvas, finished_denoising, sampler, logits_processor, cur_step, scores):
        sampler.accept_canvas(current_canvas, current_canvas + 1, scores, cur_step)
        finished_denoising |= torch.tensor([False, True])  # in place, as generate() does
        return current_canvas + 1, current_canvas + 2, scores.float(), finished_denoising


class _Collect(CanvasWatchStreamer):
    """Builds each row's message at once instead of opening streams."""

    def __init__(self) -> None:
        super().__init__("127.0.0.1:1")
        self.messages: list = []

    def _emit(self, batch, canvas_length, build) -> None:
        self.messages.append([build(row, self.block, self.step) for row in range(batch)])
        self.step += 1


def test_rows_whose_denoising_stopped_send_no_acceptance_and_keep_their_entropy():
    from canvaswatch.client.diffusion_gemma import attach_bottleneck
    from canvaswatch.client.tensors import decode_array

    streamer = _Collect()
    loop = _Loop()
    hook = attach_bottleneck(loop, streamer, k=2)
    finished = torch.zeros(2, dtype=torch.bool)
    canvas = torch.zeros(2, 3, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    for remaining in (2, 1):
        scores = torch.randn(2, 3, 50, generator=generator) * remaining
        loop._denoising_step(current_canvas=canvas, finished_denoising=finished, sampler=_Sampler(),
                             logits_processor=[], cur_step=remaining, scores=scores)
    hook.detach()
    first, second = ([decode_array(m.accepted, "a").tolist() for m in rows] for rows in streamer.messages)
    assert first == [[1, 1, 1], [1, 1, 1]]
    assert second == [[1, 1, 1], [0, 0, 0]]  # row 1 had finished: generate() keeps its canvas
    entropies = [[decode_array(m.entropy, "e").tolist() for m in rows] for rows in streamer.messages]
    assert entropies[1][1] == entropies[0][1] and entropies[1][0] != entropies[0][0]
    assert all(m.temperature == 1.0 for rows in streamer.messages for m in rows)  # no temperature processor


class _KeywordSampler(_Sampler):
    """A sampler of another signature (scores by keyword): what a later transformers may pass."""

    def accept_canvas(self, current_canvas, denoiser_canvas, *, scores, cur_step):
        return super().accept_canvas(current_canvas, denoiser_canvas, scores, cur_step)


class _KeywordLoop(_Loop):
    def _denoising_step(self, *, current_canvas, finished_denoising, sampler, logits_processor, cur_step, scores):
        sampler.accept_canvas(current_canvas, current_canvas + 1, scores=scores, cur_step=cur_step)
        return current_canvas + 1, current_canvas + 2, scores.float(), finished_denoising


class _Failing(_Collect):
    def put_bottleneck(self, kept, signals=None):
        raise RuntimeError("CUDA out of memory (the test's)")


def _steps_through(loop, streamer, count: int):
    from canvaswatch.client.diffusion_gemma import attach_bottleneck

    hook = attach_bottleneck(loop, streamer, k=2)
    canvas, finished = torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.bool)
    outputs = [loop._denoising_step(current_canvas=canvas, finished_denoising=finished, sampler=_KeywordSampler(),
                                    logits_processor=[], cur_step=count - n, scores=torch.randn(2, 3, 50))
               for n in range(count)]
    hook.detach()
    return hook, outputs


def test_monitoring_errors_in_the_hook_never_reach_generate():
    # A sampler whose accept_canvas takes its logits by keyword: the entropy wrapper could not find them
    # (IndexError into the denoising step); now the entropy comes from the returned logits.
    streamer = _Collect()
    hook, outputs = _steps_through(_KeywordLoop(), streamer, 2)
    assert len(streamer.messages) == 2 and hook.errors == 0
    assert all(out[0].tolist() == [[1, 1, 1], [1, 1, 1]] for out in outputs)
    # A failure past that (memory, a bug) loses the step, not the generation; a failure on every step
    # switches monitoring off after MAX_CONSECUTIVE_ERRORS.
    from canvaswatch.client.diffusion_gemma import MAX_CONSECUTIVE_ERRORS

    hook, outputs = _steps_through(_KeywordLoop(), _Failing(), MAX_CONSECUTIVE_ERRORS + 5)
    assert len(outputs) == MAX_CONSECUTIVE_ERRORS + 5
    assert hook.errors == MAX_CONSECUTIVE_ERRORS and hook.switched_off and "CUDA out of memory" in hook.last_error


def test_a_streamer_used_for_a_second_generate_says_so_before_any_step():
    streamer = _Collect()
    streamer.put(torch.tensor([[2, 9259]]))
    streamer.put_draft(logits=torch.randn(1, 3, 50))
    streamer.put(torch.tensor([[5, 6, 7]]))
    streamer.end()
    with pytest.raises(RuntimeError, match="one generate\\(\\) call"):
        streamer.put(torch.tensor([[2, 9259]]))  # the next generate()'s prompt: before its denoising starts
    assert streamer.outputs == [[5, 6, 7]]  # the first request's output untouched


def test_without_the_hook_no_sampler_signals_are_sent(vocab, tmp_path, monkeypatch):
    install_entry_point(tmp_path, monkeypatch, "recorder", "tests.recording_monitor:Recorder")
    recording_monitor.RECORDED.clear()
    running = start_sidecar(vocab, tmp_path, {"monitors": {"recorder": {}}})
    model = tiny_diffusion_gemma(CANVAS)
    try:
        streamer = CanvasWatchStreamer(running.target, request_id="dg-plain", k=2, max_pending=1000)
        model.generate(torch.tensor([[2, 9259]]), max_new_tokens=CANVAS, max_denoising_steps=2, streamer=streamer)
        [verdict] = streamer.verdicts(timeout=60)
        streamer.close()
    finally:
        running.thread.stop()
    steps = [r for r in recording_monitor.RECORDED if r["request_id"] == "dg-plain" and "final" not in r]
    assert verdict.steps_seen == len(steps) == 2
    assert all(r[key] is None for r in steps for key in ("accepted", "entropy", "argmax_ids", "canvas_ids", "temperature"))


def test_enforced_bottleneck_is_what_the_decoder_conditions_on():
    from canvaswatch.client.diffusion_gemma import attach_bottleneck

    model = tiny_diffusion_gemma(CANVAS)
    conditioned: list[torch.Tensor] = []

    def capture(module, args, kwargs):
        logits = kwargs.get("self_conditioning_logits")
        if logits is not None:
            conditioned.append(torch.isfinite(logits).sum(-1))

    handle = model.model.decoder.register_forward_pre_hook(capture, with_kwargs=True)
    hook = attach_bottleneck(model, None, k=5, enforce=True)
    model.generate(torch.tensor([[2, 9259]]), max_new_tokens=CANVAS, max_denoising_steps=4)
    hook.detach()
    handle.remove()
    assert conditioned, "the decoder never received self-conditioning logits"
    assert all(int(kept.max()) <= 5 and int(kept.min()) >= 1 for kept in conditioned)


def test_enforce_bottleneck_softmax_is_the_renormalised_kept_set():
    from canvaswatch.client.diffusion_gemma import enforce_bottleneck
    from canvaswatch.client.token_bottleneck import bottleneck

    logits = torch.randn(2, 3, 500, generator=torch.Generator().manual_seed(0)) * 3
    for top_p in (None, 0.3):
        kept = bottleneck(logits, k=6, top_p=top_p)
        enforced = torch.softmax(enforce_bottleneck(logits, kept), dim=-1)
        expected = torch.zeros_like(logits).scatter_(-1, kept.ids.long(), kept.probs / kept.probs.sum(-1, keepdim=True))
        torch.testing.assert_close(enforced, expected)
