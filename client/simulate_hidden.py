"""SIMULATED requests in the `embeddings` form: labelled traces for the `probe` monitor's evaluation.

The top-k simulator (canvaswatch.client.simulate) writes what the bottleneck
keeps; a probe reads the self-conditioning vectors themselves, so its cases
are built here as vectors: Gaussian noise per position and step, with a
concept planted along the probe's direction or near it. Definitions are
checked end to end (wire form, dense decoding, probe, eval); these are not
a real model's vectors.

Scenarios (`labels` names the monitors that should flag the trace):
  probe_concept     a 3-position span carries the concept for 4 steps (positive)
  probe_faint       the same span carries it at a quarter of the strength (hard negative)
  probe_orthogonal  the same strength along a direction orthogonal to the probe's (hard negative)
  probe_clean       noise only
"""

from __future__ import annotations

import math
import zlib

import torch

from canvaswatch.client.simulate import SIMULATED_MODEL
from canvaswatch.client.tensors import encode_tensor
from canvaswatch.v1 import monitor_pb2 as pb

PROBE_LABEL = "concept"
PROBE_BIAS = -4.0
PROBE_THRESHOLD = 0.9
# Strengths along the direction: noise alone reaches ~3.5 (N(0, 1) over every position and
# step), the threshold needs 4 + logit(0.9) = 6.2, the concept brings 10 and the faint one 2.5
# (3.7 noise sigmas under the threshold; at a third, 3.3, noise lifted 3 of 20 over it).
CONCEPT_STRENGTH = 10.0
FAINT_STRENGTH = CONCEPT_STRENGTH / 4

HIDDEN_SCENARIOS: dict[str, tuple[str, ...]] = {
    "probe_concept": ("probe",),
    "probe_faint": (),
    "probe_orthogonal": (),
    "probe_clean": (),
}


def probe_direction(hidden_size: int, seed: int = 0) -> torch.Tensor:
    """The unit direction the probe reads (and the scenarios plant)."""
    direction = torch.randn(hidden_size, generator=torch.Generator().manual_seed(seed))
    return direction / direction.norm()


def probe_tensors(direction: torch.Tensor) -> dict[str, torch.Tensor]:
    """The probe file's tensors (save with safetensors.torch.save_file)."""
    return {f"{PROBE_LABEL}.direction": direction.float(), f"{PROBE_LABEL}.bias": torch.tensor(PROBE_BIAS),
            f"{PROBE_LABEL}.threshold": torch.tensor(PROBE_THRESHOLD)}


def hidden_trace(kind: str, direction: torch.Tensor, *, request_id: str, seed: int = 0,
                 canvas_length: int = 32, steps: int = 12) -> pb.Trace:
    if kind not in HIDDEN_SCENARIOS:
        raise ValueError(f"unknown scenario {kind!r}; expected one of {tuple(HIDDEN_SCENARIOS)}")
    generator = torch.Generator().manual_seed(zlib.crc32(f"{kind}-{seed}".encode()))
    d = direction.shape[0]
    planted = direction
    strength = {"probe_concept": CONCEPT_STRENGTH, "probe_faint": FAINT_STRENGTH,
                "probe_orthogonal": CONCEPT_STRENGTH, "probe_clean": 0.0}[kind]
    if kind == "probe_orthogonal":
        other = torch.randn(d, generator=generator)
        other -= (other @ direction) * direction
        planted = other / other.norm()
    start = int(torch.randint(0, canvas_length - 3, (1,), generator=generator))
    first = steps // 3
    info = pb.RequestInfo(request_id=request_id, model=SIMULATED_MODEL, canvas_length=canvas_length,
                          total_steps=steps,
                          attributes={"scenario": kind, "labels": ",".join(HIDDEN_SCENARIOS[kind]),
                                      "simulated": "true"})
    messages = []
    for step in range(steps):
        hidden = torch.randn(canvas_length, d, generator=generator)
        if first <= step < first + 4:
            hidden[start : start + 3] += strength * planted
        messages.append(pb.StepState(step=step, embeddings=encode_tensor(hidden)))
    messages.append(pb.StepState(final=True, output_ids=[0] * canvas_length))
    return pb.Trace(info=info, steps=messages)


def hidden_corpus(direction: torch.Tensor, *, per_scenario: int = 10, seed: int = 0,
                  canvas_length: int = 32, steps: int = 12) -> list[pb.Trace]:
    """Every scenario `per_scenario` times with different seeds."""
    if not math.isclose(float(direction.norm()), 1.0, rel_tol=1e-5):
        raise ValueError(f"direction must be a unit vector, its norm is {float(direction.norm()):.4f}")
    return [hidden_trace(kind, direction, request_id=f"probe-{kind}-{i:03d}", seed=seed * 1000 + i,
                         canvas_length=canvas_length, steps=steps)
            for kind in HIDDEN_SCENARIOS for i in range(per_scenario)]
