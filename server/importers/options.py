"""The knobs every importer shares (`import_capture(..., **opts)`), with their defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, TypeVar

from canvaswatch.server.importers.commit_order import CHANGE_PROB, NEIGHBOUR_SHARE
from canvaswatch.server.importers.fields import CaptureError
from canvaswatch.server.importers.text import GEMMA_VOCAB_SIZE, PLACEHOLDER_BASE, TextEncoder, load_encoder

Item = TypeVar("Item")
Built = TypeVar("Built")


@dataclass
class ImportOptions:
    seed: int = 0                       # mixed with each request id into the fill rules' random streams
    vocab_size: int = GEMMA_VOCAB_SIZE  # ids at or above it are refused
    canvas_length: int | None = None    # clean/bench_order/poem: the canvas required (default: what the run records);
                                        # films: the canvas around the content; gallery: refused
    steps: int | None = None            # clean only: steps per trace (default: its T, else max(48, last lock + 2))
    placeholder_base: int = PLACEHOLDER_BASE
    change_prob: float = CHANGE_PROB
    neighbour_share: float = NEIGHBOUR_SHARE
    signals: bool = True                # send the sampler signals (argmax_ids, accepted, entropy, temperature)
    tokenizer: str | None = None        # a vocabulary spec as in config [vocab] tokenizer (default: Gemma)
    encoder: TextEncoder | None = None  # or the vocabulary itself (tests pass a small one)
    # None: a malformed run refuses the whole file; else it is handed this error and left out
    on_invalid: Callable[[CaptureError], None] | None = None
    _loaded: TextEncoder | None = field(default=None, repr=False)

    def each_run(self, records: Iterable[Item], build: Callable[[Item], Built]) -> list[Built]:
        """`build` over a capture's records; a malformed one (CaptureError) raises, or with on_invalid set is
        reported to it and skipped, so one odd record of a large capture does not cost the rest."""
        built = []
        for record in records:
            try:
                built.append(build(record))
            except CaptureError as err:
                if self.on_invalid is None:
                    raise
                self.on_invalid(err)
        return built

    def text_encoder(self) -> TextEncoder:
        if self.encoder is not None:
            return self.encoder
        if self._loaded is None:
            self._loaded = load_encoder(self.tokenizer)
        return self._loaded
