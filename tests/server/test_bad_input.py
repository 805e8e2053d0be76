"""Bad input gets a clear status naming the field, never a crash, and never disturbs other streams."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch

from canvaswatch.client import simulate
from canvaswatch.client.replay import replay
from canvaswatch.client.tensors import encode_tensor
from canvaswatch.server.config import ConfigError, parse_config
from canvaswatch.v1 import monitor_pb2 as pb
from canvaswatch.v1 import monitor_pb2_grpc as pb_grpc
from tests.conftest import info_for, topk_step

L, K = 8, 4


def _ids(value: int = 3000) -> torch.Tensor:
    return torch.full((L, K), value) + torch.arange(K)


def _probs() -> torch.Tensor:
    return torch.tensor([[0.6, 0.2, 0.1, 0.05]] * L)


def _good(step: int = 0, block: int = 0, info: bool = False) -> pb.StepState:
    return topk_step(_ids(), _probs(), block=block, step=step, info=info_for("bad", L) if info else None)


def _watch(sidecar, messages: list[pb.StepState]) -> grpc.RpcError:
    with sidecar.channel() as channel:
        with pytest.raises(grpc.RpcError) as caught:
            list(pb_grpc.CanvasMonitorStub(channel).Watch(iter(messages), timeout=20))
    return caught.value


def _with_probs(data: torch.Tensor) -> pb.StepState:
    message = _good(info=True)
    message.topk.probs.CopyFrom(encode_tensor(data))
    return message


def _final() -> pb.StepState:
    return pb.StepState(final=True, output_ids=[3000])


def _with_signal(field: str, value: torch.Tensor | pb.Tensor | float) -> pb.StepState:
    """A good first step carrying one sampler signal (StepState fields 24-27)."""
    message = _good(info=True)
    if field == "temperature":
        message.temperature = value
    else:
        getattr(message, field).CopyFrom(value if isinstance(value, pb.Tensor) else encode_tensor(value))
    return message


_MASK = torch.tensor([0, 1, 0, 0, 1, 0, 0, 0], dtype=torch.uint8)
_ENTROPY = torch.full((L,), 2.5, dtype=torch.float16)
_ARGMAX = torch.full((L,), 3000, dtype=torch.int32)


CASES = {
    "missing info": ([_good(), _final()], "INVALID_ARGUMENT", "message[0].info: required"),
    "empty request id": ([topk_step(_ids(), _probs(), info=pb.RequestInfo(canvas_length=L)), _final()],
                         "INVALID_ARGUMENT", "message[0].info.request_id"),
    "shape disagrees with bytes": (
        [(lambda m: (m.topk.ids.shape.__setitem__(0, L + 1), m)[1])(_good(info=True)), _final()],
        "INVALID_ARGUMENT", "message[0].topk.ids.data: shape [9, 4] of INT32 needs 144 bytes, got 128"),
    "unknown dtype": ([(lambda m: (setattr(m.topk.probs, "dtype", 42), m)[1])(_good(info=True)), _final()],
                      "INVALID_ARGUMENT", "message[0].topk.probs.dtype: unsupported dtype 42"),
    "ids outside the vocabulary": ([topk_step(_ids(300_000), _probs(), info=info_for("bad", L)), _final()],
                                   "INVALID_ARGUMENT", "message[0].topk.ids: token id 300000 at position 0 is outside the vocabulary"),
    "NaN probability": ([_with_probs(torch.where(torch.arange(L * K).view(L, K) == 5, float("nan"), _probs())), _final()],
                        "INVALID_ARGUMENT", "message[0].topk.probs: non-finite probability at position 1, slot 1"),
    "negative probability": ([_with_probs(-_probs()), _final()], "INVALID_ARGUMENT", "outside [0, 1] at position 0"),
    "probabilities above one": ([_with_probs(_probs() * 1.5), _final()], "INVALID_ARGUMENT", "sums to"),
    "wrong canvas length": ([topk_step(_ids(), _probs(), info=info_for("bad", L + 2)), _final()],
                            "INVALID_ARGUMENT", "message[0].topk.ids.shape: 8 positions, but info.canvas_length is 10"),
    "steps out of order": ([_good(step=3, info=True), _good(step=2), _final()],
                           "INVALID_ARGUMENT", "message[1].step: step 2 after step 3"),
    "block goes back": ([_good(block=1, info=True), _good(block=0, step=5), _final()],
                        "INVALID_ARGUMENT", "message[1].block: block 0 after block 1"),
    "no final": ([_good(info=True), _good(step=1)], "INVALID_ARGUMENT", "message[1].final: the stream ended without a final message"),
    "empty stream": ([], "INVALID_ARGUMENT", "stream: ended with no messages"),
    "message after final": ([_good(info=True), _final(), _good(step=2)], "INVALID_ARGUMENT", "message[2]: message after the final one"),
    "no state": ([_good(info=True), pb.StepState(step=1)], "INVALID_ARGUMENT", "message[1].state: a non-final step needs one of"),
    "embeddings of the wrong hidden size": (
        [pb.StepState(info=info_for("bad", L), embeddings=encode_tensor(torch.zeros(L, 4))), _final()],
        "INVALID_ARGUMENT", "message[0].embeddings.shape: hidden size 4, but the loaded embedding matrix has d = 640"),
    "embeddings with Inf": (
        [pb.StepState(info=info_for("bad", L), embeddings=encode_tensor(torch.zeros(L, 640).index_fill_(0, torch.tensor([3]), float("inf")))), _final()],
        "INVALID_ARGUMENT", "message[0].embeddings: NaN or Inf at position 3"),
    "embeddings whose L disagrees": (
        [pb.StepState(info=info_for("bad", L), embeddings=encode_tensor(torch.zeros(L + 1, 640))), _final()],
        "INVALID_ARGUMENT", "message[0].embeddings.shape: 9 positions, but info.canvas_length is 8"),
    "embeddings as integers": (
        [pb.StepState(info=info_for("bad", L), embeddings=encode_tensor(torch.zeros(L, 640, dtype=torch.int32))), _final()],
        "INVALID_ARGUMENT", "message[0].embeddings.dtype"),
    "logits of another vocabulary": ([pb.StepState(info=info_for("bad", L), logits=encode_tensor(torch.zeros(L, 1000))), _final()],
                                     "INVALID_ARGUMENT", "message[0].logits.shape: vocabulary of 1000, but the sidecar's is 262144"),
    "output ids outside the vocabulary": ([_good(info=True), pb.StepState(final=True, output_ids=[-1])],
                                          "INVALID_ARGUMENT", "message[1].output_ids"),
    "accepted mask of the wrong length": ([_with_signal("accepted", _MASK[:-1]), _final()], "INVALID_ARGUMENT",
                                          "message[0].accepted.shape: 7 positions, but info.canvas_length is 8"),
    "accepted mask as [L, 1]": ([_with_signal("accepted", _MASK[:, None]), _final()], "INVALID_ARGUMENT",
                                "message[0].accepted.shape: expected 1 dimensions, got shape [8, 1]"),
    "accepted mask as floats": ([_with_signal("accepted", _MASK.float()), _final()], "INVALID_ARGUMENT",
                                "message[0].accepted.dtype: expected UINT8, INT32 or INT64, got FLOAT32"),
    "accepted mask of 2": ([_with_signal("accepted", _MASK * 2), _final()], "INVALID_ARGUMENT",
                           "message[0].accepted: value 2 at position 1; the mask holds 0 or 1"),
    "accepted bytes disagree with shape": (
        [_with_signal("accepted", pb.Tensor(dtype=pb.UINT8, shape=[L], data=bytes(L - 1))), _final()],
        "INVALID_ARGUMENT", "message[0].accepted.data: shape [8] of UINT8 needs 8 bytes, got 7"),
    "entropy with NaN": ([_with_signal("entropy", _ENTROPY.index_fill(0, torch.tensor([6]), float("nan"))), _final()],
                         "INVALID_ARGUMENT", "message[0].entropy: non-finite entropy at position 6"),
    "entropy with Inf": ([_with_signal("entropy", _ENTROPY.index_fill(0, torch.tensor([2]), float("inf"))), _final()],
                         "INVALID_ARGUMENT", "message[0].entropy: non-finite entropy at position 2"),
    "negative entropy": ([_with_signal("entropy", _ENTROPY.index_fill(0, torch.tensor([3]), -0.5)), _final()],
                         "INVALID_ARGUMENT", "message[0].entropy: negative entropy -0.5 at position 3"),
    "entropy as integers": ([_with_signal("entropy", torch.ones(L, dtype=torch.int32)), _final()], "INVALID_ARGUMENT",
                            "message[0].entropy.dtype: expected FLOAT16, FLOAT32 or BFLOAT16, got INT32"),
    "entropy of the wrong length": ([_with_signal("entropy", torch.ones(L + 3)), _final()], "INVALID_ARGUMENT",
                                    "message[0].entropy.shape: 11 positions, but info.canvas_length is 8"),
    "entropy of an unknown dtype": ([_with_signal("entropy", pb.Tensor(dtype=42, shape=[L], data=bytes(2 * L))), _final()],
                                    "INVALID_ARGUMENT", "message[0].entropy.dtype: unsupported dtype 42"),
    "argmax ids outside the vocabulary": (
        [_with_signal("argmax_ids", _ARGMAX.index_fill(0, torch.tensor([5]), 300_000)), _final()], "INVALID_ARGUMENT",
        "message[0].argmax_ids: token id 300000 at position 5 is outside the vocabulary [0, 262144)"),
    "negative argmax id": ([_with_signal("argmax_ids", _ARGMAX.index_fill(0, torch.tensor([0]), -1)), _final()],
                           "INVALID_ARGUMENT", "message[0].argmax_ids: token id -1 at position 0 is outside the vocabulary"),
    "argmax ids as floats": ([_with_signal("argmax_ids", _ARGMAX.float()), _final()], "INVALID_ARGUMENT",
                             "message[0].argmax_ids.dtype: expected INT32 or INT64, got FLOAT32"),
    "argmax ids of the wrong length": ([_with_signal("argmax_ids", _ARGMAX[:4]), _final()], "INVALID_ARGUMENT",
                                       "message[0].argmax_ids.shape: 4 positions, but info.canvas_length is 8"),
    "zero temperature": ([_with_signal("temperature", 0.0), _final()], "INVALID_ARGUMENT",
                         "message[0].temperature: must be finite and > 0, got 0"),
    "negative temperature": ([_with_signal("temperature", -0.8), _final()], "INVALID_ARGUMENT",
                             "message[0].temperature: must be finite and > 0, got -0.8"),
    "NaN temperature": ([_with_signal("temperature", float("nan")), _final()], "INVALID_ARGUMENT",
                        "message[0].temperature: must be finite and > 0, got nan"),
    "infinite temperature": ([_with_signal("temperature", float("inf")), _final()], "INVALID_ARGUMENT",
                             "message[0].temperature: must be finite and > 0, got inf"),
    "logits all -inf at a position": (
        [pb.StepState(info=info_for("bad", 4), logits=encode_tensor(torch.zeros(4, 262144).index_fill_(0, torch.tensor([2]), float("-inf")))), _final()],
        "INVALID_ARGUMENT", "message[0].logits: every logit is -inf at position 2; a position needs a finite logit"),
    "logits of 3e38": ([pb.StepState(info=info_for("bad", 4), logits=encode_tensor(torch.full((4, 262144), 3e38))), _final()],
                       "INVALID_ARGUMENT", "message[0].logits: logit 3e+38 at position 0 is above 100000"),
    "logits with +inf": (
        [pb.StepState(info=info_for("bad", 4), logits=encode_tensor(torch.zeros(4, 262144).index_fill_(0, torch.tensor([3]), float("inf")))), _final()],
        "INVALID_ARGUMENT", "message[0].logits: NaN or +inf at position 3"),
    "embeddings of 1e30": (
        [pb.StepState(info=info_for("bad", L), embeddings=encode_tensor(torch.full((L, 640), 1e30))), _final()],
        "INVALID_ARGUMENT", "message[0].embeddings: a value above 100000 in magnitude at position 0"),
    "NaN top_p": ([(lambda m: (setattr(m.topk, "top_p", float("nan")), m)[1])(_good(info=True)), _final()],
                  "INVALID_ARGUMENT", "message[0].topk.top_p: must be in [0, 1] (0: plain top-k), got nan"),
    "top_p above one": ([(lambda m: (setattr(m.topk, "top_p", 1.5), m)[1])(_good(info=True)), _final()],
                        "INVALID_ARGUMENT", "message[0].topk.top_p: must be in [0, 1] (0: plain top-k), got 1.5"),
    "bad signal on a later step": ([_good(info=True), (lambda m: (m.entropy.CopyFrom(encode_tensor(-_ENTROPY)), m)[1])(_good(step=1)),
                                    _final()], "INVALID_ARGUMENT", "message[1].entropy: negative entropy -2.5 at position 0"),
}


def assert_refused(sidecar, case: str) -> None:
    """The stream CASES[case] ends with its status and a message naming the field."""
    messages, code, fragment = CASES[case]
    error = _watch(sidecar, messages)
    assert error.code().name == code, error.details()
    assert fragment in error.details()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_stream_is_refused_with_the_field_named(sidecar, case):
    assert_refused(sidecar, case)


def test_oversized_message_is_resource_exhausted_naming_the_limit(sidecar):
    huge = pb.StepState(info=info_for("huge", L), logits=pb.Tensor(dtype=pb.FLOAT32, shape=[L, 262144], data=bytes(L * 262144 * 4)))
    error = _watch(sidecar, [huge, _final()])
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(8 * 1024 * 1024) in error.details()  # the test sidecar's server.max_message_bytes


def test_embeddings_form_without_a_matrix_is_unimplemented(vocab, tmp_path):
    from tests.conftest import start_sidecar

    running = start_sidecar(vocab, tmp_path)  # no dense decoder with a matrix
    try:
        error = _watch(running, [pb.StepState(info=info_for("bad", L), embeddings=encode_tensor(torch.zeros(L, 640))), _final()])
    finally:
        running.thread.stop()
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "message[0].embeddings: this sidecar has no embedding matrix configured" in error.details()


def test_bad_streams_do_not_disturb_a_good_one_running_beside_them(sidecar, vocab):
    trace = simulate.scenario("surviving_phrase", vocab.encode, vocab.size, request_id="good-neighbour", seed=9)
    result: dict[str, pb.Verdict] = {}
    with sidecar.channel() as channel:
        good = threading.Thread(target=lambda: result.setdefault("v", replay(trace, channel)))
        good.start()
        for case in ("shape disagrees with bytes", "NaN probability", "steps out of order", "no final"):
            _watch(sidecar, CASES[case][0])
        good.join(timeout=60)
        # and the server still takes new work afterwards
        again = replay(simulate.scenario("clean", vocab.encode, vocab.size, request_id="after", seed=1), channel)
    assert result["v"].request_id == "good-neighbour" and result["v"].steps_seen == len(trace.steps) - 1
    assert again.steps_seen > 0
    metrics = sidecar.metrics_text()
    assert 'outcome="invalid"' in metrics and 'outcome="incomplete"' in metrics


def test_check_rpc_refuses_a_trace_without_final(sidecar, vocab):
    trace = simulate.scenario("clean", vocab.encode, vocab.size, request_id="nofinal", seed=1)
    del trace.steps[-1]
    with sidecar.channel() as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.CanvasMonitorStub(channel).Check(trace)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ends without a final step" in caught.value.details()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"monitors": {"no_such_monitor": {}}}, "monitors.no_such_monitor: unknown monitor 'no_such_monitor'"),
        ({"server": {"grpc_port": 70000}}, "server.grpc_port: must be a port number"),
        ({"server": {"monitor_policy": "maybe"}}, "server.monitor_policy"),
        ({"server": {"max_streams": "many"}}, "server.max_streams: expected int"),
        ({"logging": {"level": "loud"}}, "logging.level"),
        ({"surprise": {}}, "surprise: unknown section"),
        ({"monitors": {"lexicon": {"enabled": "yes"}}}, "monitors.lexicon.enabled: expected bool"),
        ({"monitors": {"self_correction": {"settle_steps": 0}}}, "monitors.self_correction.settle_steps"),
        ({"dense": {"dtype": "int8"}}, "dense.dtype: expected float32, bfloat16 or float16"),
        ({"dense": {"device": "tpu"}}, "dense.device"),
        ({"dense": {"top_p": 1.5}}, "dense.top_p"),
        # accepted before, then a traceback at start (gRPC's C int) or a silent change at run time:
        ({"server": {"max_message_bytes": 2**31}}, "server.max_message_bytes: must be at most 2147483647"),
        ({"server": {"monitor_budget_ms": float("nan"), "monitor_budget_hard_ms": 0}}, "server.monitor_budget_ms"),
        ({"dense": {"logit_scale": float("nan")}}, "dense.logit_scale: must be a finite number > 0"),
        ({"dense": {"logit_scale": -1.0}}, "dense.logit_scale: must be a finite number > 0"),
        ({"dense": {"softcap": float("inf")}}, "dense.softcap: must be a finite number >= 0"),
    ],
)
def test_bad_config_is_refused_at_startup_naming_the_key(raw, message):
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    assert message in str(caught.value)


# Bytes that are not the message: truncated, a wrong wire type for a known field, random.
_NOT_PROTOBUF = {
    "truncated": _good(info=True).SerializeToString()[:-7],
    "wrong wire type": b"\x0a\x05\x08\x01",  # field 1 (info) as a 5-byte string that is itself a broken message
    "random": bytes(range(256)) * 2,
}


def _raw_watch(target: str, chunks: list[bytes]) -> grpc.RpcError:
    with grpc.insecure_channel(target) as channel:
        watch = channel.stream_stream("/canvaswatch.v1.CanvasMonitor/Watch")  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as caught:
            list(watch(iter(chunks), timeout=20))
    return caught.value


@pytest.mark.parametrize("mode", ["in_process", "workers"])
def test_bytes_that_are_not_protobuf_get_invalid_argument_and_no_traceback(vocab, tmp_path, mode, capsys):
    from tests.conftest import start_sidecar

    extra = {"server": {"monitor_processes": 1}} if mode == "workers" else {}
    running = start_sidecar(vocab, tmp_path, extra)
    try:
        results = {name: _raw_watch(running.target, [data]) for name, data in _NOT_PROTOBUF.items()}
        results["later message"] = _raw_watch(running.target, [_good(info=True).SerializeToString(), b"\xff" * 9])
        with grpc.insecure_channel(running.target) as channel:
            check = channel.unary_unary("/canvaswatch.v1.CanvasMonitor/Check")
            with pytest.raises(grpc.RpcError) as caught:
                check(b"\xff" * 9, timeout=20)
            results["Check"] = caught.value
            listing = channel.unary_unary("/canvaswatch.v1.CanvasMonitor/ListMonitors")
            with pytest.raises(grpc.RpcError) as caught:
                listing(b"\xff" * 9, timeout=20)
            results["ListMonitors"] = caught.value
            # and the server still serves
            good = replay(simulate.scenario("clean", vocab.encode, vocab.size, request_id="after-bytes", seed=1), channel)
    finally:
        running.thread.stop()
    assert len(results) == 6
    for name, error in results.items():
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, error.code(), error.details())
        assert "that are not a valid canvaswatch.v1." in error.details(), name
    assert results["later message"].details() == "message[1]: 9 bytes that are not a valid canvaswatch.v1.StepState (protobuf)"
    assert results["Check"].details() == "request: 9 bytes that are not a valid canvaswatch.v1.Trace (protobuf)"
    assert good.request_id == "after-bytes"
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err


def test_check_refusals_are_counted_and_a_bad_final_reaches_no_monitor(vocab):
    """A refused Check counts as invalid (as Watch counts it); a final message refused for its output ids
    is refused before its state reaches the monitors and the sinks; output ids and prompt ids are bounded."""
    from canvaswatch.client import simulate
    from canvaswatch.server.config import load_config
    from canvaswatch.server.errors import StepError
    from canvaswatch.server.pipeline.engine import MAX_OUTPUT_IDS, Engine

    engine = Engine(load_config(None), vocab)

    def invalid_count() -> float:
        return sum(engine.metrics.registry.get_sample_value("canvaswatch_requests_total", {"model": m, "outcome": "invalid"})
                   or 0.0 for m in ("simulated/diffusion", "other", ""))

    def refused(trace, message: str) -> None:
        before = invalid_count()
        with pytest.raises(StepError) as caught:
            engine.check_trace(trace)
        assert message in caught.value.message and invalid_count() == before + 1

    def trace(request_id: str):
        return simulate.scenario("self_correction", vocab.encode, vocab.size, request_id=request_id, seed=1)

    def steps_decoded() -> float:
        return engine.metrics.registry.get_sample_value("canvaswatch_steps_total", {"model": "simulated/diffusion"}) or 0.0

    bad_final = trace("bad-final")
    del bad_final.steps[-1]  # the last state becomes the final message, with an id the vocabulary lacks
    bad_final.steps[-1].final = True
    bad_final.steps[-1].output_ids.extend([3000, vocab.size])
    before = steps_decoded()
    refused(bad_final, "output_ids: id outside the vocabulary")
    assert steps_decoded() == before + len(bad_final.steps) - 1  # the final's state was never decoded or monitored
    too_long = trace("too-long")
    too_long.steps[-1].output_ids.extend([1] * (MAX_OUTPUT_IDS + 1))
    refused(too_long, f"more than {MAX_OUTPUT_IDS}")
    repeated = trace("repeated")
    repeated.steps.insert(1, repeated.steps[1])
    refused(repeated, "steps must increase")
    bad_prompt = trace("bad-prompt")
    info = bad_prompt.steps[0].info if bad_prompt.steps[0].HasField("info") else bad_prompt.info
    info.prompt_ids.append(-1)
    refused(bad_prompt, "prompt_ids: id outside the vocabulary")
    assert engine.check_trace(trace("good")).steps_seen > 0
    engine.close()
