"""The sidecar's data path, transport-free: open a session, decode and monitor a step, finish.

The gRPC servicer calls these from a worker thread per step; `check_trace`
runs a whole recorded trace in-process (the `Check` RPC and `canvaswatch
check`). Errors are StepError with a gRPC status and a message naming the
field, raised before any state changes, so a bad message never corrupts a
session or touches another stream.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import structlog
import torch

from canvaswatch.client.tensors import encode_tensor
from canvaswatch.monitors.base import FinalCanvas, Flag, Monitor, Vocabulary
from canvaswatch.monitors.compiled import compile_twins
from canvaswatch.monitors.phrases import link_phrase_matchers
from canvaswatch.monitors.registry import describe_params
from canvaswatch.server.ops.audit import AuditLog
from canvaswatch.server.config import Config
from canvaswatch.server.pipeline.wire import request_meta
from canvaswatch.server.bottleneck.step_decoder import StepDecoder
from canvaswatch.server.errors import StepError, invalid
from canvaswatch.server.bottleneck.batching import DenseBatcher
from canvaswatch.server.bottleneck.contract import Decoder
from canvaswatch.server.bottleneck.dense import build_dense_decoder
from canvaswatch.server.ops.metrics import Metrics
from canvaswatch.server.ops.report import RequestHistory, ReportWriter
from canvaswatch.server.pipeline.session import Session, SessionSettings, SessionVerdict
from canvaswatch.server.pipeline.sinks.audit import AuditSink
from canvaswatch.server.pipeline.sinks.base import Sink
from canvaswatch.server.pipeline.sinks.log import LogSink
from canvaswatch.server.pipeline.sinks.metrics import MetricsSink
from canvaswatch.server.pipeline.sinks.report import ReportSink
from canvaswatch.v1 import monitor_pb2 as pb

log = structlog.get_logger(__name__)

# A request's output ids (the final message): its canvases' tokens, e.g. 256 blocks of L = 4,096. More is no
# output but a memory attack: as Python ints the ids cost ~14x their wire size, under the GIL.
MAX_OUTPUT_IDS = 1 << 20


class Engine:
    def __init__(self, config: Config, vocab: Vocabulary, metrics: Metrics | None = None,
                 monitors: list[Monitor] | None = None, dense: Decoder | None = None) -> None:
        self.config = config
        self.vocab = vocab
        self.metrics = metrics or Metrics()
        # Built once per engine and closed once in close(): a constructor may load a model or start a thread.
        self.monitors = monitors if monitors is not None else config.build_monitors()
        self._monitors_closed = False
        if not self.monitors:
            # A config that names monitors runs only those: one that only switches one off runs none at all.
            log.warning("no_monitors_enabled", hint="a config with [monitors.*] tables runs only the monitors it "
                        "names and enables; to drop one built-in from the defaults, name the others")
        link_phrase_matchers(self.monitors)
        self.reports = (ReportWriter(config.logging.report_dir, config.logging.report_max_files,
                                     content=config.logging.log_content)
                        if config.logging.report_dir else None)
        self.sinks = self._build_sinks(config)
        self.dense: Decoder = dense if dense is not None else build_dense_decoder(config.dense, vocab.size)
        self.batcher = None
        if config.dense.batch_window_ms > 0 and self.dense.embeddings is not None:
            self.batcher = DenseBatcher(self.dense, config.dense.batch_window_ms / 1000.0)
        self.decoder = StepDecoder(vocab, self.metrics, self.batcher or self.dense)
        self.settings = SessionSettings(
            policy=config.server.monitor_policy,
            budget_s=config.server.monitor_budget_ms / 1000.0,
            budget_strikes=config.server.monitor_budget_strikes,
            hard_budget_s=config.server.monitor_budget_hard_ms / 1000.0,
            max_flags_per_monitor=config.server.max_flags_per_monitor,
            max_verdict_bytes=config.server.max_verdict_bytes,
            stream_flags_past_bounds=config.server.stream_flags_past_bounds,
        )

    def _build_sinks(self, config: Config) -> list[Sink]:
        """Where flags and verdicts go, in this order. Every session shares this list: a sink
        appended to `engine.sinks` gets the flags and verdicts raised from then on."""
        sinks: list[Sink] = [MetricsSink(self.metrics)]
        if config.logging.audit_log:
            try:
                audit = AuditLog(config.logging.audit_log, include_content=config.logging.log_content,
                                 max_bytes=config.logging.audit_max_bytes, backups=config.logging.audit_backups)
            except OSError as err:  # one line naming the key at start-up, not a traceback
                raise OSError(f"logging.audit_log: cannot write {config.logging.audit_log!r}: "
                              f"{_why_unwritable(config.logging.audit_log, err)}") from None
            sinks.append(AuditSink(audit))
        if self.reports is not None:
            sinks.append(ReportSink(self.reports, self.vocab))
        sinks.append(LogSink(log_content=config.logging.log_content, max_per_monitor=config.server.max_flags_per_monitor))
        return sinks

    def warm_up(self) -> None:
        """Run the top-k path on synthetic requests, off the books, before serving: one with the top-k
        alone and one with the sampler's signals as well (accepted mask, entropy, argmax canvas,
        temperature: what the transformers and vLLM adapters send), whose kernels differ.

        The per-step kernels are compiled on first use (~0.5 s each on a machine that has not
        cached them yet), with their GIL-free twins, and the phrase scan builds its table per
        vocabulary: done here, no request waits for it (tests/server/test_warm_up.py checks that
        serving flagged traffic of both kinds compiles nothing more). Nothing is counted, logged or
        kept; a monitor that fails on the synthetic canvas is left to fail (and be isolated) on real ones.
        """
        length, k = 16, 4
        ids = (torch.arange(length * k, dtype=torch.int32).reshape(length, k) * 7919) % self.vocab.size
        settled = torch.tensor([0.85, 0.1, 0.03, 0.0]).repeat(length, 1)
        drafting = settled.clone()
        drafting[length // 2:] = torch.tensor([0.3, 0.2, 0.1, 0.0])  # half the canvas settles a step later:
        # an order to judge (non_chronological's block-end kernels run too)
        topk_only = [pb.StepState(step=number, topk=pb.TopK(ids=encode_tensor(ids), probs=encode_tensor(probs)))
                     for number, probs in enumerate((drafting, settled))]
        with_signals = []
        for message, probs in zip(topk_only, (drafting, settled)):
            signalled = pb.StepState()
            signalled.CopyFrom(message)
            signalled.accepted.CopyFrom(encode_tensor((probs[:, 0] >= 0.5).to(torch.uint8)))
            signalled.entropy.CopyFrom(encode_tensor(torch.full((length,), 0.5, dtype=torch.float16)))
            signalled.argmax_ids.CopyFrom(encode_tensor(ids[:, 0].contiguous()))
            signalled.temperature = 0.6
            with_signals.append(signalled)
        decoder = StepDecoder(self.vocab, Metrics(), self.dense)
        meta = request_meta(pb.RequestInfo(request_id="warm-up", canvas_length=length), "info")
        try:  # decoded once, read by every monitor
            requests = [[decoder.decode(message, length, "warm-up") for message in messages]
                        for messages in (topk_only, with_signals)]
        except Exception as err:  # noqa: BLE001 - warm-up must never stop a start-up
            log.debug("warm_up_skipped", monitor=None, error=f"{type(err).__name__}: {err}")
            requests = []
        for monitor in self.monitors:
            for steps in requests:
                try:
                    state = monitor.start(meta)
                    for number, step in enumerate(steps):
                        monitor.on_step(state, dataclasses.replace(step, new_block=True) if number == 0 else step)
                    monitor.on_finish(state, FinalCanvas(output_ids=(), text="", steps_seen=2, steps_dropped=0))
                except Exception as err:  # noqa: BLE001 - warm-up must never stop a start-up
                    log.debug("warm_up_skipped", monitor=monitor.name, error=f"{type(err).__name__}: {err}")
        # The final canvas's text (finish decodes the output ids): otherwise the text kernel is first loaded
        # (~10 ms from the disk cache, ~0.5 s to compile without one) inside the first request's final message.
        self.vocab.decode(tuple(int(token) for token in ids[:, 0]))
        # The GIL-free twins large canvases use (monitors/compiled.py): compiled now, not by the first huge step
        # while it holds the GIL.
        compile_twins()

    def open(self, info: pb.RequestInfo, where: str, keep_history: bool = False) -> Session:
        meta = request_meta(info, where, self.config.server.max_prompt_ids)
        ids = meta.prompt_ids
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab.size):
            # as every other id field: a plugin decoding the prompt must not meet an id the vocabulary lacks
            raise invalid(f"{where}.prompt_ids: id outside the vocabulary [0, {self.vocab.size})")
        # debug: request_finished is the one info line a request gets (it names the model and canvas too);
        # per-request log lines cost sidecar CPU under request-rate load (BENCHMARKS.md, "Per-request log lines")
        log.debug("request_started", request_id=meta.request_id, model=meta.model, canvas_length=meta.canvas_length)
        report = self.reports.path_for(meta.request_id) if self.reports is not None else None
        history = RequestHistory(meta) if keep_history or report is not None else None
        return Session(meta=meta, monitors=self.monitors, settings=self.settings, metrics=self.metrics,
                       sinks=self.sinks, history=history, report_path=report)

    def step(self, session: Session, message: pb.StepState, where: str) -> list[Flag]:
        """Validate, decode and monitor one message (final ones included, for their state)."""
        if message.WhichOneof("state") is None and not message.final and message.HasField("info") and session.last is None:
            return []  # a header: the first message may carry only the request's info
        if message.final:
            self._output_of(message, where)  # refused before its state reaches the monitors and the sinks
        previous = session.last
        if message.WhichOneof("state") is not None:
            # A final message without a state carries no step, so only states are ordered.
            session.check_order(message.block, message.step, where)
        try:
            decoded = self.decoder.decode(message, session.meta.canvas_length, where)
        except Exception:
            session.last = previous
            raise
        session.note_dropped(message.client_dropped_steps)
        if decoded is None:
            return []
        if previous is None or previous[0] != decoded.block:
            # Only the session knows the request's previous step; once per block, so the copy costs nothing.
            decoded = dataclasses.replace(decoded, new_block=True)
        return session.on_step(decoded)

    def finish(self, session: Session, message: pb.StepState, where: str) -> tuple[list[Flag], SessionVerdict]:
        output = self._output_of(message, where)
        return session.finish(output, self.vocab.decode(output))

    def _output_of(self, message: pb.StepState, where: str) -> tuple[int, ...]:
        """The final message's output ids, checked: at most MAX_OUTPUT_IDS, each in the vocabulary."""
        count = len(message.output_ids)
        if count > MAX_OUTPUT_IDS:
            raise invalid(f"{where}.output_ids: {count} ids, more than {MAX_OUTPUT_IDS} (a request's output is "
                          "its canvases' tokens)")
        output = tuple(message.output_ids)
        if output and (min(output) < 0 or max(output) >= self.vocab.size):
            raise invalid(f"{where}.output_ids: id outside the vocabulary [0, {self.vocab.size})")
        return output

    def history_of(self, trace: pb.Trace) -> RequestHistory:
        """Check a trace and keep what a report shows: every step's top-1, the flags, the output."""
        verdict, session = self._check(trace, keep_history=True)
        session.history.flags = list(verdict.flags)
        return session.history

    def check_trace(self, trace: pb.Trace, opened: Callable[[Session], None] | None = None) -> SessionVerdict:
        """A whole recorded trace, in order; the first step may rely on trace.info. `opened` gets the
        session once it exists (the Check RPC's hard-deadline watchdog reads which monitor is running)."""
        return self._check(trace, keep_history=False, opened=opened)[0]

    def _check(self, trace: pb.Trace, keep_history: bool,
               opened: Callable[[Session], None] | None = None) -> tuple[SessionVerdict, Session]:
        if not trace.steps:
            raise invalid("steps: the trace has no steps")
        first = trace.steps[0]
        info = first.info if first.HasField("info") else trace.info
        if not info.request_id and not info.canvas_length:
            raise invalid("info: required on the trace or its first step")
        try:
            session = self.open(info, "info", keep_history=keep_history)
        except StepError:
            self.metrics.requests.labels(self.metrics.model_label(info.model), "invalid").inc()  # as Watch counts it
            raise
        if opened is not None:
            opened(session)
        try:
            for index, message in enumerate(trace.steps):
                where = f"steps[{index}]"
                if message.final and index != len(trace.steps) - 1:
                    raise invalid(f"{where}.final: the final step must be the last one")
                self.step(session, message, where)
                if message.final:
                    _, verdict = self.finish(session, message, where)
                    self.metrics.requests.labels(session.model_label, "truncated" if verdict.flags_dropped else "ok").inc()
                    return verdict, session
        except StepError:
            self.metrics.requests.labels(session.model_label, "invalid").inc()
            raise
        self.metrics.requests.labels(session.model_label, "incomplete").inc()
        raise invalid(f"steps[{len(trace.steps) - 1}].final: the trace ends without a final step")

    def list_monitors(self) -> pb.ListMonitorsResponse:
        return pb.ListMonitorsResponse(
            monitors=[
                pb.MonitorInfo(name=m.name, description=getattr(m, "description", ""), params=_params_of(m))
                for m in self.monitors
            ]
        )

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        if not self._monitors_closed:  # each monitor is closed once, however often the engine is
            self._monitors_closed = True
            for monitor in self.monitors:
                close = getattr(monitor, "close", None)  # optional: monitors that own threads or files
                if callable(close):
                    close()
        for sink in self.sinks:
            sink.close()


def _params_of(monitor: Monitor) -> dict[str, str]:
    params = getattr(monitor, "params", None)
    return describe_params(params) if dataclasses.is_dataclass(params) else {}


def _why_unwritable(path: str, err: OSError) -> str:
    """The reason to print: a file where a folder of the path should be, named (making the folders
    reports only 'File exists' there), else the OS's own."""
    for parent in Path(path).parents:
        if parent.exists():
            return f"{str(parent)!r} is a file, not a folder" if not parent.is_dir() else (err.strerror or str(err))
    return err.strerror or str(err)
