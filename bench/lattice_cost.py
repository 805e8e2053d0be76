"""The lexicon's top-k lattice pass per traffic profile: the trie walk against the dense pass it replaced (issue 12).

    python bench/lattice_cost.py [--lengths 256,1024] [--steps 200] [--profiles default,hot,high_entropy]

For each profile (bench/traffic.py) and L, on the default engine's shared phrase
matcher (lexicon + intermediate_context patterns, every tokenisation), prints
per step: the kept slots (probability >= min_alt_prob), how many of them hold a
token that occurs in some pattern, and the CPU time of
  - `dense`: the pass before issue 12, reproduced here as the baseline: one
    [L x sequences] AND per token offset, run whenever any pattern token is kept
    anywhere (on real text, the canvas's own " the" and " a" are);
  - `trie`: the matcher's pass now (canvaswatch.monitors.phrases), a compiled
    walk that only kept pattern tokens advance.
Both find the same sightings (checked on every step here). Two harder variants
of the same steps: `all kept` sets every slot's probability to 1/k, so all k
tokens of every position are kept (the simulator's alternatives are vocabulary
noise, so few are pattern tokens); `all kept, pattern tokens` also replaces every
alternative (slots 2..k) by a random token of the patterns, the adversarial
bound: the trie's work grows with those, as it must, the dense pass's does not.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from monitor_cost import decode_all  # noqa: E402
from traffic import K, PROFILE_NAMES, profile_steps  # noqa: E402

from canvaswatch.monitors.base import DecodedStep  # noqa: E402
from canvaswatch.monitors.phrases import PhraseMatcher  # noqa: E402
from canvaswatch.server.bottleneck.dense import DenseDecoder  # noqa: E402
from canvaswatch.server.bottleneck.vocab import load_vocabulary  # noqa: E402
from canvaswatch.server.config import default_config  # noqa: E402
from canvaswatch.server.pipeline.engine import Engine  # noqa: E402


def dense_hits(ids: np.ndarray, probs: np.ndarray, lattice, threshold: float) -> set[tuple[int, int]]:
    """(start, sequence) of every sequence kept at consecutive positions: the pre-issue-12 pass."""
    columns = lattice.column_of[ids]
    if not ((columns > 0) & (probs >= threshold)).any():
        return set()
    present = (columns > 0) & (probs >= threshold)
    length, width = ids.shape[0], lattice.sequences.shape[1]
    distinct = len(lattice.tokens)
    member = np.zeros((length + width - 1, distinct + 1), dtype=bool)
    rows, slots = np.nonzero(present)
    member[rows, columns[rows, slots] - 1] = True
    member[:, distinct] = True  # the padding column past a sequence's end
    hits = np.ones((length, lattice.sequences.shape[0]), dtype=bool)
    for offset in range(width):
        hits &= member[offset : offset + length][:, lattice.sequences[:, offset]]
    return {(int(p), int(s)) for p, s in np.argwhere(hits)}


def best_of(passes: int, fn) -> float:
    best = float("inf")
    for _ in range(passes):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="256,1024")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--profiles", default=",".join(PROFILE_NAMES))
    parser.add_argument("--passes", type=int, default=5)
    args = parser.parse_args()
    vocab = load_vocabulary()
    engine = Engine(default_config(), vocab, dense=DenseDecoder(None, vocab.size))
    matcher = PhraseMatcher(m.phrase_spec for m in engine.monitors if hasattr(m, "phrase_spec"))
    lattice = matcher._lattice_for(vocab)
    threshold = max(matcher.min_alt_prob, 1e-12)
    from canvaswatch.monitors.phrases import _lattice_hits

    print(f"# top-k lattice pass, k={K}, {args.steps} SIMULATED steps, {len(lattice.lengths)} tokenisations of "
          f"{len(matcher.literals)} phrases ({len(lattice.tokens)} distinct tokens), best of {args.passes}, "
          f"CPU microseconds per step")
    print("| profile | L | kept slots/step | kept pattern-token slots/step | dense (before) | trie (now) | dense / trie |")
    print("|---|---|---|---|---|---|---|")
    for profile in args.profiles.split(","):
        for length in (int(x) for x in args.lengths.split(",")):
            steps = decode_all(engine, profile_steps(profile, length, args.steps, vocab), length)
            crowded = [DecodedStep(block=s.block, step=s.step, ids=s.ids, probs=torch.full_like(s.probs, 1.0 / K),
                                   vocab=vocab) for s in steps]
            generator = torch.Generator().manual_seed(length)
            adversarial = []
            for s in crowded:
                ids = s.ids.clone()
                pick = torch.randint(0, len(lattice.tokens), (length, K - 1), generator=generator)
                ids[:, 1:] = torch.from_numpy(lattice.tokens)[pick]
                adversarial.append(DecodedStep(block=s.block, step=s.step, ids=ids, probs=s.probs, vocab=vocab))
            for name, rows in ((profile, steps), (f"{profile}, all kept", crowded),
                               (f"{profile}, all kept, pattern tokens", adversarial)):
                arrays = [(s.ids_np, s.probs_np) for s in rows]
                for ids, probs in arrays:
                    starts, sequences = _lattice_hits(ids, probs, lattice, threshold)
                    assert set(zip(starts.tolist(), sequences.tolist())) == dense_hits(ids, probs, lattice, threshold)
                kept = np.mean([(p >= threshold).sum() for _, p in arrays])
                pattern = np.mean([((p >= threshold) & (lattice.column_of[i] > 0)).sum() for i, p in arrays])
                dense = best_of(args.passes, lambda: [dense_hits(i, p, lattice, threshold) for i, p in arrays])
                trie = best_of(args.passes, lambda: [_lattice_hits(i, p, lattice, threshold) for i, p in arrays])
                dense, trie = dense / len(arrays) * 1e6, trie / len(arrays) * 1e6
                print(f"| {name} | {length} | {kept:.0f} | {pattern:.0f} | {dense:.0f} | {trie:.0f} | "
                      f"{dense / trie:.0f}x |", flush=True)


if __name__ == "__main__":
    main()
