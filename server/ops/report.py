"""A self-contained HTML picture of one request's denoising: `canvaswatch inspect TRACE -o report.html`.

Per block, a grid with one row per denoising step and one column per canvas
position, each cell coloured by its top-1 probability (hover: the token and
its probability); cells where a settled token flipped are marked, cells named
in a flag's evidence are outlined, and a last row gives each position's
commit step (settle order). A legend says what the colours and marks mean;
the position axis is labelled every AXIS_EVERY columns. Above: the request, its flags with their evidence.
Below: the final text with flagged positions highlighted. No external assets:
one file to attach to an incident.
"""

from __future__ import annotations

import collections
import hashlib
import html
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from canvaswatch.monitors.base import Flag, RequestMeta, Vocabulary

SETTLED = 0.8
# Cells (positions x steps) a report keeps: 6 bytes each in memory while the request runs, ~100 bytes of
# HTML each in the file. 256 positions x 1,024 steps; later steps are counted, not shown.
MAX_REPORT_CELLS = 262_144
AXIS_EVERY = 10  # position labels on the grid's axis
LEGEND_PROBS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class RequestHistory:
    """What a report needs: per step the top-1 ids and probabilities, then the flags and the output."""

    meta: RequestMeta
    steps: list[tuple[int, int, np.ndarray, np.ndarray]] = field(default_factory=list)  # (block, step, ids, probs)
    flags: list[Flag] = field(default_factory=list)
    output_ids: tuple[int, ...] = ()
    max_cells: int = MAX_REPORT_CELLS
    cells: int = 0
    steps_left_out: int = 0  # steps past max_cells: counted, not kept

    def add(self, block: int, step: int, top1: np.ndarray, prob: np.ndarray) -> None:
        if self.cells + len(top1) > self.max_cells:
            self.steps_left_out += 1
            return
        self.cells += len(top1)
        self.steps.append((block, step, top1.astype(np.int32, copy=True), prob.astype(np.float16, copy=True)))


