"""The HTML report of a flagged request (logging.report_dir), written when it finishes."""

from __future__ import annotations

from canvaswatch.monitors.base import Flag, Vocabulary
from canvaswatch.server.ops.report import ReportWriter
from canvaswatch.server.pipeline.sinks.base import RequestRecord
from canvaswatch.server.pipeline.verdict import SessionVerdict


class ReportSink:
    def __init__(self, writer: ReportWriter, vocab: Vocabulary) -> None:
        self.writer = writer
        self.vocab = vocab

    def on_flag(self, request: RequestRecord, flag: Flag) -> None:
        pass  # the report shows every flag at once, so it waits for the verdict

    def on_verdict(self, request: RequestRecord, verdict: SessionVerdict) -> None:
        if request.history is None or request.report_path is None or not verdict.flags:
            return
        request.history.flags = list(verdict.flags)
        self.writer.write(request.history, self.vocab, request.report_path)

    def close(self) -> None:
        pass
