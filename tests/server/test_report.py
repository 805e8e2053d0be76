"""`canvaswatch inspect` renders a request's timeline; checked in headless Chromium, and linked from the audit log."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from canvaswatch.client import simulate
from canvaswatch.client.replay import replay
from canvaswatch.client.trace import write_traces
from canvaswatch.server.cli import main
from tests.conftest import start_sidecar

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)")


class _Dom(HTMLParser):
    """Counts what the assertions need from the DOM Chromium serialised."""

    def __init__(self) -> None:
        super().__init__()
        self.grids: list[dict[str, str]] = []
        self.cells = 0
        self.flagged_cells: list[tuple[str, str]] = []
        self.flags: list[dict[str, str]] = []
        self.marks = 0
        self.axis: list[str] = []
        self.swatches: list[str] = []
        self._row_step = ""

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        classes = (attributes.get("class") or "").split()
        if tag == "table" and "grid" in classes:
            self.grids.append(attributes)
        elif tag == "tr" and "data-step" in attributes:
            self._row_step = attributes["data-step"]
        elif tag == "td" and "c" in classes:
            self.cells += 1
            if "flagged" in classes:
                self.flagged_cells.append((self._row_step, attributes["data-pos"]))
        elif tag == "li" and "flag" in classes:
            self.flags.append(attributes)
        elif tag == "mark":
            self.marks += 1
        elif tag == "th" and "axis" in classes:
            self.axis.append(attributes["data-axis"])
        elif tag == "span" and "swatch" in classes and "data-prob" in attributes:
            self.swatches.append(attributes["data-prob"])


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", *args],
        capture_output=True, text=True, timeout=120,
    )


@needs_chromium
def test_inspect_report_renders_the_grid_flags_and_evidence_in_chromium(vocab, tmp_path: Path):
    trace = simulate.scenario("transient_phrase", vocab.encode, vocab.size, request_id="report-1", seed=3)
    path = tmp_path / "trace.cwtrace"
    write_traces(path, [trace])
    report = tmp_path / "report.html"
    assert main(["inspect", str(path), "-o", str(report)]) == 0

    shot = tmp_path / "shot.png"
    screenshot = _chromium(f"--user-data-dir={tmp_path / 'profile-1'}", "--window-size=1400,900",
                           f"--screenshot={shot}", report.as_uri())
    assert shot.exists() and shot.stat().st_size > 10_000, screenshot.stderr[-2000:]
    dumped = _chromium(f"--user-data-dir={tmp_path / 'profile-2'}", "--dump-dom", report.as_uri())
    dom = _Dom()
    dom.feed(dumped.stdout)

    [grid] = dom.grids
    length, steps = trace.info.canvas_length, trace.info.total_steps
    assert (grid["data-positions"], grid["data-steps"]) == (str(length), str(steps))
    assert dom.cells == length * steps
    assert [f["data-monitor"] for f in dom.flags] == ["lexicon", "lexicon"]
    first_step = trace.info.total_steps // 4  # where the scenario plants the phrase
    assert dom.flagged_cells and all(step == str(first_step) for step, _ in dom.flagged_cells)
    assert dom.marks == len(dom.flagged_cells)  # the same positions marked in the final text
    # A reader can tell what the colours mean and where a column is on the canvas.
    assert dom.swatches == ["0.00", "0.25", "0.50", "0.75", "1.00"]
    assert dom.axis == [str(p) for p in range(0, length, 10)]


@pytest.mark.parametrize("content", [False, True])
def test_flagged_requests_get_a_report_linked_from_the_audit_log(vocab, tmp_path: Path, dense, content):
    running = start_sidecar(vocab, tmp_path, {"logging": {"report_dir": str(tmp_path / "reports"),
                                                          "log_content": content}}, dense=dense)
    try:
        with running.channel() as channel:
            replay(simulate.scenario("self_correction", vocab.encode, vocab.size, request_id="linked/1", seed=1), channel)
            replay(simulate.scenario("clean", vocab.encode, vocab.size, request_id="clean-1", seed=1), channel)
    finally:
        running.thread.stop()
    entries = [json.loads(line) for line in running.audit_path.read_text().splitlines()]
    [entry] = [e for e in entries if e["request_id"] == "linked/1"]
    report = Path(entry["report"])
    # "/" replaced: a hash of the id keeps the name apart from a request really called "linked_1"
    assert report.name.startswith("linked_1-") and report.exists()
    text = report.read_text()
    assert "settled tokens flipped" in text
    # decoded text only where logging.log_content allows it, as in the audit log
    final = vocab.decode(list(simulate.scenario("self_correction", vocab.encode, vocab.size, request_id="linked/1",
                                                seed=1).steps[-1].output_ids))
    words = [w for w in final.split() if len(w) > 6][:5]
    assert words and all((w in text) == content for w in words), words
    assert ('class="final"' in text) == content and ("not kept: logging.log_content" in text) != content
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == [report.name]  # clean: no report


def test_report_history_keeps_at_most_max_cells_and_says_how_many_steps_it_left_out(vocab):
    import numpy as np

    from canvaswatch.monitors.base import RequestMeta
    from canvaswatch.server.ops.report import RequestHistory, render

    history = RequestHistory(RequestMeta("long", "m", "", (), 8, 0), max_cells=8 * 5)
    for step in range(12):
        history.add(0, step, np.full(8, 3000), np.full(8, 0.9))
    assert len(history.steps) == 5 and history.cells == 40 and history.steps_left_out == 7
    assert "7 later steps are not shown" in render(history, vocab)


def test_report_files_are_capped_and_ids_that_read_alike_get_files_of_their_own(vocab, tmp_path: Path):
    from canvaswatch.monitors.base import RequestMeta
    from canvaswatch.server.ops.report import ReportWriter, RequestHistory

    directory = tmp_path / "reports"
    directory.mkdir()
    (directory / "older.html").write_text("from an earlier run")
    writer = ReportWriter(directory, max_files=3)
    assert writer.path_for("a/b") != writer.path_for("a_b") and writer.path_for("plain-id.1").name == "plain-id.1.html"
    assert writer.path_for("..").name != "...html"  # no hidden or relative-looking names
    for n in range(4):
        request_id = f"r{n}"
        writer.write(RequestHistory(RequestMeta(request_id, "m", "", (), 8, 0)), vocab, writer.path_for(request_id))
    assert sorted(p.name for p in directory.iterdir()) == ["r1.html", "r2.html", "r3.html"]  # the oldest went first
