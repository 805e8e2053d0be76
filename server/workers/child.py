"""A monitor worker process: its own engine, the streams pinned to it, frames in and replies out.

The worker parses, decodes and monitors each stream's messages in order with the same
StreamHandler as in-process mode, so both modes give one definition of stream order, final,
incomplete and outcome. It answers each batch of frames at once, with a snapshot of its metrics
after a stream ends or every half second while busy (merged into the front's /metrics).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import select
import signal
import time
from typing import Any

import structlog
import torch

from canvaswatch.server.config import Config
from canvaswatch.server.ops.merged_metrics import Family, snapshot
from canvaswatch.server.workers.protocol import REPLY, Frame, StreamStatus, take_requests, write_all
from canvaswatch.server.workers.streams import StreamTable

log = structlog.get_logger(__name__)

SNAPSHOT_EVERY_S = 0.5
ACK_EVERY_S = 0.1  # within a batch, acknowledge the frames done so far at least this often


def worker_main(index: int, config: Config, embeddings: torch.Tensor | None, log_level: str,
                requests: Any, replies: Any) -> None:
    """Entry point of a worker process: build an engine, then serve frames until told to stop."""
    from canvaswatch.server.ops.logs import configure_logging

    # Ctrl-C reaches the whole process group; the front stops its workers itself, in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(log_level)
    structlog.contextvars.bind_contextvars(worker=index)
    torch.set_num_threads(1)  # N workers share the machine's cores; intra-op threads would oversubscribe them
    in_fd, out_fd = requests.fileno(), replies.fileno()

    def reply(items: list) -> None:
        body = pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)
        write_all(out_fd, REPLY.pack(len(body)) + body)

    try:
        worker = Worker(config, embeddings)
    except Exception as err:
        reply([("failed", f"{type(err).__name__}: {err}")])
        return
    reply([("ready", index)])
    buffer = bytearray()
    last_snapshot, dirty = time.monotonic(), False
    while True:
        frames = take_requests(buffer)
        if not frames:
            wait = max(0.0, last_snapshot + SNAPSHOT_EVERY_S - time.monotonic()) if dirty else None
            readable, _, _ = select.select([in_fd], [], [], wait)
            if not readable:  # quiet for a while: let the scrapes catch up with the last steps
                reply([("metrics", worker.snapshot())])
                last_snapshot, dirty = time.monotonic(), False
                continue
            chunk = os.read(in_fd, 1 << 20)
            if not chunk:  # the front went away
                worker.close()
                return
            buffer += chunk
            continue
        out: list[tuple] = []
        ended = False
        done, acked_at = 0, time.monotonic()
        for kind, stream_id, body in frames:
            if kind == Frame.STOP:
                worker.close()
                return
            result = worker.handle(kind, stream_id, body)
            done += 1
            if result is not None:
                out.append(result)
                ended = ended or result[2] is not None  # finished or over: the snapshot goes with it
            if done < len(frames) and time.monotonic() - acked_at >= ACK_EVERY_S:
                # A long batch (many frames, slow monitors) is acknowledged as it goes: the watchdog's
                # deadline is for one call, not for everything that arrived in one read.
                last_snapshot = _answer(reply, worker, out, done, ended, last_snapshot)
                out, ended, done, acked_at = [], False, 0, time.monotonic()
        sent_at = _answer(reply, worker, out, done, ended, last_snapshot)
        dirty, last_snapshot = sent_at == last_snapshot, sent_at  # steps since the last snapshot, unsent


def _answer(reply, worker: "Worker", out: list[tuple], done: int, ended: bool, last_snapshot: float) -> float:
    """Send what `done` frames produced, with their acknowledgement; returns when metrics were last sent."""
    if ended or time.monotonic() - last_snapshot >= SNAPSHOT_EVERY_S:
        # in the same reply as a stream's last events: a client that saw its verdict sees its metrics
        out.append(("metrics", worker.snapshot()))
        last_snapshot = time.monotonic()
    # Every frame is acknowledged, answered or not: the front's watchdog tells a worker making
    # progress from one stuck in a call (server.monitor_hard_deadline_s) by these.
    out.append(("progress", done))
    reply(out)
    return last_snapshot


class Worker:
    """A worker's engine and its open streams' handlers."""

    def __init__(self, config: Config, embeddings: torch.Tensor | None) -> None:
        from canvaswatch.server.bottleneck.dense import build_dense_decoder
        from canvaswatch.server.pipeline.engine import Engine
        from canvaswatch.server.ops.metrics import Metrics
        from canvaswatch.server.bottleneck.vocab import load_vocabulary

        if config.dense.batch_window_ms > 0:
            # A worker handles its messages one at a time, so a batching window would only add its
            # wait to every dense step: nothing from another stream can arrive inside it.
            log.info("dense_batching_off_in_worker", batch_window_ms=config.dense.batch_window_ms)
            config = dataclasses.replace(config, dense=dataclasses.replace(config.dense, batch_window_ms=0.0))
        vocab = load_vocabulary(config.vocab.tokenizer)
        dense = build_dense_decoder(config.dense, vocab.size, embeddings=embeddings)
        self.engine = Engine(config, vocab, metrics=Metrics(), dense=dense)
        self.engine.warm_up()
        self.streams = StreamTable(self.engine)

    def snapshot(self) -> list[Family]:
        return snapshot(self.engine.metrics.registry)

    def close(self) -> None:
        self.engine.close()

    def handle(self, kind: int, stream_id: int, body: bytes) -> tuple[int, list[bytes], StreamStatus | None] | None:
        """(stream id, serialised events, status or None) for a message, an end or a cancel."""
        return self.streams.handle(kind, stream_id, body)
