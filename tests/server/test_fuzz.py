"""Property-based fuzzing of what clients send: every input is either handled or refused with a named field.

Two targets, both bounded (CANVASWATCH_FUZZ_EXAMPLES raises the count for a long run; BENCHMARKS.md
records one):
  - the transport-free stream handler (the same one both serving modes use), fed streams of
    StepState messages built field by field (shapes, dtypes, byte lengths and values chosen to be
    wrong as often as right: NaN, inf, 3e38, negative, out-of-vocabulary, huge) and messages made
    by mutating the bytes of a valid step. Invariant: `feed` returns events or raises StepError;
    any other exception is a crash.
  - a real sidecar on loopback, fed raw byte streams (valid steps, mutations, garbage). Invariant:
    the call ends with OK or a status that names a client error, never UNKNOWN or INTERNAL, and the
    sidecar still answers a clean request afterwards.
"""

from __future__ import annotations

import os

import grpc
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in the test extra")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from canvaswatch.client import simulate  # noqa: E402
from canvaswatch.client.replay import replay  # noqa: E402
from canvaswatch.server.config import parse_config  # noqa: E402
from canvaswatch.server.errors import StepError  # noqa: E402
from canvaswatch.server.pipeline.engine import Engine  # noqa: E402
from canvaswatch.server.pipeline.stream_handler import StreamHandler  # noqa: E402
from canvaswatch.v1 import monitor_pb2 as pb  # noqa: E402

EXAMPLES = int(os.environ.get("CANVASWATCH_FUZZ_EXAMPLES", "150"))
L = 8
DTYPES = [pb.DTYPE_UNSPECIFIED, pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16, pb.INT32, pb.INT64, 6, 99]
ODD_FLOATS = [0.0, 1.0, 0.5, -1.0, 3e38, -3e38, float("inf"), float("-inf"), float("nan"), 1e-45, 2.0]
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def engine(vocab):
    config = parse_config({"dense": {"embeddings": ""}, "logging": {"level": "error"}})
    built = Engine(config, vocab)
    yield built
    built.close()


def _floats(n: int) -> st.SearchStrategy[list[float]]:
    return st.lists(st.one_of(st.sampled_from(ODD_FLOATS), st.floats(width=32, allow_nan=True, allow_infinity=True)),
                    min_size=n, max_size=n)


@st.composite
def tensors(draw, kind: str) -> pb.Tensor:
    """A Tensor that is right about half the time: shape, dtype and byte count drawn independently."""
    rows = draw(st.sampled_from([L, L, 0, 1, L + 1, 1 << 20]))
    cols = draw(st.sampled_from([4, 4, 1, 0, 3]))
    shape = draw(st.sampled_from([[rows, cols], [rows, cols], [rows], [], [rows, cols, 2]]))
    dtype = draw(st.sampled_from(DTYPES))
    count = min(rows * cols, 64) if len(shape) == 2 else min(rows, 64)
    if kind == "ids":
        values = draw(st.lists(st.sampled_from([0, 1, 5, 262_143, 262_144, -1, 2**31 - 1]), min_size=count, max_size=count))
        data = np.array(values, dtype=np.int64).astype(np.int32 if dtype != pb.INT64 else np.int64).tobytes()
    else:
        with np.errstate(over="ignore"):  # 3e38 as float16 is inf on purpose
            data = np.array(draw(_floats(count)), dtype=np.float32).astype(
                np.float16 if dtype == pb.FLOAT16 else np.float32).tobytes()
    data = data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) and data else data
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


