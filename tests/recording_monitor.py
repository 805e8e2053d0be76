"""A test monitor that records what reached it, installed through a real entry point by tests."""

from __future__ import annotations

from dataclasses import dataclass

RECORDED: list[dict] = []


@dataclass(frozen=True)
class RecorderParams:
    label: str = "recorder"


class Recorder:
    name = "recorder"
    description = "records every decoded step (tests only)"
    Params = RecorderParams

    def __init__(self, params: RecorderParams) -> None:
        self.params = params

    def start(self, request):
        return request

    def on_step(self, state, step):
        RECORDED.append({
            "request_id": state.request_id, "block": step.block, "step": step.step,
            "length": step.canvas_length, "vocab": step.vocab.size, "k": int(step.ids.shape[1]),
            "top1": step.top1.tolist(), "max_id": int(step.ids.max()),
            # most tokens with a probability > 0 at any position, and the largest kept mass
            "live": int((step.probs > 0).sum(-1).max()), "kept_max": float(step.probs.sum(-1).max()),
            # the sampler's signals, None when the client did not send them
            "accepted": _listed(step.accepted), "entropy": _listed(step.entropy),
            "argmax_ids": _listed(step.argmax_ids), "canvas_ids": _listed(step.canvas_ids),
            "temperature": step.temperature,
        })
        return []

    def on_finish(self, state, final):
        RECORDED.append({"request_id": state.request_id, "final": list(final.output_ids)})
        return []


def _listed(values):
    return None if values is None else values.tolist()
