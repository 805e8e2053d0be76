"""The audit log: one JSON line per flag, for reviewers and incident response.

Each line names the request, model, tenant, monitor, severity, reason, score
and evidence (block, step, positions). Decoded snippets are content and are
written only when `logging.log_content` allows it; reasons and attributes are
content-free by the monitor contract.

Each line goes out in one write() on an O_APPEND descriptor, so the monitor
worker processes (server.monitor_processes) can share one file without
interleaving their lines.

Bounded: a line is at most MAX_LINE_BYTES (a flag with huge attributes or
evidence is shortened and marked "truncated"), and the file rotates at
`max_bytes` (logging.audit_max_bytes) to PATH.1 ... PATH.<backups>, the
oldest dropped. Processes sharing the file rotate it under an flock on
PATH.lock; one that finds the path already names a new file only reopens.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from canvaswatch.monitors.base import Flag, RequestMeta

MAX_LINE_BYTES = 64 * 1024
# What a shortened line keeps: enough to find the request, the monitor and where it looked.
_KEEP_CHARS, _KEEP_ITEMS, _KEEP_POSITIONS = 1024, 16, 64


class AuditLog:
    def __init__(self, path: str | Path | None, include_content: bool, max_bytes: int = 0, backups: int = 5) -> None:
        self.include_content = include_content
        self.max_bytes = max_bytes  # 0: never rotate
        self.backups = backups
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._path = Path(path) if path else None
        if self._path is not None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = self._open()

    def _open(self) -> int:
        return os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    @property
    def enabled(self) -> bool:
        return self._fd is not None

    def record(self, request: RequestMeta, flag: Flag, report: str | None = None) -> None:
        if self._fd is None:
            return
        entry = {
            "ts": time.time(),
            "event": "flag",
            "request_id": request.request_id,
            "model": request.model,
            "tenant": request.tenant,
            "monitor": flag.monitor,
            "severity": flag.severity.name,
            "reason": flag.reason,
            "score": flag.score,
            "attributes": dict(flag.attributes),
            "evidence": [
                {
                    "block": e.block,
                    "step": e.step,
                    "positions": list(e.positions),
                    **({"snippet": e.snippet} if self.include_content else {}),
                }
                for e in flag.evidence
            ],
        }
        if report:
            entry["report"] = report  # written when the request finishes (logging.report_dir)
        line = _bounded_line(entry)
        with self._lock:
            if self._fd is not None:
                if self.max_bytes and os.fstat(self._fd).st_size + len(line) > self.max_bytes:
                    self._rotate(len(line))
                written = os.write(self._fd, line)
                if written < len(line):  # only on a full disk or a signal; finish the line rather than cut it
                    os.write(self._fd, line[written:])

    def _rotate(self, incoming: int) -> None:
        """Under the lock: shift PATH -> PATH.1 -> ... unless another process already did; then reopen PATH."""
        path = self._path
        with open(f"{path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            mine = os.fstat(self._fd)
            if current is not None and current.st_ino == mine.st_ino and current.st_size + incoming > self.max_bytes:
                for index in range(self.backups - 1, 0, -1):
                    older = Path(f"{path}.{index}")
                    if older.exists():
                        os.replace(older, f"{path}.{index + 1}")
                os.replace(path, f"{path}.1")
            os.close(self._fd)
            self._fd = self._open()

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None



def _bounded_line(entry: dict[str, Any]) -> bytes:
    """The entry as one JSON line of at most MAX_LINE_BYTES; a longer one is shortened and says so."""
    line = (json.dumps(entry, ensure_ascii=False) + "\n").encode()
    if len(line) <= MAX_LINE_BYTES:
        return line
    short = dict(entry, truncated=True)
    for key in ("request_id", "model", "tenant", "reason", "report"):
        if isinstance(short.get(key), str):
            short[key] = short[key][:_KEEP_CHARS]
    short["attributes"] = {str(k)[:128]: str(v)[:256] for k, v in list(entry["attributes"].items())[:_KEEP_ITEMS * 2]}
    short["evidence"] = [
        {**e, "positions": e["positions"][:_KEEP_POSITIONS], "positions_total": len(e["positions"]),
         **({"snippet": e["snippet"][:_KEEP_CHARS]} if "snippet" in e else {})}
        for e in entry["evidence"][:_KEEP_ITEMS]
    ]
    short["evidence_total"] = len(entry["evidence"])
    line = (json.dumps(short, ensure_ascii=False) + "\n").encode()
    if len(line) > MAX_LINE_BYTES:  # only if something above was far from its usual size; keep the head
        short.pop("attributes"), short.pop("evidence")
        line = (json.dumps(short, ensure_ascii=False) + "\n").encode()
    return line
