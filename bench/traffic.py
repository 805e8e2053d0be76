"""The benchmarks' top-k traffic: the simulator's calibrated profiles at any canvas length (SIMULATED).

    from traffic import PROFILE_NAMES, profile_steps
    steps = profile_steps("high_entropy", length=1024, steps=200, vocab=load_vocabulary())

What a benchmark stream is. One request of `steps` StepStates, top-k form, k = 8,
made by canvaswatch.client.simulate with a calibrated profile
(client/simulate_profiles.py): the ids and probabilities of every slot follow
the profile's commit order, drafts, changes per step and kept mass.

How a canvas of any length is filled. The simulator denoises a given text
(tokenised by the real Gemma vocabulary) and pads the canvas past its end, so
the bundled texts (client/data/texts.txt, ~515 tokens in all) are tiled: joined
by blank lines in a seeded shuffle, the shuffle repeated, until the text covers
every position of every block. Every position is content, none is padding.

How `steps` steps are filled. A real request denoises each block in the
profile's own number of steps (`natural_steps`: 48 default, 64 hot and
high_entropy), so a stream is consecutive blocks of that many steps, cut at
`steps` (200 steps = 4 blocks and part of a 5th at the default profile).
One block of 200 steps would instead be settled, and cheap, for ~150 of them.

`synthetic` is the generator the benchmarks used before issue 12 (a text
settling left to right at a fixed rate over uniform noise, every undecided
slot under 0.09/8): kept for comparison with the older figures.
"""

from __future__ import annotations

import random

import torch

from canvaswatch.client import simulate
from canvaswatch.client.simulate_profiles import get_profile
from canvaswatch.client.tensors import encode_tensor
from canvaswatch.monitors.base import Vocabulary
from canvaswatch.v1 import monitor_pb2 as pb

PROFILE_NAMES = ("default", "hot", "high_entropy")  # what --profiles runs unless told
K = 8


def profile_steps(profile: str, length: int, steps: int, vocab: Vocabulary, seed: int = 0) -> list[pb.StepState]:
    """`steps` StepStates of one simulated request on `profile` (or "synthetic"), canvas `length`, k = 8.

    Messages carry no RequestInfo; the benchmark adds its own to the first one.
    """
    if profile == "synthetic":
        return synthetic_steps(length, steps)
    natural = get_profile(profile).natural_steps
    blocks = -(-steps // natural)
    target = tiled_text(vocab, blocks * length, seed)
    spec = simulate.SimulationSpec(
        request_id=f"bench-{profile}-{length}", target_ids=target, vocab_size=vocab.size, canvas_length=length,
        steps=natural, k=K, seed=seed, profile=profile)
    trace = simulate.simulate(spec)
    out = []
    for message in trace.steps[:steps]:  # the trace's final message is past any cut
        out.append(pb.StepState(block=message.block, step=message.step, topk=message.topk))
    return out


def tiled_text(vocab: Vocabulary, tokens: int, seed: int = 0) -> tuple[int, ...]:
    """The first `tokens` token ids of the bundled texts, shuffled and repeated until long enough."""
    texts = simulate.corpus()
    rng = random.Random(seed)
    ids: list[int] = []
    while len(ids) < tokens:
        order = texts[:]
        rng.shuffle(order)
        ids += vocab.encode(("\n\n" if ids else "") + "\n\n".join(order))
    return tuple(ids[:tokens])


def synthetic_steps(length: int, steps: int, k: int = K) -> list[pb.StepState]:
    """The pre-issue-12 generator: a settling left-to-right text over uniform noise (SIMULATED)."""
    generator = torch.Generator().manual_seed(length)
    target = torch.randint(1000, 262_144, (length,), generator=generator)
    out = []
    for step in range(steps):
        ids = torch.randint(1000, 262_144, (length, k), generator=generator)
        probs = torch.sort(torch.rand(length, k, generator=generator) * (0.09 / k), descending=True).values
        settled = torch.arange(length) < (step + 1) * length // steps
        ids[:, 0] = torch.where(settled, target, ids[:, 0])
        probs[:, 0] = torch.where(settled, torch.tensor(0.9), probs[:, 0])
        out.append(pb.StepState(step=step, topk=pb.TopK(ids=encode_tensor(ids.to(torch.int32)), probs=encode_tensor(probs))))
    return out
