"""Replay recorded traces to a running sidecar over gRPC, step by step, as a serving stack would."""

from __future__ import annotations

from typing import Callable, Sequence

import grpc

from canvaswatch.client.stream import WatchStream
from canvaswatch.v1 import monitor_pb2 as pb


def replay(trace: pb.Trace, channel: grpc.Channel, *, metadata: Sequence[tuple[str, str]] = (),
           on_event: Callable[[pb.MonitorEvent], None] | None = None, timeout: float = 60.0) -> pb.Verdict:
    """Stream every step of `trace` (none dropped: the queue holds the whole trace) and return the verdict."""
    steps = list(trace.steps)
    if not steps:
        raise ValueError("the trace has no steps")
    info = steps[0].info if steps[0].HasField("info") else trace.info
    stream = WatchStream(channel, info, max_pending=len(steps) + 1, metadata=metadata, on_event=on_event)
    try:
        last = steps[-1]
        for message in steps[:-1] if last.final else steps:
            stream.send(_without_info(message))
        if last.final:
            final_state = _without_info(last) if last.WhichOneof("state") else None
            stream.finish(list(last.output_ids), final_state)
        else:
            stream.finish([])
        return stream.result(timeout=timeout)
    finally:
        stream.close()


def _without_info(message: pb.StepState) -> pb.StepState:
    copy = pb.StepState()
    copy.CopyFrom(message)
    copy.ClearField("info")
    copy.final = False
    copy.ClearField("output_ids")
    return copy
