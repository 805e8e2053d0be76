"""CPU exact top-k: the int8-screened decoder against the float32 brute force, on real Gemma states.

    pip install accelerate   # transformers needs it to load a GGUF model
    python bench/screened_decode.py [--lengths 256,1024] [--repeat 5]

Matrix: the real Gemma 3 270M embedding matrix (262,144 x 640, as stored).
States: the real model's final hidden states (the vectors it projects onto
that matrix) for the bundled texts, run through Gemma 3 270M itself, loaded
from the same GGUF (~50 s, once). Per length L it times, best of --repeat rounds that run
the methods in turn:
  bare      fp32 H @ E^T alone
  topk      bare + topk            (the brute force for top-k ids and logits)
  naive     bare + logsumexp + topk (the brute force with probabilities)
  screened  canvaswatch.server.bottleneck.screened, top-k only, and with log Z
and checks that the screen's ids equal the float64 brute force's.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from canvaswatch.client.simulate import corpus
from canvaswatch.server.bottleneck.screened import ScreenedIndex
from canvaswatch.server.bottleneck.embedding import load_embedding_matrix
from canvaswatch.server.bottleneck.vocab import cache_dir, default_gguf_path


def gemma_hidden_states(length: int) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    from tokenizers import Tokenizer

    gguf = default_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = Tokenizer.from_file(str(cache_dir() / "gemma3-270m" / "tokenizer.json"))
    ids: list[int] = []
    while len(ids) < length:
        ids += tokenizer.encode(" ".join(corpus())).ids
    with torch.no_grad():
        out = model(torch.tensor([[2] + ids[: length - 1]]), output_hidden_states=True)
    return out.hidden_states[-1][0].contiguous()


def best_interleaved(functions, repeat: int) -> list[float]:
    """Best milliseconds of each function over `repeat` rounds that run them in turn.

    Round-robin rather than one function's repeats in a block: on a shared machine
    whose speed drifts, each method then sees the same conditions as the others.
    """
    best = [float("inf")] * len(functions)
    for fn in functions:
        fn()  # warm-up
    for _ in range(repeat):
        for i, fn in enumerate(functions):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return [b * 1e3 for b in best]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="256,1024")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--k", type=int, default=8)
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    stored = load_embedding_matrix()
    matrix = stored.float()
    states = gemma_hidden_states(max(lengths))
    started = time.perf_counter()
    index = ScreenedIndex(stored)
    print(f"# CPU exact top-k, real Gemma 3 270M matrix and hidden states, k={args.k}, "
          f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"index built in {time.perf_counter() - started:.1f} s")
    print("| L | bare ms | topk ms | naive ms | screened top-k ms (x topk) | screened + log Z ms (x naive) "
          "| rescored/position (median) | log Z error bound (median / max) | ids = float64 brute force |")
    print("|---|---|---|---|---|---|---|---|---|")
    for length in lengths:
        hidden = states[:length]

        def naive():
            logits = hidden @ matrix.T
            return torch.logsumexp(logits, 1), torch.topk(logits, args.k, dim=1)

        bare, topk, naive_ms, screened, with_z = best_interleaved([
            lambda: hidden @ matrix.T,
            lambda: torch.topk(hidden @ matrix.T, args.k, dim=1),
            naive,
            lambda: index.topk(hidden, args.k, with_log_z=False),
            lambda: index.topk(hidden, args.k),
        ], args.repeat)
        found = index.topk(hidden, args.k)
        reference = torch.sort(hidden.double() @ stored.double().T, dim=1, descending=True, stable=True).indices
        same = torch.equal(found.ids, reference[:, : args.k])
        print(f"| {length} | {bare:.0f} | {topk:.0f} | {naive_ms:.0f} | {screened:.0f} ({topk / screened:.2f}x) | "
              f"{with_z:.0f} ({naive_ms / with_z:.2f}x) | {found.rescored.median().item():.0f} | "
              f"{found.log_z_error.median().item():.3f} / {found.log_z_error.max().item():.3f} | {same} |", flush=True)


if __name__ == "__main__":
    main()
