"""Serving-loop overhead of the canvaswatch client on transformers' DiffusionGemma generate().

    python bench/client_overhead.py                 # tiny model, CPU
    python bench/client_overhead.py --size medium   # on a GPU: hidden 1024, 8 layers, canvas 256

Modes, each timed on the same model and prompt, in one run:
  baseline   generate() with no streamer
  logits     CanvasWatchStreamer: transformers copies the [B, L, V] logits to the CPU every step
  device     attach_bottleneck(): top-k on the model's device, only [B, L, k] leaves it
  enforce    as device, and the model conditions on the bottlenecked distribution
A real sidecar runs in-process on loopback (a synthetic word-level vocabulary of
the model's size, so no download is needed). Prints ms per denoising step, the
ratio to baseline, and bytes per step copied off the model's device for the monitor.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from tokenizers import Tokenizer, models

from canvaswatch.client.diffusion_gemma import CanvasWatchStreamer, attach_bottleneck
from canvaswatch.server.app import SidecarThread
from canvaswatch.server.config import parse_config

SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 head_dim=32, global_head_dim=32, num_experts=4, top_k_experts=2, moe_intermediate_size=64, canvas=16),
    "medium": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                   head_dim=128, global_head_dim=128, num_experts=8, top_k_experts=2, moe_intermediate_size=1024, canvas=256),
}


def build_model(size: str, device: str):
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    spec = dict(SIZES[size])
    canvas = spec.pop("canvas")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=16)
    config = DiffusionGemmaConfig(text_config=dict(vocab_size=262_144, **spec), vision_config=vision, canvas_length=canvas)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return DiffusionGemmaForBlockDiffusion(config).eval().to(device=device, dtype=dtype), canvas


def synthetic_vocab_dir(size: int) -> str:
    directory = tempfile.mkdtemp(prefix="cw-vocab-")
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(size)}, unk_token="t0")).save(f"{directory}/tokenizer.json")
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=16, help="max_denoising_steps per block")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--k", type=int, default=8)
    args = parser.parse_args()

    model, canvas = build_model(args.size, args.device)
    config = parse_config({"server": {"grpc_port": 0, "metrics_port": -1, "workers": 4},
                           "vocab": {"tokenizer": synthetic_vocab_dir(262_144)}, "dense": {"embeddings": ""},
                           "logging": {"level": "warning"}, "monitors": {"lexicon": {"patterns": ["t5 t6 t7"], "regex": []},
                                                                        "self_correction": {}}})
    sidecar = SidecarThread(config).start()
    prompt = torch.tensor([[2, 100, 200, 300]], device=args.device)

    def run(mode: str) -> tuple[float, int, int]:
        streamer = hook = None
        if mode != "baseline":
            streamer = CanvasWatchStreamer(sidecar.target, k=args.k, max_pending=64)
            if mode in ("device", "enforce"):
                hook = attach_bottleneck(model, streamer, enforce=mode == "enforce")
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=args.blocks * canvas, max_denoising_steps=args.steps, streamer=streamer)
        if args.device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        steps = dropped = 0
        if hook is not None:
            hook.detach()
        if streamer is not None:
            verdicts = streamer.verdicts(timeout=120)
            steps, dropped = streamer.steps_sent, sum(v.steps_dropped for v in verdicts)
            streamer.close()
        return elapsed, steps, dropped

    run("baseline")  # warm-up: kernels, allocator
    results = {}
    for mode in ("baseline", "logits", "device", "enforce"):
        times = [run(mode) for _ in range(args.repeat)]
        results[mode] = min(times, key=lambda t: t[0]) + (max(t[0] for t in times),)
    steps_per_run = args.blocks * args.steps
    base = results["baseline"][0]
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"# client overhead: DiffusionGemma {args.size} (canvas {canvas}, V=262144), {args.blocks} blocks x "
          f"{args.steps} steps, best of {args.repeat}, device {name}")
    print("| mode | ms/step (best) | ms/step (worst) | x baseline (best) | bytes/step off device | steps sent | dropped |")
    print("|---|---|---|---|---|---|---|")
    off_device = {"baseline": 0, "logits": canvas * 262_144 * 4, "device": canvas * args.k * 8, "enforce": canvas * args.k * 8}
    for mode, (best, steps, dropped, worst) in results.items():
        print(f"| {mode} | {best / steps_per_run * 1e3:.2f} | {worst / steps_per_run * 1e3:.2f} | {best / base:.3f} | "
              f"{off_device[mode]:,} | {steps} | {dropped} |")
    sidecar.stop()


if __name__ == "__main__":
    main()
