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
from tests.conftest import install_entry_point, start_sidecar

transformers = pytest.importorskip("transformers")

CANVAS = 16
STEPS = 6


def tiny_diffusion_gemma():
    torch.manual_seed(0)
    text = dict(vocab_size=262_144, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=32, global_head_dim=32,
                num_experts=4, top_k_experts=2, moe_intermediate_size=64)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16)
    config = transformers.DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=CANVAS)
    return transformers.DiffusionGemmaForBlockDiffusion(config).eval()


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
    model = tiny_diffusion_gemma()
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
    model = tiny_diffusion_gemma()
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


def test_enforced_bottleneck_is_what_the_decoder_conditions_on():
    from canvaswatch.client.diffusion_gemma import attach_bottleneck

    model = tiny_diffusion_gemma()
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
