"""A run rebuilt step by step, and how it becomes a `canvaswatch.v1.Trace`.

Every format importer produces a `RebuiltRun`: per step the argmax canvas
(real ids where the capture has them), which positions are decided, the final
canvas, and each position's role. This module adds what no capture records,
by fixed rules, and writes the trace:

Alternatives (top-k slots 2..k). Slot 1 is the argmax. The other slots are
filled, skipping ids already in the row, from in order:
  1. the position's final token (the token it ends on is the natural runner-up
     before it commits);
  2. the position's argmax one step earlier (at step 0: one step later), the
     token it is moving from;
  3. final tokens of other positions of the same canvas, drawn at random per
     position (fixed over steps, seeded) from positions at least 2 away.
     Never a neighbour's token: a neighbour's id in the top-k with split mass
     is exactly what token smearing means, and the captures do not say where
     smearing happened, so the fill must not invent it.
Rows that run out of distinct candidates (tiny canvases) are padded with
probability 0 and id 0, the wire's padding.

Probabilities come from the selected rule (rules.py). Steps are block 0,
steps 0..T-1 in the `topk` form (ids INT32 [L, k], probs FLOAT32 [L, k]),
followed by a final message (step T, `final`, `output_ids` = the whole final
canvas, padding included, exactly as the capture ends). `RequestInfo` rides on
the trace and on the first step.

Sampler signals (StepState fields 24-27; on unless `signals=False`), each
with where it comes from in the `signals` attribute:
  - argmax_ids INT32 [L]: the argmax canvas, i.e. top-k slot 1 (real ids in
    gallery.json; rebuilt by commit_order.py elsewhere);
  - accepted UINT8 [L]: the decided mask: gallery.json's real `committed`;
    elsewhere "at or after the position's lock step" (derived);
  - entropy FLOAT16 [L]: the rule's (rules.py `entropies`);
  - temperature: only where the capture records the sampler (gallery.json's
    `params`): linear from t_max at step 0 to t_min at step T-1, the
    DiffusionGemma schedule. Not sent where unrecorded.

Randomness is seeded from the request id (CRC-32) and the user's `seed`, so an
import is reproducible and two runs of the same file give identical traces.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from canvaswatch.client.tensors import encode_tensor
from canvaswatch.v1 import monitor_pb2 as pb

MODEL = "google/diffusiongemma-26B-A4B-it"

# Which entropy curve a position follows under the entropy rule (rules.py).
ROLE_OTHER = 0      # template and padding: channel header, end of turn, <pad>
ROLE_REASONING = 1  # reasoning (clean.json cot_pos) and, where nothing finer is known, all content
ROLE_ANSWER = 2     # clean.json ans_pos


@dataclass(frozen=True)
class RebuiltRun:
    """One captured run, step by step, before probabilities are filled in."""

    name: str                # the run's name in its file (request id suffix)
    argmax: np.ndarray       # [T, L] int64: top-1 token at every step
    decided: np.ndarray      # [T, L] bool: accepted by the sampler / at or after the position's lock step
    final: np.ndarray        # [L] int64: the output canvas
    roles: np.ndarray        # [L] int8: ROLE_*
    attributes: dict[str, str] = field(default_factory=dict)
    curve_key: str | None = None         # anim_curves.json problem whose curves this run follows
    prompt_ids: tuple[int, ...] = ()
    temperature: np.ndarray | None = None  # [T] where the capture records the sampler's schedule
    accepted_source: str = "derived"       # "real" where `decided` is the sampler's own accepted mask

    def __post_init__(self) -> None:
        steps, length = self.argmax.shape
        if self.decided.shape != (steps, length) or self.final.shape != (length,) or self.roles.shape != (length,):
            raise ValueError(f"{self.name}: argmax {self.argmax.shape}, decided {self.decided.shape}, "
                             f"final {self.final.shape}, roles {self.roles.shape} disagree")


class ProbabilityRule(Protocol):
    """Fills the probabilities of a run's top-k rows: [T, L, k] float32, each row non-increasing, sum <= 1."""

    name: str

    def probabilities(self, run: RebuiltRun, k: int, rng: np.random.Generator) -> np.ndarray: ...

    def entropies(self, run: RebuiltRun, probs: np.ndarray) -> np.ndarray:
        """[T, L] per-position entropy (nats) of the distributions behind `probs`."""
        ...


