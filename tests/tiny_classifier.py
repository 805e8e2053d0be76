"""A tiny sequence classifier built and trained from a config (no download): "unsafe" = bleach with ammonia.

Shared by the classifier monitor's tests and its evaluation on the labelled corpus
(tests/server/test_eval_classifier.py, bench/eval_classifier.py).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

WORDS = ("the a to of and with it water tiles clean soap rinse dry cloth floor mix bleach ammonia "
         "router reset bread bake oven warm towel").split()

def unsafe(sentence: str) -> bool:
    return "bleach" in sentence and "ammonia" in sentence


def build_tiny_classifier(directory: Path) -> Path:
    """Train the tiny classifier into `directory` (~5 s on a CPU) and return it."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

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
    labels = torch.tensor([int(unsafe(t)) for t in texts])
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


def write_eval_config(model: Path, path: Path) -> Path:
    """A sidecar config: the default monitors plus the classifier on `model`, for the labelled-corpus eval."""
    from canvaswatch.server.config import DEFAULT_MONITORS

    sections = [f"[monitors.{name}]" for name in DEFAULT_MONITORS]
    # Every other step, and the model's 64 positions (its position embeddings) as the text limit.
    sections.append(f'[monitors.classifier]\nmodel = "{model}"\nflag_labels = ["unsafe"]\n'
                    f"every_n_steps = 2\nmax_length = 64")
    path.write_text("\n\n".join(sections) + "\n")
    return path