def render(history: RequestHistory, vocab: Vocabulary, content: bool = True) -> str:
    """The report's HTML. `content=False` (the sidecar under logging.log_content = false): no decoded text,
    neither the tokens' pieces, the evidence snippets nor the final output; probabilities, positions,
    flags and their reasons stay, as in the audit log."""
    meta = history.meta
    simulated = meta.attributes.get("simulated") == "true"
    flagged_cells: set[tuple[int, int, int]] = set()
    flagged_positions: dict[int, set[int]] = {}
    for flag in history.flags:
        for evidence in flag.evidence:
            for position in evidence.positions:
                flagged_cells.add((evidence.block, evidence.step, position))
                flagged_positions.setdefault(evidence.block, set()).add(position)
    parts = [_HEAD.format(title=html.escape(f"canvaswatch · {meta.request_id}"))]
    parts.append(f'<h1>Request <code>{html.escape(meta.request_id)}</code></h1>')
    badge = '<span class="simulated">SIMULATED trace</span>' if simulated else ""
    parts.append(f'<p class="meta">model <b>{html.escape(meta.model or "?")}</b> · canvas {meta.canvas_length} · '
                 f'{len(history.steps)} steps seen · {len(history.flags)} flags {badge}</p>')
    if history.steps_left_out:
        parts.append(f'<p class="meta left-out">{history.steps_left_out} later steps are not shown: a report keeps '
                     f'at most {history.max_cells:,} cells (positions x steps)</p>')
    parts.append('<h2>Flags</h2><ol class="flags">')
    for index, flag in enumerate(history.flags):
        evidence = "; ".join(
            f"block {e.block} step {e.step} positions {_positions(e.positions)}"
            + (f": <q>{html.escape(e.snippet)}</q>" if e.snippet and content else "")
            for e in flag.evidence
        )
        parts.append(f'<li class="flag sev-{flag.severity.name}" data-monitor="{html.escape(flag.monitor)}" data-flag="{index}">'
                     f'<b>{html.escape(flag.monitor)}</b> <span class="sev">{flag.severity.name}</span> '
                     f'{html.escape(flag.reason)}<div class="evidence">{evidence}</div></li>')
    parts.append("</ol>")
    parts.append(_legend())
    blocks = sorted({block for block, *_ in history.steps})
    for block in blocks:
        rows = [(step, ids, probs) for b, step, ids, probs in history.steps if b == block]
        parts.append(_grid(block, rows, vocab, flagged_cells, content))
    if not content:
        parts.append('<h2>Final output</h2><p class="meta no-content">not kept: logging.log_content = false '
                     '(no decoded text in this report)</p></body></html>')
        return "".join(parts)
    parts.append('<h2>Final output</h2><p class="final">')
    length = meta.canvas_length
    for index, token in enumerate(history.output_ids):
        piece = html.escape(vocab.piece(token))
        if index % length in flagged_positions.get(index // length, set()):
            parts.append(f'<mark class="flagged-span" data-pos="{index}">{piece}</mark>')
        else:
            parts.append(piece)
    parts.append("</p></body></html>")
    return "".join(parts)


class ReportWriter:
    """Reports for flagged requests into one directory (`logging.report_dir`); audit lines link to them.

    At most `max_files` reports stay there (0: no limit): writing one more removes the oldest, those
    found at start by modification time first, then in the order written."""

    def __init__(self, directory: str | Path, max_files: int = 0, content: bool = True) -> None:
        self.directory = Path(directory)
        self.max_files = max_files
        self.content = content  # decoded text in the reports (logging.log_content)
        found = sorted(self.directory.glob("*.html"), key=_mtime) if self.directory.is_dir() else []
        self._written: collections.OrderedDict[Path, None] = collections.OrderedDict((p, None) for p in found)

    def path_for(self, request_id: str) -> Path:
        """A file name from the request id; where characters had to be replaced, a hash of the id keeps two ids
        apart that read the same once replaced ("a/b" and "a_b")."""
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in request_id)[:200]
        if safe != request_id or safe.startswith("."):
            safe = f"{safe}-{hashlib.sha256(request_id.encode()).hexdigest()[:12]}"
        return self.directory / f"{safe}.html"

    def write(self, history: RequestHistory, vocab: Vocabulary, path: Path) -> Path:
        written = write_report(history, vocab, path, content=self.content)
        self._written.pop(written, None)
        self._written[written] = None
        while self.max_files and len(self._written) > self.max_files:
            oldest, _ = self._written.popitem(last=False)
            oldest.unlink(missing_ok=True)
        return written


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def write_report(history: RequestHistory, vocab: Vocabulary, path: str | Path, content: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(history, vocab, content), encoding="utf-8")
    return path


def _grid(block: int, rows: list[tuple[int, np.ndarray, np.ndarray]], vocab: Vocabulary,
          flagged: set[tuple[int, int, int]], content: bool = True) -> str:
    length = len(rows[0][1]) if rows else 0
    commit = _commit_steps(rows)
    out = [f'<h2>Block {block}</h2><div class="scroll"><table class="grid" data-block="{block}" '
           f'data-positions="{length}" data-steps="{len(rows)}"><thead><tr><th>step ↓ · position →</th>']
    # A number every AXIS_EVERY columns, spanning them: one per 9-pixel column would overlap.
    for start in range(0, length, AXIS_EVERY):
        span = min(AXIS_EVERY, length - start)
        out.append(f'<th class="axis" colspan="{span}" data-axis="{start}">{start}</th>')
    out.append("</tr></thead><tbody>")
    previous_ids = previous_probs = None
    for step, ids, probs in rows:
        out.append(f'<tr data-step="{step}"><th>{step}</th>')
        for position in range(length):
            token, prob = int(ids[position]), float(probs[position])
            classes = ["c"]
            if previous_ids is not None and previous_ids[position] != token and previous_probs[position] >= SETTLED:
                classes.append("flip")
            if (block, step, position) in flagged:
                classes.append("flagged")
            tip = html.escape(f"{vocab.piece(token)!r} {prob:.2f}" if content else f"{prob:.2f}", quote=True)
            out.append(f'<td class="{" ".join(classes)}" data-pos="{position}" style="background:{_colour(prob)}" '
                       f'title="{tip}"></td>')
        out.append("</tr>")
        previous_ids, previous_probs = ids, probs
    out.append('</tbody><tfoot><tr class="settle"><th>settled</th>')
    out += [f"<td>{'' if c < 0 else c}</td>" for c in commit]
    out.append("</tr></tfoot></table></div>")
    return "".join(out)


