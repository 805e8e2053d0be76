"""The audit log: one JSON line per flag, for reviewers and incident response.

Each line names the request, model, tenant, monitor, severity, reason, score
and evidence (block, step, positions). Decoded snippets are content and are
written only when `logging.log_content` allows it; reasons and attributes are
content-free by the monitor contract.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import IO

from canvaswatch.monitors.base import Flag, RequestMeta


class AuditLog:
    def __init__(self, path: str | Path | None, include_content: bool) -> None:
        self.include_content = include_content
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8", buffering=1)

    @property
    def enabled(self) -> bool:
        return self._file is not None

    def record(self, request: RequestMeta, flag: Flag, report: str | None = None) -> None:
        if self._file is None:
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
        line = json.dumps(entry, ensure_ascii=False)
        with self._lock:
            self._file.write(line + "\n")

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