@st.composite
def steps(draw, index: int) -> pb.StepState:
    message = pb.StepState(block=draw(st.sampled_from([0, 0, 1, 7])), step=draw(st.integers(0, 3)) + index)
    if index == 0 or draw(st.integers(0, 9)) == 0:
        message.info.request_id = draw(st.sampled_from(["fuzz", "", "x" * 300]))
        message.info.canvas_length = draw(st.sampled_from([L, L, 0, 3, 1 << 30]))
        message.info.model = draw(st.sampled_from(["m", "", "\u00e9" * 50]))
        message.info.prompt_ids.extend(draw(st.lists(st.integers(-5, 300_000), max_size=6)))
    form = draw(st.sampled_from(["topk", "topk", "logits", "embeddings", "none"]))
    if form == "topk":
        message.topk.ids.CopyFrom(draw(tensors("ids")))
        message.topk.probs.CopyFrom(draw(tensors("probs")))
        message.topk.top_p = draw(st.sampled_from([0.0, 0.9, 1.5, -0.1, float("nan")]))
    elif form == "logits":
        message.logits.CopyFrom(draw(tensors("probs")))
    elif form == "embeddings":
        message.embeddings.CopyFrom(draw(tensors("probs")))
    if draw(st.booleans()):
        message.accepted.CopyFrom(draw(tensors("ids")))
        message.entropy.CopyFrom(draw(tensors("probs")))
        message.argmax_ids.CopyFrom(draw(tensors("ids")))
        message.temperature = draw(st.sampled_from([0.8, 0.0, -1.0, float("nan"), float("inf")]))
    message.canvas_ids.extend(draw(st.lists(st.integers(-3, 300_000), max_size=L + 2)))
    if draw(st.integers(0, 5)) == 0:
        message.final = True
        message.output_ids.extend(draw(st.lists(st.integers(-3, 300_000), max_size=L + 2)))
    return message


def _valid_step(index: int) -> pb.StepState:
    rng = np.random.default_rng(index)
    ids = rng.integers(2, 1000, size=(L, 4)).astype(np.int32)
    probs = np.sort(rng.dirichlet(np.ones(5), size=L)[:, :4].astype(np.float32), axis=1)[:, ::-1].copy()
    message = pb.StepState(block=0, step=index)
    message.topk.ids.CopyFrom(pb.Tensor(dtype=pb.INT32, shape=[L, 4], data=ids.tobytes()))
    message.topk.probs.CopyFrom(pb.Tensor(dtype=pb.FLOAT32, shape=[L, 4], data=probs.tobytes()))
    if index == 0:
        message.info.request_id, message.info.canvas_length = "fuzz-valid", L
    return message


@st.composite
def mutated(draw, index: int) -> bytes:
    data = bytearray(_valid_step(index).SerializeToString())
    for _ in range(draw(st.integers(1, 6))):
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if action == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "cut":
            del data[at: at + draw(st.integers(1, 16))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


def _feed_all(engine: Engine, messages: list[pb.StepState]) -> None:
    handler = StreamHandler(engine)
    try:
        for message in messages:
            handler.feed(message)
        handler.end()
    except StepError as refused:
        assert refused.message and ":" in refused.message  # names a field


@SETTINGS
@given(data=st.data())
def test_structured_streams_are_handled_or_refused_by_name(engine, data):
    count = data.draw(st.integers(1, 4))
    _feed_all(engine, [data.draw(steps(i)) for i in range(count)])


@SETTINGS
@given(data=st.data())
def test_mutated_valid_steps_are_handled_or_refused_by_name(engine, data):
    messages = [_valid_step(0)]
    for index in range(1, data.draw(st.integers(2, 4))):
        raw = data.draw(mutated(index))
        try:
            messages.append(pb.StepState.FromString(raw))
        except Exception:  # not protobuf at all: the transport's case, tested below
            continue
    _feed_all(engine, messages)


CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.OUT_OF_RANGE,
                 grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION}


@pytest.fixture(scope="module")
def running(vocab, tmp_path_factory):
    from tests.conftest import start_sidecar

    sidecar = start_sidecar(vocab, tmp_path_factory.mktemp("fuzz"))
    yield sidecar
    sidecar.thread.stop()


@settings(max_examples=max(20, EXAMPLES // 5), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_raw_byte_streams_never_get_unknown_or_internal(running, data):
    chunks = [_valid_step(0).SerializeToString()]
    for index in range(1, data.draw(st.integers(1, 3))):
        chunks.append(data.draw(st.one_of(mutated(index), st.binary(max_size=64))))
    with grpc.insecure_channel(running.target) as channel:
        watch = channel.stream_stream("/canvaswatch.v1.CanvasMonitor/Watch")
        try:
            list(watch(iter(chunks), timeout=20))
        except grpc.RpcError as err:
            assert err.code() in CLIENT_ERRORS, (err.code(), err.details())


def test_the_sidecar_still_serves_after_the_fuzzing(running, vocab):
    with grpc.insecure_channel(running.target) as channel:
        verdict = replay(simulate.scenario("clean", vocab.encode, vocab.size, request_id="after-fuzz", seed=2), channel)
    assert verdict.request_id == "after-fuzz"
