"""A request's memory is bounded by canvas size, not by how many steps it runs."""

from __future__ import annotations

import torch

from canvaswatch.monitors.base import DecodedStep
from canvaswatch.server.config import default_config
from canvaswatch.server.pipeline.engine import Engine
from canvaswatch.v1 import monitor_pb2 as pb


def _footprint(value, seen=None) -> int:
    """Bytes of tensors plus element counts of containers reachable from value."""
    seen = seen if seen is not None else set()
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return len(value) + sum(_footprint(v, seen) for v in value.values())
    if isinstance(value, (list, tuple, set)):
        return len(value) + sum(_footprint(v, seen) for v in value)
    if hasattr(value, "__dict__") and not isinstance(value, type):
        return _footprint(vars(value), seen)
    return 0


def test_session_state_does_not_grow_with_steps(vocab):
    engine = Engine(default_config(), vocab)
    session = engine.open(pb.RequestInfo(request_id="mem", canvas_length=64), "info")
    generator = torch.Generator().manual_seed(0)
    sizes = {}
    for step in range(1000):
        ids = torch.randint(1000, vocab.size, (64, 8), generator=generator)
        probs = torch.full((64, 8), 0.05)
        session.on_step(DecodedStep(block=step // 100, step=step % 100, ids=ids, probs=probs, vocab=vocab))
        if step + 1 in (100, 1000):
            sizes[step + 1] = _footprint(session.states)
    assert session.steps_seen == 1000
    assert sizes[1000] == sizes[100] > 0
