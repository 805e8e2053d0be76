"""One request's session: step order, the monitors' per-request state, isolation, the verdict.

Memory per request is what the monitors keep (bounded by canvas size by their
contract) plus a few counters: steps are processed and released, never stored.
Each monitor is isolated: an exception is counted and logged, that monitor is
switched off for the rest of the request, and the request goes on. Under
fail_closed a failure also adds a CRITICAL flag, so the verdict cannot look
clean when a monitor did not run.

Each monitor has a per-step time budget (server.monitor_budget_ms, wall time), enforced by a
strike policy so that a loaded machine's occasional slow step does not switch monitors off at
random: every call over the budget is counted (canvaswatch_monitor_errors{kind="overrun"}); a
monitor whose on_step runs over it server.monitor_budget_strikes times in a row, or whose start
or on_step takes longer than server.monitor_budget_hard_ms once, is stopped for the rest of the
request: its state is dropped, the verdict's monitor_errors names it and the reason, it is
counted (canvaswatch_monitors_stopped{reason}), and under fail_closed a CRITICAL flag says so.
A call is never interrupted (a Python thread cannot be, safely): the call that crosses the line
completes and its flags count. on_finish is measured, not stopped (it is the monitor's last
call anyway). A call that never returns is the transport's business: `running` names the monitor
in the call, and server.monitor_hard_deadline_s ends the stream (docs/operations.md).

Flags and the verdict go to the engine's sinks (canvaswatch.server.pipeline.sinks: metrics,
audit log, report, log), in list order; the session itself only keeps them, and only so many:
at most server.max_flags_per_monitor per monitor and server.max_verdict_bytes in all, so a
request that raises flags without end still gets a verdict that fits one gRPC message. Flags
past the bounds still go to the sinks (audit log, metrics); the verdict counts them and ends with
a summary flag from monitor "canvaswatch" carrying their highest severity. The stream's events are
bounded the same way (wire contract v1.3): a flag past the bounds is streamed only when it is more
severe than every flag its monitor has streamed in this request, so for each severity s the step
in which a monitor first raises a flag at s or above still streams one of its flags at s or above
(a client gating at s acts as early as before), and a monitor that
raises flags without end cannot make the sidecar send events without end (each costs the event
loop a gRPC message). server.stream_flags_past_bounds = true streams them all, as before v1.3.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import structlog

from canvaswatch.monitors.base import DecodedStep, FinalCanvas, Flag, Monitor, RequestMeta, Severity
from canvaswatch.server.errors import invalid
from canvaswatch.server.ops.metrics import Metrics
from canvaswatch.server.pipeline.sinks.base import RequestRecord, Sink
from canvaswatch.server.pipeline.verdict import SessionVerdict

log = structlog.get_logger(__name__)


SUMMARY_MONITOR = "canvaswatch"  # the verdict's summary of the flags it left out
# A verdict's bytes besides its flags, its request id and its monitor_errors: the counts, severity, tags.
VERDICT_FIXED_BYTES = 64
MAX_ERROR_CHARS = 1000  # a monitor_errors entry (a plugin's exception text can be anything)


@dataclass
class SessionSettings:
    policy: str = "fail_open"
    budget_s: float = 0.05  # server.monitor_budget_ms
    budget_strikes: int = 3  # server.monitor_budget_strikes: overruns in a row that stop a monitor (0: never)
    hard_budget_s: float = 10.0  # server.monitor_budget_hard_ms: one call longer than this stops it (0: never)
    max_flags_per_monitor: int = 100  # server.max_flags_per_monitor
    max_verdict_bytes: int = 1024 * 1024  # server.max_verdict_bytes
    stream_flags_past_bounds: bool = False  # server.stream_flags_past_bounds


@dataclass
class Session:
    meta: RequestMeta
    monitors: list[Monitor]
    settings: SessionSettings
    metrics: Metrics
    sinks: list[Sink]
    model_label: str = ""
    states: dict[str, Any] = field(default_factory=dict)
    flags: list[Flag] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    disabled: set[str] = field(default_factory=set)
    steps_seen: int = 0
    client_dropped: int = 0
    last: tuple[int, int] | None = None
    history: Any = None  # RequestHistory when a report is wanted: O(steps x L) small ints, opt-in
    report_path: Any = None
    kept_by_monitor: collections.Counter = field(default_factory=collections.Counter)
    kept_bytes: int = 0
    dropped_by_monitor: collections.Counter = field(default_factory=collections.Counter)
    dropped_severity: Severity | None = None
    streamed_severity: dict[str, Severity] = field(default_factory=dict)  # per monitor: the highest it streamed
    not_streamed: int = 0  # flags past the bounds that were not streamed either
    # Recorded outside a step's own flags (fail_closed's CRITICAL when a monitor fails or is stopped, also
    # in start): streamed with the next step's events or the finish's.
    unsent: list[Flag] = field(default_factory=list)
    strikes: dict[str, int] = field(default_factory=dict)  # consecutive on_step overruns, per monitor
    running: str | None = None  # the monitor in a call now (read by the transport's hard-deadline watchdog)

    def __post_init__(self) -> None:
        self.model_label = self.metrics.model_label(self.meta.model)
        self.record = RequestRecord(self.meta, self.model_label, self.history, self.report_path)
        self._steps_counter = self.metrics.steps.labels(self.model_label)
        for monitor in self.monitors:
            self._guard(monitor, "start", lambda m=monitor: self.states.__setitem__(m.name, m.start(self.meta)))

    def check_order(self, block: int, step: int, where: str) -> None:
        """Blocks run left to right; steps strictly increase within a block."""
        if self.last is not None:
            last_block, last_step = self.last
            if block < last_block:
                raise invalid(f"{where}.block: block {block} after block {last_block}; blocks must not go back")
            if block == last_block and step <= last_step:
                raise invalid(f"{where}.step: step {step} after step {last_step} in block {block}; steps must increase")
        self.last = (block, step)

    def note_dropped(self, client_dropped: int) -> None:
        if client_dropped > self.client_dropped:
            self.metrics.steps_dropped.labels(self.model_label).inc(client_dropped - self.client_dropped)
            self.client_dropped = client_dropped

    def on_step(self, step: DecodedStep) -> list[Flag]:
        self.steps_seen += 1
        self._steps_counter.inc()
        if step.residual_mean is not None:
            # One observation per step (its mean), not per position: the histogram tracks steps.
            self.metrics.residual_mass.observe(step.residual_mean)
        if self.history is not None:
            self.history.add(step.block, step.step, step.ids_np[:, 0], step.probs_np[:, 0])
        raised: list[Flag] = []
        # The hot loop of the sidecar: the guard is inlined (no closure per monitor per step).
        budget_s, strikes = self.settings.budget_s, self.strikes
        for monitor in self.monitors:
            name = monitor.name
            if name in self.disabled:
                continue
            self.running = name
            started = time.perf_counter()
            try:
                result = monitor.on_step(self.states[name], step)
            except KeyboardInterrupt:
                raise
            except BaseException as err:  # isolation: a monitor's bug (sys.exit in a plugin too) must not end the request
                self._failed(monitor, "on_step", err)
                result = None
            elapsed = time.perf_counter() - started
            self.metrics.monitor_timer(name).observe(elapsed)
            if elapsed > budget_s:
                self._overrun(monitor, "on_step", elapsed)
            elif strikes:
                strikes.pop(name, None)  # the strikes count overruns in a row
            if result:
                raised.extend(result)
        self.running = None
        return self._with_unsent(self._record(raised) if raised else raised)

    def finish(self, output_ids: tuple[int, ...], text: str) -> tuple[list[Flag], SessionVerdict]:
        final = FinalCanvas(output_ids=output_ids, text=text, steps_seen=self.steps_seen, steps_dropped=self.client_dropped)
        raised: list[Flag] = []
        for monitor in self.monitors:
            result = self._guard(monitor, "on_finish", lambda m=monitor: m.on_finish(self.states[m.name], final))
            raised.extend(result or [])
        new = self._with_unsent(self._record(raised))
        if self.history is not None:
            self.history.output_ids = output_ids
        verdict = self.verdict()
        for sink in self.sinks:
            sink.on_verdict(self.record, verdict)
        return new, verdict

    def verdict(self) -> SessionVerdict:
        """The verdict, within server.max_verdict_bytes as a whole: the kept flags are charged as they come,
        and the rest (the id, monitor_errors, the summary flag) is made room for here by leaving out the
        last kept flags (counted like any flag past the bounds), then by shortening monitor_errors."""
        limit = self.settings.max_verdict_bytes
        errors = tuple(self.errors)
        while True:
            flags = tuple(self.flags)
            dropped = sum(self.dropped_by_monitor.values())
            if dropped:
                flags += (self._summary(dropped),)
            size = (VERDICT_FIXED_BYTES + len(self.meta.request_id.encode()) + sum(map(wire_size, flags))
                    + sum(len(e.encode()) + 6 for e in errors))
            if size <= limit or not self.flags:
                break
            left_out = self.flags.pop()
            self.kept_bytes -= wire_size(left_out)
            self.kept_by_monitor[left_out.monitor] -= 1
            self.dropped_by_monitor[left_out.monitor] += 1
            self.dropped_severity = max(self.dropped_severity or left_out.severity, left_out.severity)
        if size > limit and errors:
            room = max(0, limit - (size - sum(len(e.encode()) + 6 for e in errors))) // len(errors) - 6
            errors = tuple(e.encode()[:max(room, 0)].decode(errors="ignore") for e in errors)
        return SessionVerdict(
            request_id=self.meta.request_id,
            flags=flags,
            max_severity=max((f.severity for f in flags), default=None),
            steps_seen=self.steps_seen,
            steps_dropped=self.client_dropped,
            monitor_errors=errors,
            flags_dropped=dropped,
        )

    def _record(self, raised: list[Flag]) -> list[Flag]:
        """Keeps `raised` within the verdict's bounds, hands every flag to the sinks, and returns the
        ones to stream as events."""
        settings = self.settings
        streamed: list[Flag] = []
        for flag in raised:
            size = wire_size(flag)
            monitor, severity = flag.monitor, flag.severity
            highest = self.streamed_severity.get(monitor)
            if (self.kept_by_monitor[monitor] < settings.max_flags_per_monitor
                    and self.kept_bytes + size <= settings.max_verdict_bytes):
                self.flags.append(flag)
                self.kept_by_monitor[monitor] += 1
                self.kept_bytes += size
                streamed.append(flag)
            else:
                self.dropped_by_monitor[monitor] += 1
                self.dropped_severity = max(self.dropped_severity or severity, severity)
                if settings.stream_flags_past_bounds or highest is None or severity > highest:
                    streamed.append(flag)
                else:
                    self.not_streamed += 1
            if highest is None or severity > highest:
                self.streamed_severity[monitor] = severity  # a kept or a past-the-bounds escalation: streamed
            for sink in self.sinks:
                sink.on_flag(self.record, flag)
        return streamed

    def _with_unsent(self, streamed: list[Flag]) -> list[Flag]:
        """`streamed` after the flags recorded since the last events went out (fail_closed's, `unsent`)."""
        if not self.unsent:
            return streamed
        streamed, self.unsent = self.unsent + streamed, []
        return streamed

    def _summary(self, dropped: int) -> Flag:
        s = self.settings
        streamed = dropped - self.not_streamed
        return Flag(
            monitor=SUMMARY_MONITOR, severity=self.dropped_severity or Severity.INFO, score=1.0,
            reason=(f"{dropped} flags are not in this verdict (server.max_flags_per_monitor = {s.max_flags_per_monitor}, "
                    f"server.max_verdict_bytes = {s.max_verdict_bytes}); they were written to the audit log and "
                    f"counted, and {streamed} of them were streamed as events (past the bounds only a flag more severe "
                    "than its monitor's streamed ones is, unless server.stream_flags_past_bounds); this flag carries "
                    "their highest severity"),
            attributes={"flags_dropped": str(dropped), "flags_not_streamed": str(self.not_streamed),
                        **{f"dropped.{name}": str(count) for name, count in sorted(self.dropped_by_monitor.items())}},
        )

    def _guard(self, monitor: Monitor, phase: str, call: Callable[[], Any]) -> Any:
        if monitor.name in self.disabled:
            return None
        self.running = monitor.name
        started = time.perf_counter()
        try:
            return call()
        except KeyboardInterrupt:  # Ctrl-C in an offline command (eval, replay) runs monitors on the main thread
            raise
        except BaseException as err:  # isolation: a monitor's bug (sys.exit in a plugin too) must not end the request
            self._failed(monitor, phase, err)
            return None
        finally:
            self.running = None
            elapsed = time.perf_counter() - started
            self.metrics.monitor_timer(monitor.name).observe(elapsed)
            if elapsed > self.settings.budget_s:
                self._overrun(monitor, phase, elapsed)

    def _failed(self, monitor: Monitor, phase: str, err: BaseException) -> None:
        self.metrics.monitor_errors.labels(monitor.name, "exception").inc()
        log.error("monitor_failed", request_id=self.meta.request_id, monitor=monitor.name, phase=phase,
                  error=f"{type(err).__name__}: {err}")
        self._switch_off(monitor.name, f"{phase} raised {type(err).__name__}: {err}",
                         f"monitor failed in {phase}", {"error": type(err).__name__})

    def _switch_off(self, name: str, error: str, why: str, attributes: dict[str, str]) -> None:
        """`name` off for the rest of this request (an exception or a stop): its state dropped, `error` in
        the verdict's monitor_errors, and under fail_closed a CRITICAL flag (the verdict cannot look clean
        when a monitor did not run)."""
        self.disabled.add(name)
        self.states.pop(name, None)
        self.strikes.pop(name, None)
        self.errors.append(f"{name}: {error}"[:MAX_ERROR_CHARS])
        if self.settings.policy == "fail_closed":
            self.unsent += self._record([Flag(monitor=name, severity=Severity.CRITICAL, score=1.0, attributes=attributes,
                                              reason=f"{why} and the policy is fail_closed")])

    def _overrun(self, monitor: Monitor, phase: str, elapsed: float) -> None:
        """A call over the budget: counted; under the strike policy, the monitor is stopped for this request."""
        settings, name = self.settings, monitor.name
        self.metrics.monitor_errors.labels(name, "overrun").inc()
        log.warning("monitor_overrun", request_id=self.meta.request_id, monitor=name,
                    phase=phase, seconds=round(elapsed, 4), budget_s=settings.budget_s)
        if phase == "on_finish" or name in self.disabled:
            return
        if settings.hard_budget_s and elapsed > settings.hard_budget_s:
            self.stop(monitor, "hard_budget", f"{phase} took {elapsed:.3f} s, over server.monitor_budget_hard_ms = "
                                              f"{settings.hard_budget_s * 1000:g}")
            return
        if phase != "on_step" or not settings.budget_strikes:
            return
        strikes = self.strikes[name] = self.strikes.get(name, 0) + 1
        if strikes >= settings.budget_strikes:
            self.stop(monitor, "over_budget", f"on_step over server.monitor_budget_ms = {settings.budget_s * 1000:g} "
                                              f"{strikes} steps in a row (server.monitor_budget_strikes = "
                                              f"{settings.budget_strikes}); the last took {elapsed:.3f} s")

    def stop(self, monitor: Monitor, reason: str, detail: str) -> None:
        """Switch `monitor` off for the rest of this request: state dropped, named in the verdict, counted,
        and under fail_closed a CRITICAL flag (the verdict cannot look clean when a monitor did not run)."""
        self.metrics.monitors_stopped.labels(monitor.name, reason).inc()
        log.warning("monitor_stopped", request_id=self.meta.request_id, monitor=monitor.name, reason=reason,
                    detail=detail)
        self._switch_off(monitor.name, f"stopped for this request ({reason}): {detail}",
                         f"monitor stopped ({reason})", {"stopped": reason})


def wire_size(flag: Flag) -> int:
    """An upper bound on the flag's size in a Verdict (protobuf): each field's bytes plus 6 for its tag and
    length, 5 per position; what the verdict budget counts, without building the message."""
    size = 16 + len(flag.monitor.encode()) + len(flag.reason.encode())
    for key, value in flag.attributes.items():
        size += 18 + len(str(key).encode()) + len(str(value).encode())
    for evidence in flag.evidence:
        size += 30 + 5 * len(evidence.positions) + len(evidence.snippet.encode())
    return size