def run_rng(request_id: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(request_id.encode("utf-8")), seed])


def alternatives(run: RebuiltRun, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ids [T, L, k] (slot 0 = argmax) and which slots hold a token (the rest is padding)."""
    steps, length = run.argmax.shape
    ids = np.zeros((steps, length, k), dtype=np.int64)
    valid = np.zeros((steps, length, k), dtype=bool)
    ids[..., 0] = run.argmax
    valid[..., 0] = True
    if k == 1:
        return ids, valid
    previous = np.empty_like(run.argmax)
    previous[1:] = run.argmax[:-1]
    previous[0] = run.argmax[1] if steps > 1 else run.argmax[0]
    candidates = [np.broadcast_to(run.final, (steps, length)), previous]
    if length >= 4:
        # offsets in [2, L-2] (mod L): the drawn position is never the position itself nor a neighbour
        for _ in range(k):
            offset = rng.integers(2, length - 1, size=length)
            other = run.final[(np.arange(length) + offset) % length]
            candidates.append(np.broadcast_to(other, (steps, length)))
    filled = np.ones((steps, length), dtype=np.int64)
    for column in candidates:
        duplicate = ((ids == column[..., None]) & valid).any(axis=-1)
        room = ~duplicate & (filled < k)
        rows = np.nonzero(room)
        slot = filled[rows]
        ids[rows + (slot,)] = column[rows]
        valid[rows + (slot,)] = True
        filled[rows] += 1
    return ids, valid


def to_trace(run: RebuiltRun, rule: ProbabilityRule, *, k: int, seed: int, format_name: str,
             source: str, extra: dict[str, str] | None = None, signals: bool = True) -> pb.Trace:
    """The run as a Trace: T top-k steps and a final message carrying the final canvas."""
    request_id = f"real-{format_name}-{run.name}"
    rng = run_rng(request_id, seed)
    ids, valid = alternatives(run, k, rng)
    probs = rule.probabilities(run, k, rng)
    probs = np.where(valid, probs, 0.0).astype(np.float32)
    ids = np.where(valid, ids, 0).astype(np.int32)
    steps, length = run.argmax.shape
    attributes = {"source": f"real:{source}", "format": format_name, "rule": rule.name, "k": str(k),
                  "name": run.name, **run.attributes, **(extra or {})}
    if signals:
        attributes["signals"] = (f"argmax_ids:{'real' if run.accepted_source == 'real' else 'rebuilt'},"
                                 f"accepted:{run.accepted_source},entropy:rule:{rule.name}"
                                 + (",temperature:params" if run.temperature is not None else ""))
        entropy = torch.from_numpy(np.clip(rule.entropies(run, probs), 0.0, 65000.0).astype(np.float16))
        accepted = torch.from_numpy(run.decided.astype(np.uint8))
        argmax = torch.from_numpy(run.argmax.astype(np.int32))
    info = pb.RequestInfo(request_id=request_id, model=MODEL, prompt_ids=list(run.prompt_ids),
                          canvas_length=length, total_steps=steps, attributes=attributes)
    trace = pb.Trace(info=info)
    ids_t = torch.from_numpy(ids)
    probs_t = torch.from_numpy(probs)
    for step in range(steps):
        message = pb.StepState(block=0, step=step,
                               topk=pb.TopK(ids=encode_tensor(ids_t[step]), probs=encode_tensor(probs_t[step])))
        if signals:
            message.accepted.CopyFrom(encode_tensor(accepted[step]))
            message.entropy.CopyFrom(encode_tensor(entropy[step]))
            message.argmax_ids.CopyFrom(encode_tensor(argmax[step]))
            if run.temperature is not None:
                message.temperature = float(run.temperature[step])
        if step == 0:
            message.info.CopyFrom(info)
        trace.steps.append(message)
    trace.steps.append(pb.StepState(block=0, step=steps, final=True, output_ids=run.final.tolist()))
    return trace
