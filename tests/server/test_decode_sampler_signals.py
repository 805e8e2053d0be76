"""The sampler's signals (StepState fields 24-27) decode into DecodedStep in every wire dtype; absent ones are None."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from canvaswatch.client.tensors import encode_tensor
from canvaswatch.server.bottleneck.dense import DenseDecoder
from canvaswatch.server.bottleneck.step_decoder import StepDecoder
from canvaswatch.server.ops.metrics import Metrics
from canvaswatch.v1 import monitor_pb2 as pb


class _Vocab:
    size = 1000

    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


L = 4
MASK = [1, 0, 0, 1]
ENTROPY = [0.0, 2.5, 6.90625, 0.0078125]  # exact in every float wire dtype
ARGMAX = [5, 999, 0, 17]


def _decode(message: pb.StepState):
    ids = torch.tensor([[5, 6]] * L, dtype=torch.int32)
    message.topk.CopyFrom(pb.TopK(ids=encode_tensor(ids), probs=encode_tensor(torch.tensor([[0.5, 0.25]] * L))))
    return StepDecoder(_Vocab(), Metrics(), DenseDecoder(None, _Vocab.size)).decode(message, L, "m")


@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.int32, torch.int64])
@pytest.mark.parametrize("entropy_dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_every_wire_dtype_decodes_to_the_same_signals(mask_dtype, entropy_dtype, id_dtype):
    message = pb.StepState(accepted=encode_tensor(torch.tensor(MASK, dtype=mask_dtype)),
                           entropy=encode_tensor(torch.tensor(ENTROPY, dtype=entropy_dtype)),
                           argmax_ids=encode_tensor(torch.tensor(ARGMAX, dtype=id_dtype)), temperature=0.4)
    step = _decode(message)
    assert step.accepted.dtype == np.bool_ and step.accepted.tolist() == [True, False, False, True]
    assert step.entropy.dtype == np.float32 and step.entropy.tolist() == ENTROPY
    assert step.argmax_ids.dtype == np.int64 and step.argmax_ids.tolist() == ARGMAX
    assert step.temperature == pytest.approx(0.4)
    step.entropy[0] = 1.0  # owned arrays, not read-only views of the message


def test_absent_signals_are_none_and_each_reads_on_its_own():
    step = _decode(pb.StepState())
    assert (step.accepted, step.entropy, step.argmax_ids, step.temperature) == (None, None, None, None)
    step = _decode(pb.StepState(temperature=1.3))
    assert step.temperature == pytest.approx(1.3) and step.accepted is None and step.entropy is None
    step = _decode(pb.StepState(accepted=encode_tensor(torch.tensor(MASK, dtype=torch.uint8))))
    assert step.accepted.tolist() == [True, False, False, True] and step.temperature is None
