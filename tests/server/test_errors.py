"""Refusals are plain exceptions with a field path; only the transport knows their gRPC status."""

from __future__ import annotations

import pickle

import grpc
import pytest

from canvaswatch.server.errors import Refusal, StepError, invalid
from canvaswatch.server.transport.status import SERVICE_NAME, grpc_status
from canvaswatch.server.workers.protocol import StreamEnd, StreamStatus


def test_a_refusal_names_its_field():
    err = invalid("message[3].topk.ids: shape [4, 2] disagrees with 12 bytes of INT32")
    assert err.refusal is Refusal.INVALID and err.field == "message[3].topk.ids"
    assert StepError("no colon here").field == ""


@pytest.mark.parametrize("refusal, status", [
    (Refusal.INVALID, grpc.StatusCode.INVALID_ARGUMENT), (Refusal.UNSUPPORTED, grpc.StatusCode.UNIMPLEMENTED),
    (Refusal.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE), (Refusal.INTERNAL, grpc.StatusCode.INTERNAL),
])
def test_every_refusal_has_one_status(refusal, status):
    assert grpc_status(refusal) is status


def test_the_service_name_is_the_protos():
    assert SERVICE_NAME == "canvaswatch.v1.CanvasMonitor"


def test_a_worker_refusal_crosses_the_pipe_with_its_kind():
    # Replies are pickled between processes: the refusal kind must survive the trip.
    status = pickle.loads(pickle.dumps(StreamStatus.refused(StepError("workers: busy", Refusal.UNAVAILABLE))))
    assert status.over and status.end is StreamEnd.REFUSED
    err = status.error()
    assert err.refusal is Refusal.UNAVAILABLE and err.message == "workers: busy"
    assert not StreamStatus(StreamEnd.FINISHED).over
