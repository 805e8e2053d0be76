"""Micro-batching: concurrent streams' dense steps decoded in one launch.

A GPU decode of one small canvas (L = 16..256) leaves most of the device idle;
rows from different requests are independent, so steps that arrive within a
short window (`dense.batch_window_ms`) are concatenated along the row axis,
decoded together, and split back. Callers block only for their own result;
the window bounds the latency added to any step.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

import torch

from canvaswatch.client.token_bottleneck import Bottleneck
from canvaswatch.server.dense import DenseDecoder


class DenseBatcher:
    def __init__(self, decoder: DenseDecoder, window_s: float, max_rows: int = 8192) -> None:
        self.decoder = decoder
        self.window_s = window_s
        self.max_rows = max_rows
        self.launches = 0
        self.requests = 0
        self._pending: list[tuple[torch.Tensor, Future]] = []
        self._rows = 0
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="canvaswatch-dense-batcher", daemon=True)
        self._thread.start()

    # DenseDecoder's interface, so the step decoder can use either
    @property
    def embeddings(self) -> torch.Tensor | None:
        return self.decoder.embeddings

    @property
    def hidden_size(self) -> int | None:
        return self.decoder.hidden_size

    def decode_logits(self, logits: torch.Tensor) -> Bottleneck:
        return self.decoder.decode_logits(logits)

    def decode_embeddings(self, hidden: torch.Tensor) -> Bottleneck:
        """Queue [L, d] and wait for its share of the next batched launch."""
        future: Future = Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("the dense batcher is closed")
            self._pending.append((hidden, future))
            self._rows += hidden.shape[0]
            self.requests += 1
            self._ready.notify()
        return future.result()

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            with self._ready:
                while not self._pending and not self._closed:
                    self._ready.wait()
                if self._closed and not self._pending:
                    return
                # Hold the window open for more steps, unless the batch is already full.
                self._ready.wait_for(lambda: self._rows >= self.max_rows or self._closed, timeout=self.window_s)
                batch, self._pending, self._rows = self._pending, [], 0
            self._launch(batch)

    def _launch(self, batch: list[tuple[torch.Tensor, Future]]) -> None:
        self.launches += 1
        try:
            device = self.decoder.device
            hidden = torch.cat([h.to(device) for h, _ in batch], dim=0)
            kept = self.decoder.decode_embeddings(hidden)
        except Exception as err:  # every waiter learns of the failure, none hangs
            for _, future in batch:
                future.set_exception(err)
            return
        start = 0
        for rows, future in ((h.shape[0], f) for h, f in batch):
            stop = start + rows
            future.set_result(Bottleneck(ids=kept.ids[start:stop], probs=kept.probs[start:stop],
                                         residual=kept.residual[start:stop], top_p=kept.top_p))
            start = stop
