"""Dense decode benchmark: embeddings [L, d] -> exact top-k over V = 262,144, against baselines in the same run.

    python bench/dense_decode.py --device cpu  [--shapes 256x640,1024x640] [--repeat 3]
    python bench/dense_decode.py --device cuda

Per shape it times, on the same matrices:
  bare     H @ Eᵀ alone (the matmul every method must do; the floor)
  naive    H @ Eᵀ, then logsumexp and topk over the materialised [L, V] logits
  chunked  canvaswatch's chunked torch path (bounded memory; the CPU path)
  fused    canvaswatch's Triton kernel (CUDA only)
and prints per-step milliseconds, steps/s and each method's ratio to bare.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from canvaswatch.server.bottleneck.projection import Projection, project_topk_chunked

V = 262_144


def _timer(device: str, repeat: int):
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=200)

    def cpu_time(fn):
        fn()
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best * 1e3

    return cpu_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="256x640,1024x640,256x2816,1024x2816")
    parser.add_argument("--repeat", type=int, default=3, help="CPU: best of N")
    parser.add_argument("--k", type=int, default=8)
    args = parser.parse_args()
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    timer = _timer(device, args.repeat)
    name = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    print(f"# dense decode, V={V}, k={args.k}, {dtype}, device: {name}, torch {torch.__version__}")
    print("| L | d | bare ms | naive ms (x bare) | chunked ms (x bare) | fused ms (x bare) | fused steps/s |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        L, d = (int(x) for x in shape.split("x"))
        generator = torch.Generator(device=device).manual_seed(0)
        E = (torch.randn(V, d, device=device, generator=generator) * 0.03).to(dtype)
        H = torch.randn(L, d, device=device, generator=generator).to(dtype)
        bare = timer(lambda: H @ E.T)

        def naive():
            logits = (H @ E.T).float()
            return torch.logsumexp(logits, -1), torch.topk(logits, args.k, -1)

        naive_ms = timer(naive)
        chunked_ms = timer(lambda: project_topk_chunked(H, E, args.k, Projection()))
        fused = "n/a"
        rate = f"{1e3 / chunked_ms:.2f} (chunked)"
        if device == "cuda":
            from canvaswatch.server.bottleneck.fused_triton import fused_topk

            fused_ms = timer(lambda: fused_topk(H, E, args.k))
            fused = f"{fused_ms:.3f} ({fused_ms / bare:.2f}x)"
            rate = f"{1e3 / fused_ms:.0f}"
        print(f"| {L} | {d} | {bare:.3f} | {naive_ms:.3f} ({naive_ms / bare:.2f}x) | "
              f"{chunked_ms:.3f} ({chunked_ms / bare:.2f}x) | {fused} | {rate} |", flush=True)
        del E, H


if __name__ == "__main__":
    main()
