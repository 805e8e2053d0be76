"""The audit log: one JSON line per flag, for reviewers and incident response.

Each line names the request, model, tenant, monitor, severity, reason, score
and evidence (block, step, positions). Decoded snippets are content and are
written only when `logging.log_content` allows it; reasons and attributes are
content-free by the monitor contract.

Each line goes out in one write() on an O_APPEND descriptor, so the monitor
worker processes (server.monitor_processes) can share one file without
interleaving their lines.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from canvaswatch.monitors.base import Flag, RequestMeta


class AuditLog:
    def __init__(self, path: str | Path | None, include_content: bool) -> None:
        self.include_content = include_content
        self._lock = threading.Lock()
        self._fd: int | None = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

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
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode()
        with self._lock:
            if self._fd is not None:
                written = os.write(self._fd, line)
                if written < len(line):  # only on a full disk or a signal; finish the line rather than cut it
                    os.write(self._fd, line[written:])

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

