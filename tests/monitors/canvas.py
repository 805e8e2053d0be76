"""Build DecodedSteps by hand: canvases that show a phenomenon, or a hard negative, step by step."""

from __future__ import annotations

import numpy as np
import torch

from canvaswatch.monitors.base import DecodedStep


def canvas_step(top1: list[int], prob: float | list[float], *, block: int = 0, step: int = 0, vocab,
                alternatives: dict[int, list[tuple[int, float]]] | None = None, k: int = 4,
                filler: int = 5000, accepted: list[bool] | None = None,
                argmax: list[int] | None = None) -> DecodedStep:
    """A step whose top-1 is `top1` with `prob`; `alternatives` adds (id, prob) runners-up per position;
    `accepted` / `argmax` are the sampler's signals (absent unless given)."""
    length = len(top1)
    ids = torch.full((length, k), filler, dtype=torch.long) + torch.arange(k)  # distinct filler per slot
    probs = torch.zeros(length, k)
    ids[:, 0] = torch.tensor(top1)
    probs[:, 0] = torch.tensor(prob if isinstance(prob, list) else [prob] * length)
    for position, extra in (alternatives or {}).items():
        for slot, (token, p) in enumerate(extra, start=1):
            ids[position, slot] = token
            probs[position, slot] = p
    return DecodedStep(block=block, step=step, ids=ids, probs=probs, vocab=vocab,
                       accepted=None if accepted is None else np.array(accepted, dtype=bool),
                       argmax_ids=None if argmax is None else np.array(argmax, dtype=np.int64))
