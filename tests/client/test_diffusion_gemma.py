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
