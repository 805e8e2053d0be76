"""Micro-batching across streams: dense steps/s with and without a batch window, same run.

    python bench/dense_batching.py --device cuda [--streams 16] [--length 16]

N threads (one per stream) each decode `--steps` embeddings steps of L rows,
first each on its own (window 0: one launch per step), then through
DenseBatcher with a short window (concurrent steps share a launch).
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from canvaswatch.server.bottleneck.dense import DenseDecoder
from canvaswatch.server.bottleneck.batching import DenseBatcher


def run(decode, streams: int, steps: int, hidden: list[torch.Tensor], sync) -> float:
    barrier = threading.Barrier(streams + 1)

    def worker(index: int) -> None:
        barrier.wait()
        for _ in range(steps):
            kept = decode(hidden[index])
            kept.ids.cpu()  # a sidecar step hands the canvas to CPU monitors

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    sync()
    return streams * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--dim", type=int, default=640)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--window-ms", type=float, default=1.0)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    E = (torch.randn(262_144, args.dim, device=args.device) * 0.03).to(dtype)
    decoder = DenseDecoder(E, 262_144, k=8)
    hidden = [torch.randn(args.length, args.dim, device=args.device).to(dtype) for _ in range(args.streams)]
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    for rows in (args.length * n for n in range(1, args.streams + 1)):  # warm-up: tune every batch size once
        decoder.decode_embeddings(torch.randn(rows, args.dim, device=args.device).to(dtype))
    alone = run(decoder.decode_embeddings, args.streams, args.steps, hidden, sync)
    batcher = DenseBatcher(decoder, window_s=args.window_ms / 1000)
    batched = run(batcher.decode_embeddings, args.streams, args.steps, hidden, sync)
    batcher.close()
    print(f"# {args.streams} streams x L={args.length}, d={args.dim}, V=262144, backend {decoder.backend}, device {args.device}")
    print(f"| window | steps/s | x unbatched | launches per step |")
    print("|---|---|---|---|")
    print(f"| none (one launch per step) | {alone:.0f} | 1.00 | 1.00 |")
    print(f"| {args.window_ms} ms | {batched:.0f} | {batched / alone:.2f} | {batcher.launches / batcher.requests:.2f} |")


if __name__ == "__main__":
    main()
