"""The knobs every importer shares (`import_capture(..., **opts)`), with their defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from canvaswatch.server.importers.commit_order import CHANGE_PROB, NEIGHBOUR_SHARE
from canvaswatch.server.importers.text import GEMMA_VOCAB_SIZE, PLACEHOLDER_BASE, TextEncoder, load_encoder


@dataclass
class ImportOptions:
    seed: int = 0                       # mixed with each request id into the fill rules' random streams
    vocab_size: int = GEMMA_VOCAB_SIZE  # ids at or above it are refused
    canvas_length: int | None = None    # clean/bench_order/poem: the canvas (default 256); films: content length
    steps: int | None = None            # clean only: steps per trace (default max(48, last lock + 2))
    placeholder_base: int = PLACEHOLDER_BASE
    change_prob: float = CHANGE_PROB
    neighbour_share: float = NEIGHBOUR_SHARE
    signals: bool = True                # send the sampler signals (argmax_ids, accepted, entropy, temperature)
    tokenizer: str | None = None        # a vocabulary spec as in config [vocab] tokenizer (default: Gemma)
    encoder: TextEncoder | None = None  # or the vocabulary itself (tests pass a small one)
    _loaded: TextEncoder | None = field(default=None, repr=False)

    def text_encoder(self) -> TextEncoder:
        if self.encoder is not None:
            return self.encoder
        if self._loaded is None:
            self._loaded = load_encoder(self.tokenizer)
        return self._loaded
