"""classifier with a tiny sequence classifier built and trained here from a config (no download)."""

from __future__ import annotations

import random
from concurrent.futures import wait
from pathlib import Path

import pytest
import torch

from canvaswatch.monitors.base import FinalCanvas, RequestMeta
from canvaswatch.monitors.classifier import ClassifierMonitor, ClassifierParams
from canvaswatch.monitors.registry import MonitorConfigError, build
from tests.monitors.canvas import canvas_step

WORDS = ("the a to of and with it water tiles clean soap rinse dry cloth floor mix bleach ammonia "
         "router reset bread bake oven warm towel").split()
META = RequestMeta("r", "m", "", (), 12, 16)


def _unsafe(sentence: str) -> bool:
    return "bleach" in sentence and "ammonia" in sentence


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("tiny-classifier")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2,
                        id2label={0: "safe", 1: "unsafe"}, label2id={"safe": 0, "unsafe": 1})
    model = BertForSequenceClassification(config)
    rng = random.Random(0)
    texts = []
    for i in range(256):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 10))]
        if i % 2:
            words[rng.randrange(len(words))] = "bleach"
            words.insert(rng.randrange(len(words) + 1), "ammonia")
        else:
            words = [w for w in words if w != "ammonia"]
        texts.append(" ".join(words))
    labels = torch.tensor([int(_unsafe(t)) for t in texts])
    batch = fast(texts, padding=True, return_tensors="pt")
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        optimiser.zero_grad()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(**batch).logits.argmax(-1) == labels).float().mean().item()
    assert accuracy > 0.97, accuracy  # the fixture itself must be a working classifier
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def _steps(monitor, texts, vocab):
    state = monitor.start(META)
    flags = []
    for step, text in enumerate(texts):
        ids = (vocab.encode(text) + vocab.encode(" the") * 12)[:12]
        flags += monitor.on_step(state, canvas_step(ids, 0.9, step=step, vocab=vocab))
    return state, flags


def test_unsafe_intermediate_text_removed_from_the_output_is_flagged(classifier_dir, vocab):
    monitor = ClassifierMonitor(ClassifierParams(model=str(classifier_dir), flag_labels=["unsafe"], every_n_steps=1,
                                                 batch_window_ms=1))
    texts = ["clean the floor with soap"] * 2 + ["mix bleach with ammonia"] * 2 + ["clean the floor with soap"] * 2
    state, early = _steps(monitor, texts, vocab)
    final_text = "clean the floor with soap"
    late = monitor.on_finish(state, FinalCanvas(tuple(vocab.encode(final_text)), final_text, 6, 0))
    phases = [f.attributes["phase"] for f in early + late]
    assert phases == ["intermediate", "intermediate_only"]
    intermediate = (early + late)[0]
    assert intermediate.evidence[0].step == 2 and "bleach" in intermediate.evidence[0].snippet
    assert intermediate.score >= 0.5


def test_unsafe_output_is_flagged_and_safe_text_is_not(classifier_dir, vocab):
    monitor = ClassifierMonitor(ClassifierParams(model=str(classifier_dir), every_n_steps=2, batch_window_ms=1))
    state, early = _steps(monitor, ["bake the bread in the oven"] * 4, vocab)
    safe = monitor.on_finish(state, FinalCanvas((), "bake the bread in the oven", 4, 0))
    assert early == [] and safe == []
    state, _ = _steps(monitor, ["rinse the tiles with water"] * 2, vocab)
    [flag] = monitor.on_finish(state, FinalCanvas((), "mix the bleach and ammonia", 2, 0))
    assert flag.attributes == {"label": "unsafe", "phase": "output", "skipped_steps": "0"}


def test_texts_from_concurrent_requests_share_batches(classifier_dir):
    monitor = ClassifierMonitor(ClassifierParams(model=str(classifier_dir), batch_window_ms=200, max_batch=64))
    futures = [monitor.runner.submit(f"clean the tiles {i}") for i in range(12)]
    wait(futures, timeout=30)
    assert all(f.done() for f in futures)
    assert monitor.runner.texts == 12 and monitor.runner.batches < 12


def test_configuration_errors_name_the_key(classifier_dir, tmp_path):
    with pytest.raises(MonitorConfigError, match="monitors.classifier.model: a transformers sequence-classification directory is required"):
        build("classifier", {}, "monitors.classifier")
    with pytest.raises(MonitorConfigError, match=r"monitors.classifier.flag_labels: \['toxic'\] are not labels"):
        build("classifier", {"model": str(classifier_dir), "flag_labels": ["toxic"]}, "monitors.classifier")
    with pytest.raises(MonitorConfigError, match="monitors.classifier.model: cannot load a sequence classifier"):
        build("classifier", {"model": str(tmp_path)}, "monitors.classifier")


def test_close_stops_the_model_thread(classifier_dir):
    monitor = ClassifierMonitor(ClassifierParams(model=str(classifier_dir)))
    assert monitor.runner.alive
    monitor.close()
    assert not monitor.runner.alive
