"""Test monitors that take too long: a sleeper, one that blocks until released, one that never returns.

Installed through entry points by tests/server/test_isolation.py (and bench/abuse_latency.py); each
acts only on requests whose id starts with its `request_prefix`, so other streams of the same
sidecar are monitored as usual.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from canvaswatch.monitors.base import Monitor

# Set by a test to let Blocking and Runaway calls return (in-process only: a worker never sees it).
RELEASE = threading.Event()


@dataclass(frozen=True)
class SlowParams:
    request_prefix: str = "slow"
    seconds: float = 0.2  # Sleepy: per step


class Sleepy(Monitor):
    """Sleeps `seconds` in every step of matching requests (a monitor calling a slow service)."""

    name = "sleepy"
    Params = SlowParams

    def start(self, request):
        return {"slow": request.request_id.startswith(self.params.request_prefix), "steps": 0}

    def on_step(self, state, step):
        state["steps"] += 1
        if state["slow"]:
            time.sleep(self.params.seconds)
        return []


class Blocking(Monitor):
    """Blocks (without the GIL) in the first step of matching requests until RELEASE is set."""

    name = "blocking"
    Params = SlowParams

    def start(self, request):
        return request.request_id.startswith(self.params.request_prefix)

    def on_step(self, state, step):
        if state:
            RELEASE.wait()
        return []


class Runaway(Monitor):
    """Spins in pure Python in the first step of matching requests: forever in a worker process,
    until RELEASE is set in-process (so a test does not leave a spinning thread behind)."""

    name = "runaway"
    Params = SlowParams

    def start(self, request):
        return request.request_id.startswith(self.params.request_prefix)

    def on_step(self, state, step):
        spins = 0
        while state and not RELEASE.is_set():
            spins += 1
        return []


@dataclass(frozen=True)
class StormParams:
    request_prefix: str = "storm"
    per_step: int = 50


class Storm(Monitor):
    """Raises `per_step` INFO flags on every step of matching requests (a flag storm)."""

    name = "storm"
    Params = StormParams

    def start(self, request):
        return request.request_id.startswith(self.params.request_prefix)

    def on_step(self, state, step):
        if not state:
            return []
        return [self.flag("info", f"storm flag {i} at step {step.step}") for i in range(self.params.per_step)]
