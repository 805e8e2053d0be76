"""Gate mode: judge a diffusion model's output before any of it leaves the serving stack.

A diffusion model releases a canvas only when it commits it, so the serving loop can (a) hold
the committed output until the sidecar's verdict, within a latency budget, and (b) stop
denoising as soon as a flag at or above a severity arrives mid-way, before the canvas that
carries the flagged content is ever committed. Streaming guardrails for autoregressive models
cannot promise either: their tokens are out before the judgement.

The gate never blocks the denoising loop while it runs: flags arrive on the stream's receiver
thread and only set an event; the loop checks it (one `Event.is_set`) at its next step and
raises `GenerationBlocked` there, so no step after the flag's arrival is computed. Only the
final hold waits, by design, and at most `budget_s`.

Every decision is counted in `Gate.decisions` (released, blocked_flag, blocked_verdict,
released_on_timeout, blocked_on_timeout) and logged.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from canvaswatch.v1 import monitor_pb2 as pb

log = logging.getLogger("canvaswatch.gate")

_SEVERITY = {"info": pb.INFO, "warning": pb.WARNING, "critical": pb.CRITICAL}


MAX_BUDGET_S = 3600.0  # a hold of more than an hour is a misconfiguration, not a budget


@dataclass(frozen=True)
class GatePolicy:
    """What the gate stops and how long it waits.

    abort_at: a flag at or above this severity mid-denoising stops generation (None: never).
    block_at: a verdict whose max_severity is at or above this blocks the output (None: never).
    hold: wait for the verdict before generate() returns its output.
    budget_s: the longest that wait may take, from the final step.
    on_timeout: "open" releases the output when no verdict came in time (counted, logged),
        "closed" blocks it.
    """

    abort_at: str | None = "critical"
    block_at: str | None = "critical"
    hold: bool = True
    budget_s: float = 0.5
    on_timeout: str = "open"

    def __post_init__(self) -> None:
        for key in ("abort_at", "block_at"):
            value = getattr(self, key)
            if value is not None and value not in _SEVERITY:
                raise ValueError(f"gate.{key}: expected one of {', '.join(_SEVERITY)} or None, got {value!r}")
        if not 0 < self.budget_s <= MAX_BUDGET_S:  # an infinite wait raised OverflowError: released unjudged at once
            raise ValueError(f"gate.budget_s: must be in (0, {MAX_BUDGET_S:g}] seconds, got {self.budget_s}")
        if self.on_timeout not in ("open", "closed"):
            raise ValueError(f"gate.on_timeout: expected 'open' or 'closed', got {self.on_timeout!r}")


class GenerationBlocked(RuntimeError):
    """The gate stopped a generation or withheld its output. `reason`: "flag" (a flag arrived
    mid-denoising), "verdict" (the verdict was too severe) or "timeout" (no verdict in time,
    fail-closed); `flags` are the flags that decided it."""

    def __init__(self, reason: str, request_ids: Sequence[str], flags: Sequence[pb.Flag]) -> None:
        names = ", ".join(sorted({f"{f.monitor} ({pb.Severity.Name(f.severity)})" for f in flags})) or "none"
        super().__init__(f"canvaswatch gate: {reason}; requests {', '.join(request_ids)}; flags: {names}")
        self.reason = reason
        self.request_ids = list(request_ids)
        self.flags = list(flags)


class Gate:
    """One generation's gate: fed the streams' events, checked by the loop, asked to release at the end."""

    def __init__(self, policy: GatePolicy | None = None) -> None:
        self.policy = policy or GatePolicy()
        self.decisions: Counter[str] = Counter()
        self._abort_at = _SEVERITY.get(self.policy.abort_at or "", None)
        self._block_at = _SEVERITY.get(self.policy.block_at or "", None)
        self._tripped = threading.Event()
        self._lock = threading.Lock()
        self._tripping: list[tuple[str, pb.Flag]] = []

    def on_event(self, event: pb.MonitorEvent) -> None:
        """The stream's receiver thread: remember a flag severe enough to stop generation."""
        if self._abort_at is None or event.WhichOneof("event") != "flag":
            return
        if event.flag.severity >= self._abort_at:
            with self._lock:
                self._tripping.append((event.request_id, event.flag))
            self._tripped.set()

    @property
    def tripped(self) -> bool:
        return self._tripped.is_set()

    def check(self) -> None:
        """The denoising loop, once a step: raises GenerationBlocked once a severe flag has arrived."""
        if self._tripped.is_set():
            with self._lock:
                tripping = list(self._tripping)
            self.decisions["blocked_flag"] += 1
            log.warning("canvaswatch gate stopped generation: %d severe flag(s)", len(tripping))
            raise GenerationBlocked("flag", sorted({rid for rid, _ in tripping}), [f for _, f in tripping])

    def release(self, streams: Sequence) -> list[pb.Verdict]:
        """After the final step: wait (at most budget_s in all) for every stream's verdict, then
        release or block. `streams`: objects with `request_id` and `result(timeout)`."""
        deadline = time.monotonic() + self.policy.budget_s
        verdicts: list[pb.Verdict] = []
        missing: list[str] = []
        for stream in streams:
            if inspect.iscoroutinefunction(getattr(stream, "result", None)):
                raise TypeError(f"Gate.release: {type(stream).__name__}.result is a coroutine; for asyncio streams "
                                "await each stream's result() and call Gate.decide(verdicts, missing)")
            try:
                verdicts.append(stream.result(max(0.0, deadline - time.monotonic())))
            except Exception:  # no verdict in time, or the stream failed: the sidecar is not answering
                missing.append(stream.request_id)
        decision, flags = self.decide(verdicts, missing)
        if decision == "blocked_verdict":
            raise GenerationBlocked("verdict", sorted({v.request_id for v in verdicts}), flags)
        if decision == "blocked_on_timeout":
            raise GenerationBlocked("timeout", missing, [])
        return verdicts

    def decide(self, verdicts: Sequence[pb.Verdict], missing: Sequence[str]) -> tuple[str, list[pb.Flag]]:
        """The hold's decision once the verdicts are in (or the budget ran out for `missing` request ids),
        without waiting: ("released" | "blocked_verdict" | "released_on_timeout" | "blocked_on_timeout",
        the flags that blocked it). Counted in `decisions`; a fail-open release is logged as a warning."""
        severe = [f for v in verdicts for f in v.flags if self._block_at is not None and f.severity >= self._block_at]
        if severe:
            decision = "blocked_verdict"
        elif missing:
            decision = "blocked_on_timeout" if self.policy.on_timeout == "closed" else "released_on_timeout"
        else:
            decision = "released"
        with self._lock:
            self.decisions[decision] += 1
        if decision == "released_on_timeout":
            log.warning("canvaswatch gate released output without a verdict for %s (fail-open)", ", ".join(missing))
        return decision, severe

__all__ = ["Gate", "GatePolicy", "GenerationBlocked"]
