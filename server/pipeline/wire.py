"""Monitor values (dataclasses) to and from the wire messages; nothing else crosses this boundary."""

from __future__ import annotations

from canvaswatch.monitors.base import Evidence, Flag, RequestMeta, Severity
from canvaswatch.server.errors import invalid
from canvaswatch.server.pipeline.verdict import SessionVerdict
from canvaswatch.v1 import monitor_pb2 as pb

# Client strings reach logs, the audit log (every flag's line repeats them) and, for `model`, a metrics
# label: each is bounded so that one request cannot make any of them large.
MAX_REQUEST_ID = 256
MAX_MODEL = 256
MAX_TENANT = 256
MAX_ATTRIBUTES = 64
MAX_ATTRIBUTE_KEY = 128
MAX_ATTRIBUTE_VALUE = 16384  # labelled traces carry label position ranges here
DEFAULT_MAX_PROMPT_IDS = 32768  # server.max_prompt_ids


def request_meta(info: pb.RequestInfo, where: str, max_prompt_ids: int = DEFAULT_MAX_PROMPT_IDS) -> RequestMeta:
    if not info.request_id:
        raise invalid(f"{where}.request_id: required")
    if len(info.request_id) > MAX_REQUEST_ID:
        raise invalid(f"{where}.request_id: longer than {MAX_REQUEST_ID} characters")
    if info.canvas_length < 1:
        raise invalid(f"{where}.canvas_length: required and > 0")
    if len(info.model) > MAX_MODEL:
        raise invalid(f"{where}.model: {len(info.model)} characters, longer than {MAX_MODEL}")
    if len(info.tenant) > MAX_TENANT:
        raise invalid(f"{where}.tenant: {len(info.tenant)} characters, longer than {MAX_TENANT}")
    if len(info.prompt_ids) > max_prompt_ids:
        raise invalid(f"{where}.prompt_ids: {len(info.prompt_ids)} ids, more than server.max_prompt_ids = {max_prompt_ids}")
    if len(info.attributes) > MAX_ATTRIBUTES:
        raise invalid(f"{where}.attributes: {len(info.attributes)} entries, more than {MAX_ATTRIBUTES}")
    for key, value in info.attributes.items():
        if len(key) > MAX_ATTRIBUTE_KEY or len(value) > MAX_ATTRIBUTE_VALUE:
            raise invalid(f"{where}.attributes[{key[:MAX_ATTRIBUTE_KEY]!r}]: keys are at most {MAX_ATTRIBUTE_KEY} "
                          f"characters and values at most {MAX_ATTRIBUTE_VALUE}")
    return RequestMeta(
        request_id=info.request_id,
        model=info.model,
        tenant=info.tenant,
        prompt_ids=info.prompt_ids,  # RequestMeta copies it into an array
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
