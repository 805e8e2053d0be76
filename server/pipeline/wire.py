"""Monitor values (dataclasses) to and from the wire messages; nothing else crosses this boundary."""

from __future__ import annotations

from canvaswatch.monitors.base import Evidence, Flag, RequestMeta, Severity
from canvaswatch.server.errors import invalid
from canvaswatch.server.pipeline.session import SessionVerdict
from canvaswatch.v1 import monitor_pb2 as pb

MAX_REQUEST_ID = 256


def request_meta(info: pb.RequestInfo, where: str) -> RequestMeta:
    if not info.request_id:
        raise invalid(f"{where}.request_id: required")
    if len(info.request_id) > MAX_REQUEST_ID:
        raise invalid(f"{where}.request_id: longer than {MAX_REQUEST_ID} characters")
    if info.canvas_length < 1:
        raise invalid(f"{where}.canvas_length: required and > 0")
    return RequestMeta(
        request_id=info.request_id,
        model=info.model,
        tenant=info.tenant,
        prompt_ids=tuple(info.prompt_ids),
        canvas_length=int(info.canvas_length),
        total_steps=int(info.total_steps),
        attributes=dict(info.attributes),
    )


def flag_to_pb(flag: Flag) -> pb.Flag:
    return pb.Flag(
        monitor=flag.monitor,
        severity=int(flag.severity),
        reason=flag.reason,
        score=flag.score,
        evidence=[
            pb.Evidence(block=e.block, step=e.step, positions=list(e.positions), snippet=e.snippet)
            for e in flag.evidence
        ],
        attributes=dict(flag.attributes),
    )


def flag_from_pb(message: pb.Flag) -> Flag:
    return Flag(
        monitor=message.monitor,
        severity=Severity(message.severity),
        reason=message.reason,
        score=message.score,
        evidence=tuple(Evidence(e.block, e.step, tuple(e.positions), e.snippet) for e in message.evidence),
        attributes=dict(message.attributes),
    )


def verdict_to_pb(verdict: SessionVerdict) -> pb.Verdict:
    return pb.Verdict(
        request_id=verdict.request_id,
        flags=[flag_to_pb(f) for f in verdict.flags],
        max_severity=int(verdict.max_severity) if verdict.max_severity is not None else pb.SEVERITY_UNSPECIFIED,
        steps_seen=verdict.steps_seen,
        steps_dropped=verdict.steps_dropped,
        monitor_errors=list(verdict.monitor_errors),
    )