def _commit_steps(rows: list[tuple[int, np.ndarray, np.ndarray]]) -> list[int]:
    """Per position, the step from which its final top-1 held at >= SETTLED to the end (-1: never)."""
    if not rows:
        return []
    final_ids = rows[-1][1]
    commit = np.full(len(final_ids), -1)
    unbroken = np.ones(len(final_ids), dtype=bool)  # still in the run that reaches the block's end
    for step, ids, probs in reversed(rows):
        unbroken &= (ids == final_ids) & (probs >= SETTLED)
        commit = np.where(unbroken, step, commit)
    return commit.tolist()


def _legend() -> str:
    """What the grid's colours and marks mean, with the same colour function the cells use."""
    scale = "".join(f'<span class="swatch" style="background:{_colour(p)}" data-prob="{p:.2f}"></span>'
                    f'<span class="tick">{p:g}</span>' for p in LEGEND_PROBS)
    return ('<div class="legend"><b>How to read the grid</b>: one row per denoising step (top to bottom), one '
            'column per canvas position (left to right); hover a cell for its top-1 token and probability.'
            f'<div class="scale">top-1 probability {scale}</div>'
            '<div><span class="swatch flip-key"></span> a token that had held at '
            f'≥ {SETTLED:g} was replaced at this step · <span class="swatch flagged-key"></span> named in a '
            "flag's evidence · last row: the step from which each position's final token held at "
            f"≥ {SETTLED:g} (its commit step)</div></div>")


def _colour(prob: float) -> str:
    # pale for noise, deep blue once confident: the canvas settling is visible at a glance
    lightness = 96 - int(min(max(prob, 0.0), 1.0) * 60)
    return f"hsl(215,70%,{lightness}%)"


def _positions(positions: tuple[int, ...]) -> str:
    if not positions:
        return "-"
    if len(positions) > 1 and positions[-1] - positions[0] == len(positions) - 1:
        return f"{positions[0]}-{positions[-1]}"
    return ",".join(str(p) for p in positions)


_HEAD = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>
body{{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1b1f24}}
h1{{font-size:20px}} h2{{font-size:16px;margin-top:24px}} code{{font-size:13px}}
.meta{{color:#555}} .simulated{{background:#fde68a;padding:1px 6px;border-radius:4px;margin-left:8px}}
.flags li{{margin:6px 0}} .sev{{font-size:11px;padding:1px 5px;border-radius:3px;background:#e5e7eb}}
.sev-CRITICAL .sev{{background:#fecaca}} .sev-WARNING .sev{{background:#fde68a}} .sev-INFO .sev{{background:#dbeafe}}
.evidence{{color:#444;font-size:12px}} .scroll{{overflow-x:auto}}
table.grid{{border-collapse:collapse}} .grid th{{font:10px monospace;color:#666;padding:0 2px}}
.grid td.c{{width:9px;height:9px;padding:0;border:1px solid #fff}}
.grid td.flip{{box-shadow:inset 0 0 0 2px #f59e0b}} .grid td.flagged{{outline:2px solid #dc2626;outline-offset:-2px}}
.settle td{{font:9px monospace;color:#444;text-align:center}}
.final{{white-space:pre-wrap;font-family:ui-monospace,monospace;background:#f6f8fa;padding:12px;border-radius:6px}}
mark.flagged-span{{background:#fecaca}}
.legend{{font-size:12px;color:#333;margin:12px 0;line-height:1.8}} .legend .scale{{margin:4px 0}}
.swatch{{display:inline-block;width:14px;height:14px;vertical-align:middle;border:1px solid #ccc;margin:0 2px}}
.tick{{font:10px monospace;margin-right:8px}} .flip-key{{box-shadow:inset 0 0 0 2px #f59e0b}}
.flagged-key{{outline:2px solid #dc2626;outline-offset:-2px}}
.grid th.axis{{text-align:left;border-left:1px solid #bbb}}
</style></head><body>"""
