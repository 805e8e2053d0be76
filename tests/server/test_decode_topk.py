"""The top-k form's decoder: every wire dtype reads the same, slots are ordered, padding is cleared."""

from __future__ import annotations

import pytest
import torch

from canvaswatch.client.tensors import encode_tensor
from canvaswatch.server.bottleneck.step_decoder import StepDecoder
from canvaswatch.server.bottleneck.dense import DenseDecoder
from canvaswatch.server.ops.metrics import Metrics
from canvaswatch.v1 import monitor_pb2 as pb


class _Vocab:
    size = 1000

    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


def _decoder() -> StepDecoder:
    return StepDecoder(_Vocab(), Metrics(), DenseDecoder(None, _Vocab.size))


def _message(ids: torch.Tensor, probs: torch.Tensor) -> pb.StepState:
    return pb.StepState(topk=pb.TopK(ids=encode_tensor(ids), probs=encode_tensor(probs)))


IDS = torch.tensor([[5, 6, 7], [9, 8, 3]])
PROBS = torch.tensor([[0.5, 0.25, 0.125], [0.125, 0.5, 0.0]])  # row 1 out of order, one padding slot


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("prob_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_wire_dtype_decodes_to_the_same_ordered_canvas(id_dtype, prob_dtype):
    step = _decoder().decode(_message(IDS.to(id_dtype), PROBS.to(prob_dtype)), 2, "m")
    assert step.ids.tolist() == [[5, 6, 7], [8, 9, 0]]  # most probable first; padding id cleared
    assert step.probs.tolist() == [[0.5, 0.25, 0.125], [0.5, 0.125, 0.0]]
    assert step.residual.tolist() == [0.125, 0.375]
    assert step.residual_mean == 0.25  # summed in the decoding pass, not again by each reader
    assert step.ids.dtype == torch.int64 and step.probs.dtype == torch.float32


def test_decoded_arrays_are_owned_not_views_of_the_message():
    message = _message(IDS.to(torch.int32), torch.tensor([[0.5, 0.25, 0.125], [0.5, 0.125, 0.0]]))
    step = _decoder().decode(message, 2, "m")
    step.probs[0, 0] = 0.0  # writable: a monitor may not, but torch must be able to
    step.ids[0, 0] = 1
    again = _decoder().decode(message, 2, "m")
    assert again.probs[0, 0] == 0.5 and again.ids[0, 0] == 5


@pytest.mark.parametrize("case, message", [
    ("nan", "non-finite probability at position 1, slot 0"),
    ("negative", "probability -0.1 outside \\[0, 1\\] at position 0, slot 2"),
    ("id", "token id 1000 at position 1 is outside the vocabulary"),
    ("sum", "position 0 sums to 1.2500 > 1"),
])
def test_the_compiled_check_refuses_what_the_diagnosis_then_names(case, message):
    from canvaswatch.server.bottleneck.step_decoder import StepError

    ids, probs = IDS.clone(), PROBS.clone()
    if case == "nan":
        probs[1, 0] = float("nan")
    elif case == "negative":
        probs[0, 2] = -0.1
    elif case == "id":
        ids[1, 1] = 1000  # holds mass: refused (the same id as padding would be cleared)
    else:
        probs[0] = torch.tensor([0.5, 0.5, 0.25])
    with pytest.raises(StepError, match=message):
        _decoder().decode(_message(ids.to(torch.int32), probs), 2, "m")


def test_an_id_outside_the_vocabulary_in_a_padding_slot_is_cleared_not_refused():
    ids = IDS.clone()
    ids[1, 2] = 5000  # its slot holds probability 0
    step = _decoder().decode(_message(ids, PROBS), 2, "m")
    assert step.ids.tolist() == [[5, 6, 7], [8, 9, 0]]


def test_the_logits_form_clears_empty_slots_like_the_topk_form():
    # A row with fewer finite logits than k: its slots past them hold probability 0 and id 0 in both forms.
    logits = torch.full((2, _Vocab.size), float("-inf"))
    logits[:, 7], logits[:, 9] = 2.0, 1.0
    step = _decoder().decode(pb.StepState(logits=encode_tensor(logits)), 2, "m")
    assert step.ids_np[:, :2].tolist() == [[7, 9], [7, 9]]
    assert (step.ids_np[:, 2:] == 0).all() and (step.probs_np[:, 2:] == 0).all()
