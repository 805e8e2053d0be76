"""A test monitor that raises one CRITICAL flag at a chosen step: a planted trigger for gate-mode tests."""

from __future__ import annotations

from dataclasses import dataclass

from canvaswatch.monitors.base import Evidence, Monitor


@dataclass(frozen=True)
class TriggerParams:
    at_step: int = 1
    request_prefix: str = "gate-bad"
    also_prefix: str = ""  # a second prefix (e.g. "req#" for the resumed stream of a preempted request only)


class Trigger(Monitor):
    """Raises CRITICAL at block 0, step `at_step` of requests whose id starts with `request_prefix` (tests only)."""

    name = "trigger"
    Params = TriggerParams

    def start(self, request):
        rid = request.request_id
        return rid.startswith(self.params.request_prefix) or bool(self.params.also_prefix and
                                                                   rid.startswith(self.params.also_prefix))

    def on_step(self, state, step):
        if state and step.block == 0 and step.step == self.params.at_step:
            return [self.flag("critical", "planted trigger", Evidence(step.block, step.step, (0,), ""))]
        return []
